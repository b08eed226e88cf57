"""Invariants of every offline backbone in the registry, the EfficientNet-Lite0 key mapping, and the shipped ViT."""

import copy
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training import effnet
from training.backbones import BACKBONES, get_spec, preprocess, shipped_weights_path
from training.backbones import create_backbone as _create
from training.lora import (
    LoraSettings,
    attach_lora,
    classifier_name,
    functional_forward,
    get_adapter,
    materialise,
    set_adapter,
    target_module_names,
    to_delta,
)
from training.recipes.backbone import PretrainConfig
from training.store import sha256_file

OFFLINE = [n for n, s in BACKBONES.items() if s.offline]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPU: these are correctness tests, not timings
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path / "cache"))  # shipped weights, never a stale cache


def create_backbone(name, num_classes, **kw):
    return _create(name, num_classes, ensure_pretrained=False, **kw)  # never minutes of pretraining in a test


def _images(spec, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return preprocess(spec, torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8))


@pytest.mark.parametrize("name", OFFLINE)
def test_spec_names_the_classifier_and_the_targets(name):
    spec = get_spec(name)
    model = spec.build(7)
    assert classifier_name(model) == spec.head and model.get_classifier().out_features == 7
    # peft matches modules_to_save by name suffix: only the head itself may end with its name.
    assert [n for n, _ in model.named_modules() if n.endswith(spec.head)] == [spec.head]
    named = target_module_names(model, spec.lora_targets, spec.head)
    assert named == target_module_names(model, None, spec.head)  # the targets are every Linear / 1×1 conv
    mods = dict(model.named_modules())
    assert all(type(mods[n]) in (torch.nn.Linear, torch.nn.Conv2d) for n in named)
    assert model.forward_head(model.forward_features(_images(spec))).shape == (2, 7)


@pytest.mark.parametrize("name", OFFLINE)
def test_adapter_holds_factors_and_exactly_the_head(name):
    spec = get_spec(name)
    pm = attach_lora(create_backbone(name, 5), LoraSettings(rank=2), spec=spec)
    assert [n for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)] == [
        "base_model.model." + spec.head
    ]
    keys = set(get_adapter(pm))
    head = {k for k in keys if k.startswith(spec.head + ".")}
    assert head == {f"{spec.head}.weight", f"{spec.head}.bias"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys - head)
    # Without a spec the same targets and head are derived from the model.
    again = attach_lora(create_backbone(name, 5), LoraSettings(rank=2))
    assert set(get_adapter(again)) == keys


@pytest.mark.parametrize("name", OFFLINE)
def test_materialised_delta_equals_peft_forward_and_merge(name):
    spec, cfg = get_spec(name), LoraSettings(rank=2, alpha=3.0)
    base = create_backbone(name, 4).eval()
    pm = attach_lora(copy.deepcopy(base), cfg, spec=spec).eval()
    g = torch.Generator().manual_seed(1)
    ad = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in get_adapter(pm).items()}
    set_adapter(pm, ad)
    delta = to_delta(ad, cfg)
    x = _images(spec)
    with torch.no_grad():
        want = pm(x)
        torch.testing.assert_close(materialise(base, delta)(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(functional_forward(base, delta, x), want, atol=1e-4, rtol=1e-4)
        merged = dict(pm.merge_and_unload().named_parameters())
    own = dict(materialise(base, delta).named_parameters())
    for k, p in own.items():
        torch.testing.assert_close(p, merged[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", OFFLINE)
def test_training_changes_nothing_but_the_adapter(name):
    """No batch statistics: train mode computes what eval mode does, and a step moves only the adapter."""
    spec = get_spec(name)
    pm = attach_lora(create_backbone(name, 3), LoraSettings(rank=2), spec=spec)
    x, y = _images(spec, n=4), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(pm.train()(x), pm.eval()(x))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    adapter = {k.replace(".default", "") for k in before if "lora_" in k or ".modules_to_save." in k}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    torch.nn.functional.cross_entropy(pm(x), y).backward()
    opt.step()
    changed = {k.replace(".default", "") for k, v in pm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= adapter


def test_delta_shape_must_fit_its_parameter():
    base = create_backbone("efficientnet_lite0_offline", 3)
    flat = {"conv_head.delta": torch.ones(1280, 320)}  # (out, in) is accepted for a 1×1 conv
    w = materialise(base, flat).conv_head.weight
    torch.testing.assert_close(w, base.conv_head.weight + 1)
    with pytest.raises(ValueError, match="conv_head"):
        materialise(base, {"conv_head.delta": torch.ones(320, 1280)})


def test_effnet_attach_refuses_a_head_name_peft_would_over_match():
    base = create_backbone("efficientnet_lite0_offline", 3)
    spec = get_spec("efficientnet_lite0_offline")
    bad = replace(spec, head="head")  # "head" would also match "conv_head"
    with pytest.raises(ValueError, match="conv_head"):
        attach_lora(base, LoraSettings(rank=2), spec=bad)


@pytest.mark.parametrize("name", [n for n in OFFLINE if get_spec(n).weights()])
def test_pretrained_trunk_loads_fully_and_head_is_seeded(name):
    spec = get_spec(name)
    a, b = create_backbone(name, 6, seed=3), create_backbone(name, 6, seed=3)
    torch.testing.assert_close(a.get_classifier().weight, b.get_classifier().weight)
    fresh = spec.build(6)
    trunk = [k for k in a.state_dict() if not k.startswith(spec.head + ".") and "num_batches" not in k]
    assert any(not torch.equal(a.state_dict()[k], fresh.state_dict()[k]) for k in trunk)


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------


def _photo(size, mean, std, name="china.jpg"):
    from sklearn.datasets import load_sample_image

    x = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def imagenet_effnet():
    model = effnet.build(1000)
    model.load_state_dict(effnet.read(effnet.weights_path(), model), strict=True)  # every key, classifier too
    return model.eval()


def test_effnet_imagenet_prediction_is_sensible(imagenet_effnet):
    from timm.data import ImageNetInfo

    spec = get_spec("efficientnet_lite0_offline")
    with torch.no_grad():
        p = imagenet_effnet(_photo(224, spec.mean, spec.std)).softmax(1)[0]
    top5 = [ImageNetInfo().index_to_description(int(i)) for i in p.topk(5).indices]
    # china.jpg is a Chinese temple: palace / monastery / bell cote / stupa are all sensible readings.
    assert top5[0].split(",")[0] in {"palace", "monastery", "bell cote", "stupa", "pagoda"}, top5


def test_effnet_normalisation_is_the_checkpoints():
    import timm

    cfg = timm.models.get_pretrained_cfg(effnet.TIMM_ARCH)
    spec = get_spec("efficientnet_lite0_offline")
    assert (spec.mean, spec.std) == (tuple(cfg.mean), tuple(cfg.std))  # [-1, 1] inputs, as the TF Lite models


@pytest.mark.parametrize("size", [64, 224])
def test_effnet_logits_equal_the_original_package(imagenet_effnet, size):
    original = pytest.importorskip("efficientnet_lite_pytorch")
    ref = original.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=effnet.weights_path()).eval()
    x = torch.cat([_photo(size, (0.5,) * 3, (0.5,) * 3, n) for n in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        want, got = ref(x), imagenet_effnet(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_effnet_convert_rejects_unknown_keys():
    model = effnet.build(10)
    with pytest.raises(ValueError, match="_blocks.0._nope"):
        effnet.convert({"_blocks.0._nope.weight": torch.zeros(1)}, model)


# --- shipped vit_tiny_offline (issue 10) ----------------------------------------------------------

SHIPPED = shipped_weights_path("vit_tiny_offline")
SIDECAR = SHIPPED[: -len(".safetensors")] + ".json"


def test_shipped_vit_checksum_and_provenance():
    with open(SIDECAR) as f:
        side = json.load(f)
    assert sha256_file(SHIPPED) == side["sha256"]
    with safe_open(SHIPPED, "pt") as f:
        prov = json.loads(f.metadata()["provenance"])
    assert prov["config"] == asdict(PretrainConfig())  # made by the published recipe
    assert prov["command"].startswith("mergeserve pretrain") and prov["torch"] and prov["heldout_acc"] > 0.3
    assert {k: v for k, v in side.items() if k != "sha256"} == prov


def test_shipped_vit_loads_with_no_missing_or_unexpected_keys():
    from training.data.shapes import CLASSES

    model = get_spec("vit_tiny_offline").build(len(CLASSES))
    model.load_state_dict(load_file(SHIPPED), strict=True)


def test_vit_default_is_shipped_and_cache_overrides(tmp_path):
    shipped = load_file(SHIPPED)
    model = create_backbone("vit_tiny_offline", 3)  # ensure_pretrained=False: raises if it had to pretrain
    torch.testing.assert_close(model.state_dict()["pos_embed"], shipped["pos_embed"])
    cached = dict(shipped, pos_embed=torch.zeros_like(shipped["pos_embed"]))
    path = tmp_path / "cache" / "backbones" / "vit_tiny_offline.safetensors"
    os.makedirs(path.parent)
    save_file(cached, str(path))
    with pytest.warns(UserWarning, match="differs from the shipped"):
        model = create_backbone("vit_tiny_offline", 3)
    assert not model.state_dict()["pos_embed"].any()


def test_package_data_carries_the_shipped_files():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["training"]
    carried = {p.name for pat in patterns for p in (ROOT / "training").glob(pat)}
    assert {os.path.basename(SHIPPED), os.path.basename(SIDECAR)} <= carried
