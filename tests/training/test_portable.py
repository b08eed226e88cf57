"""Adapters out to peft's format and back: ``PeftModel.from_pretrained`` gives the served model's logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.backbones import create_backbone, get_spec
from training.fold import materialise, to_delta
from training.lora import attach_lora, get_adapter
from training.portable import AdapterMismatch, from_peft, to_peft
from training.settings import LoraSettings

LORA = LoraSettings(rank=2, alpha=4.0)


def _adapter(seed: int = 0) -> dict:
    """A trained-looking ``lora`` adapter of vit_test: random factors (B ≠ 0) and head."""
    pm = attach_lora(create_backbone("vit_test", 3, seed=0), LORA, spec=get_spec("vit_test"))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in get_adapter(pm).items()}


def _shapes() -> dict:
    return {k: v.shape for k, v in create_backbone("vit_test", 3, seed=0).named_parameters()}


def _peft_logits(tmp_path, config: dict, sd: dict, x: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    pm = PeftModel.from_pretrained(create_backbone("vit_test", 3, seed=0), str(tmp_path)).eval()
    with torch.no_grad():
        return pm(x)


@pytest.mark.parametrize("fmt", ["lora", "delta"])
def test_a_downloaded_adapter_loads_in_peft_with_the_served_logits(tmp_path, fmt):
    adapter = _adapter()
    stored = adapter if fmt == "lora" else to_delta(adapter, LORA)  # an adaptive version is dense ΔW
    config, sd = to_peft(stored, fmt, LORA, "head", "vit_test", _shapes())
    x = torch.randn(4, 3, 32, 32)
    served = materialise(create_backbone("vit_test", 3, seed=0), to_delta(stored, LORA))
    with torch.no_grad():
        torch.testing.assert_close(_peft_logits(tmp_path, config, sd, x), served(x), atol=1e-5, rtol=0)
    back, back_fmt, _ = from_peft(config, sd, LORA, "head", "vit_test", _shapes())
    assert back_fmt == fmt  # same rank and alpha: stays lora; a full-rank pattern: the exact delta
    torch.testing.assert_close(to_delta(back, LORA), to_delta(stored, LORA), atol=1e-5, rtol=1e-5)


def test_an_adapter_of_another_rank_is_imported_as_its_exact_delta():
    config, sd = to_peft(_adapter(), "lora", LORA, "head", "vit_test", _shapes())
    config = {**config, "r": 2, "lora_alpha": 8.0}  # s = 4, the server's is 2
    tensors, fmt, _ = from_peft(config, sd, LORA, "head", "vit_test", _shapes())
    want = to_delta({k.removeprefix("base_model.model."): v for k, v in sd.items()}, LoraSettings(rank=2, alpha=8.0))
    assert fmt == "delta" and all(torch.allclose(tensors[k], want[k]) for k in want)


@pytest.mark.parametrize("change, match", [
    (lambda c, sd: ({**c, "peft_type": "IA3"}, sd), "peft_type"),
    (lambda c, sd: ({**c, "use_dora": True}, sd), "use_dora"),
    (lambda c, sd: ({**c, "base_model_name_or_path": "resnet50"}, sd), "resnet50"),
    (lambda c, sd: ({**c, "modules_to_save": None}, sd), "modules_to_save"),
    (lambda c, sd: (c, {**sd, "base_model.model.head.weight": torch.zeros(5, 32)}), r"labels need \(3, 32\)"),
    (lambda c, sd: (c, {k: v for k, v in sd.items() if "blocks.0.attn.qkv.lora_B" not in k}), "lora_A but not"),
    (lambda c, sd: (c, {**sd, "base_model.model.nowhere.lora_A.weight": torch.zeros(2, 4),
                        "base_model.model.nowhere.lora_B.weight": torch.zeros(4, 2)}), "no such module"),
    (lambda c, sd: (c, {k: (v[:, :5] if k.endswith("blocks.0.mlp.fc1.lora_A.weight") else v) for k, v in sd.items()}),
     "do not fit"),
])
def test_an_adapter_that_does_not_fit_is_refused_naming_why(change, match):
    config, sd = change(*to_peft(_adapter(), "lora", LORA, "head", "vit_test", _shapes()))
    with pytest.raises(AdapterMismatch, match=match):
        from_peft(config, sd, LORA, "head", "vit_test", _shapes())


def test_the_saved_file_is_what_peft_itself_saves(tmp_path):
    """Key names and config fields: peft's save_pretrained of the same adapter gives the same keys."""
    pm = attach_lora(create_backbone("vit_test", 3, seed=0), LORA, spec=get_spec("vit_test"))
    pm.save_pretrained(str(tmp_path))
    config, sd = to_peft(get_adapter(pm), "lora", LORA, "head", "vit_test", _shapes())
    assert set(sd) == set(load_file(str(tmp_path / "adapter_model.safetensors")))
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("r", "lora_alpha", "peft_type")} == {k: theirs[k] for k in ("r", "lora_alpha",
                                                                                                 "peft_type")}
