import pytest
import torch

from training.online import ONLINE_METHODS, merge_into_global, train_temporary
from training.strategies.base import LoraLearner


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_temporary_starts_from_global_and_merges(method, tiny_ctx, tiny_bench):
    init = LoraLearner(tiny_ctx).init_adapter
    glob = {k: v + 0.3 for k, v in init.items()}  # a global adapter far from the initial one
    steps = []
    tiny_ctx.train.steps = 2
    temp, info = train_temporary(
        tiny_ctx,
        method,
        {},
        glob,
        1,
        tiny_bench.domains[0],
        progress=lambda s, t, loss: steps.append((s, t)),
        log_every=1,
    )
    assert steps == [(1, 2), (2, 2)] and 0 <= info["A_t"] <= 1
    # two small steps from the global adapter stay near it, far from the initial adapter
    dist_g = sum(float((temp[k] - glob[k]).abs().mean()) for k in temp)
    dist_i = sum(float((temp[k] - init[k]).abs().mean()) for k in temp)
    assert dist_g < dist_i
    merged = merge_into_global(method, glob, temp)
    assert set(merged) == set(glob) and all(torch.isfinite(v).all() for v in merged.values())
    assert merge_into_global(method, None, temp) == temp


def test_unknown_online_method(tiny_ctx, tiny_bench):
    with pytest.raises(ValueError, match="pam"):
        train_temporary(tiny_ctx, "adaptive", {}, None, 0, tiny_bench.domains[0])
