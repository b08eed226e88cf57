"""Adapters in peft's own format: what ``GET /v1/adapters/{v}/download?format=peft`` writes and ``POST /v1/adapters``
reads, so that an adapter learned here loads with ``PeftModel.from_pretrained(base, folder)`` elsewhere, and
one trained elsewhere on the same base can be served here.

A peft LoRA folder is ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight``, ``….lora_B.weight`` and the fully trained ``modules_to_save``).
The store's ``lora`` adapters are peft's state dict with that prefix stripped (:mod:`training.lora`), so
their export is a renaming. A ``delta`` adapter (an adaptive merge: dense ΔW, Coleman et al. Eq. 2) is
factored exactly, each module at its full rank (``rank_pattern``, ``alpha = rank`` so that s = 1):
ΔW = B·A with no truncation (:func:`merge.delta_to_lora`).

On import, an adapter whose rank and alpha are the server's (and that uses no per-module patterns) stays
``lora`` (a later domain's LoRA can start from it, as PAM does); any other is stored as its exact ``delta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import merge

from .settings import LoraSettings

PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


class AdapterMismatch(ValueError):
    """A peft adapter that this server cannot serve as given (the message says which key or field)."""


def to_peft(adapter: Mapping[str, torch.Tensor], fmt: str, lora: LoraSettings, head: str | None, base: str,
            shapes: Mapping[str, torch.Size]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter of the store as ``(adapter_config, state dict)`` in peft's saved format.

    Args:
        adapter: The store's tensors (``lora`` or ``delta`` format).
        fmt: ``"lora"`` or ``"delta"`` (the manifest's ``format``).
        lora: The LoRA settings it was made with (rank, alpha: the scaling s = alpha / r).
        head: The classifier module, trained in full (``modules_to_save``); None where the head is frozen and
            shared (the ``vqa`` task's).
        base: The backbone's registry name (``base_model_name_or_path``).
        shapes: The base model's parameter shapes (a conv ΔW may be stored as out × in).
    """
    if fmt == "lora":
        targets = sorted(k[: -len(_A)] for k in adapter if k.endswith(_A))
        config = _config(lora.rank, lora.alpha, targets, head, base)
        return config, {PREFIX + k: v.contiguous() for k, v in adapter.items()}
    deltas = {k: v.reshape(shapes[k[: -len(".delta")] + ".weight"]) for k, v in adapter.items() if k.endswith(".delta")}
    out, ranks = {}, {}
    for k, v in deltas.items():
        m = k[: -len(".delta")]
        ranks[m] = min(v.shape[0], v[0].numel())  # full rank: out × (in·kh·kw) has at most this rank
        out.update(merge.delta_to_lora({k: v}, ranks[m], 1.0))
    out.update({k: v for k, v in adapter.items() if not k.endswith(".delta")})
    config = _config(max(ranks.values()), float(max(ranks.values())), sorted(ranks), head, base)
    config.update(rank_pattern=dict(ranks), alpha_pattern={m: float(r) for m, r in ranks.items()})
    return config, {PREFIX + k: v.contiguous() for k, v in out.items()}


def _config(r: int, alpha: float, targets: list[str], head: str | None, base: str) -> dict[str, Any]:
    """``adapter_config.json`` for peft's ``LoraConfig``; written here, so that a serving replica need not
    import peft (and transformers) to offer a download: every field it omits takes peft's default."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
            "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
            "modules_to_save": [head] if head else None, "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def from_peft(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], lora: LoraSettings, head: str | None,
              base: str, shapes: Mapping[str, torch.Size]) -> tuple[dict[str, torch.Tensor], str, LoraSettings]:
    """A peft LoRA adapter as ``(tensors, format, LoRA settings)`` for the store, after checking it fits.

    Args:
        config: Its ``adapter_config.json``.
        sd: Its ``adapter_model.safetensors`` tensors.
        lora: The server's LoRA settings (an adapter with the same rank and alpha stays ``lora``).
        head: The server's classifier module (must be in ``modules_to_save``, shaped for the server's labels);
            None where the head is frozen (then the adapter may hold LoRA factors only).
        base: The server's backbone name (a different ``base_model_name_or_path`` is refused).
        shapes: The base model's parameter shapes.

    Raises:
        AdapterMismatch: naming the field or key that does not fit.
    """
    _check_config(config, head, base)
    tensors = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    factors = sorted({k[: -len(_A)] for k in tensors if k.endswith(_A)} | {k[: -len(_B)] for k in tensors
                                                                           if k.endswith(_B)})
    if not factors:
        raise AdapterMismatch("adapter_model.safetensors holds no lora_A / lora_B factors")
    for m in factors:
        _check_factors(m, tensors.get(m + _A), tensors.get(m + _B), shapes)
    rest = {k: v for k, v in tensors.items() if not (k.endswith(_A) or k.endswith(_B))}
    _check_head(rest, head, shapes)
    root = 0.5 if config.get("use_rslora") else 1.0  # rsLoRA scales by alpha / √r
    scaling = {m: _alpha(config, m) / _rank(config, m, tensors[m + _A]) ** root for m in factors}
    same = all(abs(s - lora.scaling) < 1e-12 and tensors[m + _A].shape[0] == lora.rank for m, s in scaling.items())
    if same and not config.get("rank_pattern") and not config.get("alpha_pattern"):
        return {**rest, **{k: tensors[k] for m in factors for k in (m + _A, m + _B)}}, "lora", lora
    deltas = merge.lora_to_delta({k: tensors[k] for m in factors for k in (m + _A, m + _B)}, scaling)
    return {**rest, **deltas}, "delta", lora


def _check_config(config: Mapping[str, Any], head: str | None, base: str) -> None:
    where = "adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise AdapterMismatch(f"{where}: peft_type {config.get('peft_type')!r}; only LORA adapters serve here")
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise AdapterMismatch(f"{where}: {flag} is set; {why} cannot be folded into this backbone")
    if config.get("bias", "none") != "none":
        raise AdapterMismatch(f"{where}: bias {config.get('bias')!r}; LoRA biases are not served (use 'none')")
    named = config.get("base_model_name_or_path")
    if named and named != base:
        raise AdapterMismatch(f"{where}: base_model_name_or_path {named!r}; this server's base is {base!r}")
    if head is not None and head not in (config.get("modules_to_save") or []):
        raise AdapterMismatch(f"{where}: modules_to_save must hold the classifier {head!r} trained for this "
                              "server's labels (the base's own head is a fresh, untrained one)")


def _check_factors(m: str, a: torch.Tensor | None, b: torch.Tensor | None, shapes: Mapping[str, torch.Size]) -> None:
    if a is None or b is None:
        raise AdapterMismatch(f"{m!r}: has {'lora_A' if a is not None else 'lora_B'} but not the other factor")
    w = shapes.get(m + ".weight")
    if w is None:
        raise AdapterMismatch(f"{m!r}: the base has no such module with a weight")
    r = a.shape[0]
    want_a, want_b = ((r, w[1]), (w[0], r)) if len(w) == 2 else ((r, *w[1:]), (w[0], r, 1, 1))
    if tuple(a.shape) != tuple(want_a) or tuple(b.shape) != tuple(want_b):
        raise AdapterMismatch(f"{m!r}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit its weight {tuple(w)}")


def _check_head(rest: Mapping[str, torch.Tensor], head: str | None, shapes: Mapping[str, torch.Size]) -> None:
    want = {k: s for k, s in shapes.items() if head and k.startswith(head + ".")}
    got = {k: v for k, v in rest.items() if head and k.startswith(head + ".")}
    if set(got) != set(want) or set(rest) != set(got):
        odd = sorted((set(got) ^ set(want)) | (set(rest) - set(got)))
        raise AdapterMismatch(f"adapter keys {odd[:3]} are not this server's classifier {head!r} (keys {sorted(want)})")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k]):
            raise AdapterMismatch(f"{k!r}: shape {tuple(v.shape)}, this server's labels need {tuple(want[k])}")


def _rank(config: Mapping[str, Any], m: str, a: torch.Tensor) -> int:
    return int(_pattern(config.get("rank_pattern"), m, a.shape[0]))


def _alpha(config: Mapping[str, Any], m: str) -> float:
    return float(_pattern(config.get("alpha_pattern"), m, config.get("lora_alpha", 8)))


def _pattern(pattern: Mapping[str, Any] | None, m: str, default: Any) -> Any:
    """peft's rank/alpha pattern: the value of the key that ``m`` ends with, else ``default``."""
    for k, v in (pattern or {}).items():
        if m == k or m.endswith("." + k):
            return v
    return default
