"""Top-k ranking of scores into names: the one ranking every response (class labels, answer words) uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` best ``(name, score)`` pairs of each row, best first (scores rounded to 6 digits).

    Args:
        probs: (N, C) scores, one column per name.
        names: The C names.
        k: How many to keep per row (clipped to [1, C]).

    Returns:
        N lists of ``min(max(k, 1), C)`` pairs.
    """
    k = min(max(1, k), probs.shape[-1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k); stable: ties keep the names' order
    return [[(names[i], round(float(p[i]), 6)) for i in row] for p, row in zip(probs, top)]


def responses(probs: np.ndarray, names: Sequence[str], k: int) -> list[dict]:
    """A closed-vocabulary task's response bodies: ``{"answer", "score", "top_k": [{"answer", "score"}, …]}``
    per row of ``probs`` (N, C)."""
    out = []
    for row in top_k(probs, names, k):
        ranked = [{"answer": a, "score": s} for a, s in row]
        out.append({"answer": ranked[0]["answer"], "score": ranked[0]["score"], "top_k": ranked})
    return out


def exact_match(preds: Sequence[str], targets: Sequence[str]) -> float:
    """The share of predictions equal to their reference answer (0.0 for none)."""
    return sum(p == t for p, t in zip(preds, targets)) / max(1, len(targets))
