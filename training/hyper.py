"""Method hyper-parameters: one strict pydantic model per method, shared by the server and the benchmark.

``parse_hyper(method, {...})`` is the only way a request's or a CLI's ``hyper`` dict reaches training,
so an unknown key, a string where a number belongs or a value out of range fails loudly with
:class:`HyperError` instead of being dropped. Integers are accepted where floats are expected; nothing
else is coerced (``"0.2"`` is not a number, ``True`` is not an integer).

This module imports pydantic only (no torch): the server's control plane validates requests with it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo


class HyperError(ValueError):
    """A hyper-parameter dict that does not fit its method's model.

    Attributes:
        field: The first offending key (``None`` for an unknown method or a non-dict).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class TrainHyper(_Strict):
    """Training fields every method takes; ``None`` keeps the server's (or bench config's) TrainSettings."""

    steps: int | None = Field(None, ge=1)  # None: TrainSettings.steps (80, the digits5 setting)
    lr: float | None = Field(None, gt=0, le=1.0)  # None: TrainSettings.lr (3e-3)


class PamAlign(_Strict):
    """PAM's during-training alignment (Bonato et al., Algorithm 1)."""

    percent: float = Field(50.0, ge=0, le=100)  # alignment percentage p; the paper's 50 %
    every: int = Field(20, ge=1)  # schedule s in steps; paper 100 of thousands, ours 20 of 80 per domain
    reinit: Literal["global", "zero"] = "global"  # reset value; "global" favours stability (paper Fig. 6)
    # τ over all tensors at once (Alg. 1 as written) or per tensor; one global τ lets the large-magnitude
    # lora_A factors (Kaiming init) take most of the top-p% and leaves lora_B and the head unprotected.
    threshold: Literal["global", "per_tensor"] = "global"
    align_head: bool = True  # also align the classifier head (the paper's VLM has none; ours is trained)
    align_last: bool = True  # align at the final step too, where no training follows (acts as pruning)


class AdaptiveFit(_Strict):
    """Learned merge coefficients α = σ(c)·b on a replay buffer (Coleman et al. 2024, Eq. 2-4)."""

    base: Literal["linear", "ties", "dare_ties"] = "ties"  # merge α goes through; TIES is the paper's best
    spc: int = Field(1, ge=1, le=5)  # buffer samples per class and domain; the paper uses 1 and 5
    b_max: float = Field(3.0, ge=1, le=10)  # bound of b in Eq. 3 (α < b_max); the paper uses 1, 3, 5
    density: float = Field(0.5, gt=0, le=1)  # fraction kept by ties / dare_ties (unused by linear)
    fit_steps: int = Field(60, ge=1, le=1000)  # Adam steps on the buffer per fit (seconds on CPU)
    fit_lr: float = Field(0.1, gt=0, le=1.0)  # Adam learning rate of c and b_raw
    # The head's task vectors go through the α-merge like every ΔW ("merge", TIES-pruned and α-scaled),
    # or the served head is the plain mean of the domains' trained heads ("mean"), outside α.
    head: Literal["merge", "mean"] = "merge"


class AdaptiveControls(_Strict):
    """Benchmark-only controls of the adaptive-merging paper (Coleman et al., Table 1); no server use."""

    fixed_w: float | None = Field(None, gt=0, le=10)  # every α_i = W, no fit (the paper's W ∈ {1, 3, 5})
    oracle: bool = False  # fit α on the held-out sets of the domains seen (an upper bound, not deployable)
    freeze_head: bool = False  # later domains train LoRA only, under the first domain's head (a shared head)


class PamHyper(PamAlign, TrainHyper):
    """``pam``: PAM-aligned temporary LoRA, averaged into the global one (PAM paper, Alg. 1)."""


class AverageHyper(TrainHyper):
    """``average``: PAM without alignment (PAM paper, baseline 10)."""


class FinetuneHyper(TrainHyper):
    """``finetune``: one LoRA trained sequentially (PAM paper, baseline 4)."""


class TiesHyper(TrainHyper):
    """``ties``: peft's TIES of (W_G, W') with weights (1, 1) (Yadav et al. 2023)."""

    density: float = Field(0.5, gt=0, le=1)  # fraction of each tensor kept; PAM's appendix tuned 0.5-0.9


class TallHyper(TrainHyper):
    """``tall``: consensus TALL mask of (W_G, W') (Wang et al. 2024)."""

    lam: float = Field(0.4, ge=0)  # mask threshold λ; PAM's appendix searched 0.1, 0.2, 0.4


class MagmaxHyper(TrainHyper):
    """``magmax``: per element the larger magnitude (Marczak et al. 2024)."""


class JointHyper(TrainHyper):
    """``joint`` (benchmark only): one LoRA on the pooled data of the domains seen so far."""

    # "fixed": each step draws batch_size samples from the pool, so with t domains pooled each domain gets
    # 1/t of a sequential method's samples per step (the committed digits5 / scenes tables ran this);
    # "per_domain": batch_size × t samples, each domain as many per step as a sequential method's domain
    # (it costs t× per step; docs/vqa.md "Joint training": on scenes_vqa_new's five families "fixed" leaves
    # rel_exist at chance even with 5× the steps, "per_domain" learns it)
    pool_batch: Literal["fixed", "per_domain"] = "fixed"


class AdaptiveHyper(AdaptiveFit, TrainHyper):
    """``adaptive``: per-domain LoRAs from the initial adapter, merged with learned α."""


class PamAdaptiveHyper(AdaptiveFit, PamAlign, TrainHyper):
    """``pam_adaptive``: PAM-aligned temporary LoRAs, merged with learned α."""


class AdaptiveBenchHyper(AdaptiveControls, AdaptiveHyper):
    """``adaptive`` in the benchmark: the online fields plus the paper's fixed-W and oracle-α controls."""


#: online method -> its hyper-parameter model; the server's methods are exactly these keys.
HYPER: dict[str, type[TrainHyper]] = {
    "pam": PamHyper,
    "average": AverageHyper,
    "finetune": FinetuneHyper,
    "ties": TiesHyper,
    "tall": TallHyper,
    "magmax": MagmaxHyper,
    "adaptive": AdaptiveHyper,
    "pam_adaptive": PamAdaptiveHyper,
}

#: benchmark-only strategies (they need every domain's data or the domain identity at test time).
BENCH_HYPER: dict[str, type[TrainHyper]] = {
    **HYPER, "adaptive": AdaptiveBenchHyper, "joint": JointHyper, "independent": TrainHyper,
}

_OPS = ((at.Ge, "ge", "≥", "["), (at.Gt, "gt", ">", "("), (at.Le, "le", "≤", "]"), (at.Lt, "lt", "<", ")"))


def allowed(info: FieldInfo) -> str:
    """Human-readable domain of a field, e.g. ``number in (0, 1] (default 0.5)``."""
    args = typing.get_args(info.annotation) or (info.annotation,)
    if typing.get_origin(info.annotation) is Literal:
        return " or ".join(repr(a) for a in args) + f" (default {info.default!r})"
    names = {int: "integer", float: "number", bool: "boolean"}
    kind = " or ".join(names.get(a, str(a)) for a in args if a is not type(None))
    bounds = {}
    for m in info.metadata:
        for cls, attr, sym, bracket in _OPS:
            if isinstance(m, cls):
                bounds[attr[0] == "g"] = (sym, bracket, getattr(m, attr))
    lo, hi = bounds.get(True), bounds.get(False)
    if lo and hi:
        rng = f" in {lo[1]}{lo[2]}, {hi[2]}{hi[1]}"
    elif lo or hi:
        b = lo or hi
        rng = f" {b[0]} {b[2]}"
    else:
        rng = ""
    null = " or null" if type(None) in args else ""
    return f"{kind}{rng}{null} (default {info.default!r})"


def _parse(registry: Mapping[str, type[TrainHyper]], method: str, hyper: object, max_steps: int | None) -> TrainHyper:
    model = registry.get(method)
    if model is None:
        raise HyperError(f"unknown method {method!r}; methods: {list(registry)}")
    if hyper is None:
        hyper = {}
    if not isinstance(hyper, Mapping):
        raise HyperError(f"{method}: hyper-parameters must be an object, got {type(hyper).__name__}")
    try:
        h = model.model_validate(dict(hyper))
    except ValidationError as e:
        msgs, first = [], None
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            first = first or key
            if err["type"] == "extra_forbidden":
                msgs.append(f"{method}: unknown hyper-parameter {key!r}; allowed keys: {sorted(model.model_fields)}")
            else:
                got = err.get("input")
                rule = allowed(model.model_fields[key]) if key in model.model_fields else ""
                msgs.append(f"{method}.{key}={got!r}: {err['msg']}; allowed: {rule}")
        raise HyperError("; ".join(msgs), first) from None
    if max_steps is not None and h.steps is not None and h.steps > max_steps:
        raise HyperError(
            f"{method}.steps={h.steps}: exceeds the maximum; allowed: integer in [1, {max_steps}]", "steps"
        )
    return h


def parse_hyper(method: str, hyper: Mapping[str, object] | None, max_steps: int | None = None) -> TrainHyper:
    """Validate an online method's hyper-parameters.

    Args:
        method: One of :data:`HYPER`.
        hyper: The request's dict (None or ``{}``: every default).
        max_steps: Upper bound on ``steps`` (the server's limit); None: no bound beyond ``steps ≥ 1``.

    Returns:
        The method's model (an instance of ``HYPER[method]``), frozen.

    Raises:
        HyperError: unknown method (listing the methods), not a dict, unknown key (listing the allowed
            keys), wrong type or value out of range (naming the field and its allowed range).
    """
    return _parse(HYPER, method, hyper, max_steps)


def base_method(label: str) -> str:
    """The strategy behind a benchmark label: ``"pam@p30"`` → ``"pam"``, ``"pam"`` → ``"pam"``.

    A label ``METHOD@VARIANT`` runs ``METHOD`` under its own name with its own hyper-parameters, so one
    benchmark run (same data, batches and cached adapters) can compare several settings of one method.
    """
    return label.partition("@")[0]


def parse_bench_hyper(method: str, hyper: Mapping[str, object] | None) -> TrainHyper:
    """As :func:`parse_hyper` over :data:`BENCH_HYPER` (adds the offline-only ``joint``, ``independent``
    and ``adaptive``'s controls); ``method`` may be a ``METHOD@VARIANT`` label (:func:`base_method`).

    Raises:
        HyperError: as :func:`parse_hyper`.
    """
    return _parse(BENCH_HYPER, base_method(method), hyper, None)


__all__ = [
    "BENCH_HYPER",
    "HYPER",
    "AdaptiveBenchHyper",
    "AdaptiveControls",
    "AdaptiveFit",
    "HyperError",
    "PamAlign",
    "TrainHyper",
    "allowed",
    "base_method",
    "parse_bench_hyper",
    "parse_hyper",
]
