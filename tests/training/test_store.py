import copy
import json

import pytest
import torch

from training.backbones import create_backbone
from training.lora import LoraSettings, attach_lora, get_adapter, materialise, set_adapter, to_delta
from training.store import AdapterError, AdapterManifest, AdapterStore


def _manifest(name, **kw):
    return AdapterManifest(
        name=name, backbone="vit_test", format="lora", lora=LoraSettings(rank=2), class_names=["a", "b"], **kw
    )


def test_roundtrip_bit_identical(tmp_path):
    store = AdapterStore(str(tmp_path))
    t = {"x.lora_A.weight": torch.randn(2, 4), "head.weight": torch.randn(2, 4).bfloat16()}
    man = store.save(t, _manifest("global@v1", method="pam", metrics={"acc": 0.5}))
    assert len(man.sha256) == 64
    back, m2 = store.load("global@v1", backbone="vit_test")
    assert all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    assert m2.method == "pam" and store.names() == ["global@v1"]


def test_corrupt_mismatched_and_invalid(tmp_path):
    store = AdapterStore(str(tmp_path))
    store.save({"w": torch.ones(3)}, _manifest("a1"))
    with pytest.raises(AdapterError, match="trained on"):
        store.load("a1", backbone="vit_tiny_offline")
    raw = bytearray((tmp_path / "a1.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "a1.safetensors").write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="checksum"):
        store.load("a1")
    (tmp_path / "bad.json").write_text(json.dumps({"name": "bad"}))
    with pytest.raises(AdapterError, match="malformed"):
        store.manifest("bad")
    with pytest.raises(AdapterError, match="no adapter"):
        store.load("missing")
    with pytest.raises(AdapterError, match="invalid"):
        store.save({}, _manifest("../escape"))
    with pytest.raises(AdapterError, match="exists"):
        store.save({"w": torch.ones(1)}, _manifest("a1"))


def test_orphan_weights_without_manifest_are_invisible(tmp_path):
    store = AdapterStore(str(tmp_path))
    (tmp_path / "half.safetensors").write_bytes(b"partial")
    assert store.names() == []


def test_adapter_mismatch_and_materialise_equals_peft():
    base = create_backbone("vit_test", 3, seed=0)
    pm = attach_lora(copy.deepcopy(base), LoraSettings(rank=2, alpha=4.0), seed=0)
    ad = get_adapter(pm)
    with torch.no_grad():
        ad = {k: v + 0.05 * torch.randn_like(v) for k, v in ad.items()}
    set_adapter(pm, ad)
    x = torch.randn(4, 3, 32, 32)
    pm.eval()
    with torch.no_grad():
        y_peft = pm(x)
        y_mat = materialise(base, to_delta(ad, LoraSettings(rank=2, alpha=4.0)))(x)
    torch.testing.assert_close(y_mat, y_peft, atol=1e-4, rtol=1e-4)
    bad = dict(ad)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="does not fit"):
        set_adapter(pm, bad)


def _task_model(task: str):
    """(bare base, peft model, settings, inputs, forward) for a tiny model of ``task``."""
    settings = LoraSettings(rank=2, alpha=4.0)
    if task == "classify":
        base = create_backbone("vit_test", 3, seed=0)
        return base, attach_lora(copy.deepcopy(base), settings, seed=0), settings, (torch.randn(4, 3, 32, 32),), None
    from training.data.scenes import ANSWERS, make_family
    from training.tasks import attach_lora as attach_task_lora
    from training.tasks.vilt import VqaModelConfig, build_vilt, tokenizer_from_vocab
    from training.tasks.vqa import VqaTask

    tok = tokenizer_from_vocab()
    vqa = VqaTask(model=build_vilt(VqaModelConfig(hidden=32, layers=2, heads=2, mlp=64, image_size=32, patch=8),
                                   len(tok), ANSWERS), tokenizer=tok)
    base = vqa.build_base()
    batch = vqa.make_batch(make_family("count", 4, seed=1))
    return base, attach_task_lora(vqa, copy.deepcopy(base), settings), settings, (), batch.inputs


@pytest.mark.parametrize("task", ["classify", "vqa"])
def test_every_task_adapter_stores_and_folds(tmp_path, task):
    """A trained-looking adapter of each task survives the store bit for bit, and folded into a copy of
    the bare model it computes what the peft model computes (what a replica serves after a swap)."""
    base, pm, settings, args, kwargs = _task_model(task)
    with torch.no_grad():
        ad = {k: v + 0.05 * torch.randn_like(v) for k, v in get_adapter(pm).items()}
    set_adapter(pm, ad)
    store = AdapterStore(str(tmp_path))
    store.save(ad, AdapterManifest(name="global@v1", backbone=task, format="lora", lora=settings, class_names=["a"]))
    back, _ = store.load("global@v1", backbone=task)
    assert back.keys() == ad.keys() and all(torch.equal(back[k], ad[k]) for k in ad)
    with pytest.raises(AdapterError):
        store.load("global@v1", backbone="other")
    pm.eval()
    with torch.no_grad():
        want = pm(*args, **(kwargs or {}))
        got = materialise(base, to_delta(back, settings))(*args, **(kwargs or {}))
    want, got = (getattr(x, "logits", x) for x in (want, got))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
