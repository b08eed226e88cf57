"""Continual-learning metrics as pure functions of the accuracy matrix (PAM paper, Appendix A).

``A[t][i]`` is the accuracy on domain i after learning domain t (rows and columns in training order,
0-indexed, T×T). For merging methods the matrix is measured *after* each merge; the accuracy of the
temporary adapter on its own domain *before* merging is passed separately as ``pre[t]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _square(a: Matrix) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def acc(a: Matrix) -> float:
    """ACC = 1/T Σᵢ A[T-1][i] (Eq. 3): mean accuracy over all domains at the end."""
    return float(_square(a)[-1].mean())


def bwt(a: Matrix) -> float:
    """BWT = 1/(T-1) Σ_{i<T-1} (A[T-1][i] − A[i][i]) (Eq. 4, Lopez-Paz & Ranzato 2017).

    Forgetting measured *from right after training* each domain (negative = forgetting). When merging
    lifts an old domain later, this can be positive. 0 for T = 1.
    """
    m = _square(a)
    t = m.shape[0]
    return float(np.mean(m[-1, :-1] - np.diag(m)[:-1])) if t > 1 else 0.0


def forgetting_from_max(a: Matrix) -> float:
    """Average forgetting *from the maximum* (Chaudhry et al. 2018): 1/(T-1) Σ_{i<T-1} max_{t<T-1} A[t][i] − A[T-1][i].

    Differs from −BWT exactly when an old domain's accuracy rose after it was learned (e.g. by a merge).
    """
    m = _square(a)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([m[i:-1, i].max() - m[-1, i] for i in range(t - 1)]))


def fwt(a: Matrix, zero_shot: Sequence[float]) -> float:
    """FWT = 1/(T-1) Σ_{i=1}^{T-1} (A[i-1][i] − āᵢ) (Eq. 5, Lopez-Paz & Ranzato 2017).

    The paper prints the sum's upper bound as T−1 with 1-indexed tasks; we use the original definition
    (every domain but the first). For a classifier whose head is learned there is no zero-shot model, so
    āᵢ is the accuracy of the *initial* model — pretrained backbone, LoRA at its initialisation (ΔW = 0),
    the seeded untrained head — identical for every method, so FWT compares what each method's past
    domains give an unseen domain over that common starting point.
    """
    m = _square(a)
    z = np.asarray(zero_shot, dtype=np.float64)
    t = m.shape[0]
    if z.shape != (t,):
        raise ValueError(f"zero_shot must have {t} entries, got {z.shape}")
    return float(np.mean([m[i - 1, i] - z[i] for i in range(1, t)])) if t > 1 else 0.0


def a_t(pre: Sequence[float]) -> float:
    """A_t = 1/T Σ A_{i,i} before merging (Eq. 6): plasticity of the trained (temporary) adapter."""
    return float(np.mean(np.asarray(pre, dtype=np.float64)))


def a_m(a: Matrix) -> float:
    """A_m = 1/T Σ A[i][i] after merging: how much of the new domain survives the merge."""
    return float(np.mean(np.diag(_square(a))))


def summarize(a: Matrix, pre: Sequence[float], zero_shot: Sequence[float]) -> dict[str, float]:
    """All metrics of one run, in percent-free fractions."""
    return {
        "ACC": acc(a),
        "BWT": bwt(a),
        "FWT": fwt(a, zero_shot),
        "A_t": a_t(pre),
        "A_m": a_m(a),
        "forgetting_max": forgetting_from_max(a),
    }


#: two-sided 95 % Student t quantiles by degrees of freedom (df > 30: the normal 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of ``a[k] - b[k]`` over paired runs (same seed and order) with its 95 % t interval.

    Pairing removes what the runs share (the order's difficulty, the seed's initial adapter), which is
    most of the spread between runs. An interval that excludes 0 is a difference the runs support.

    Args:
        a: One method's metric per run.
        b: The other method's metric for the same runs, in the same order.

    Returns:
        ``{"mean", "lo", "hi", "n"}``; with one pair the interval is unbounded (nothing to estimate it from).

    Raises:
        ValueError: when the two lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs must match one to one: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n, mean = len(d), float(d.mean())
    if n == 1:
        return {"mean": mean, "lo": float("-inf"), "hi": float("inf"), "n": 1}
    df = n - 1
    t = _T95.get(df) or (_T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96)
    half = t * float(d.std(ddof=1)) / np.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}
