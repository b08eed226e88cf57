import pytest
import torch

from training.buffer import ReplayBuffer
from training.hyper import parse_hyper
from training.lora import materialise
from training.online import (
    ALPHA_METHODS,
    ONLINE_METHODS,
    TEMPORARY_METHODS,
    fit_adaptive,
    merge_into_global,
    train_domain_adapter,
    train_temporary,
)
from training.strategies import create_strategy
from training.strategies.base import LoraLearner, accuracy


def test_method_families_cover_online_methods():
    assert set(TEMPORARY_METHODS) | set(ALPHA_METHODS) == set(ONLINE_METHODS)
    assert set(ALPHA_METHODS) == {"adaptive", "pam_adaptive"}


@pytest.mark.parametrize("method", TEMPORARY_METHODS)
def test_temporary_starts_from_global_and_merges(method, tiny_ctx, tiny_bench):
    init = LoraLearner(tiny_ctx).init_adapter
    glob = {k: v + 0.3 for k, v in init.items()}  # a global adapter far from the initial one
    steps = []
    hyper = parse_hyper(method, {"steps": 2})
    temp, info = train_temporary(
        tiny_ctx,
        method,
        hyper,
        glob,
        1,
        tiny_bench.domains[0],
        progress=lambda s, t, loss: steps.append((s, t)),
        log_every=1,
    )
    assert steps == [(1, 2), (2, 2)] and 0 <= info["A_t"] <= 1  # hyper.steps applied, not ctx.train.steps
    assert tiny_ctx.train.steps == 4  # ...without touching the caller's settings
    # two small steps from the global adapter stay near it, far from the initial adapter
    dist_g = sum(float((temp[k] - glob[k]).abs().mean()) for k in temp)
    dist_i = sum(float((temp[k] - init[k]).abs().mean()) for k in temp)
    assert dist_g < dist_i
    merged = merge_into_global(method, glob, temp, hyper)
    assert set(merged) == set(glob) and all(torch.isfinite(v).all() for v in merged.values())
    assert merge_into_global(method, None, temp, hyper) == temp


def test_temporary_rejects_what_it_cannot_honour(tiny_ctx, tiny_bench):
    d = tiny_bench.domains[0]
    with pytest.raises(ValueError, match="train_domain_adapter"):
        train_temporary(tiny_ctx, "adaptive", parse_hyper("adaptive", {}), None, 0, d)
    with pytest.raises(TypeError, match="PamHyper"):
        train_temporary(tiny_ctx, "pam", {"percent": 10}, None, 0, d)
    with pytest.raises(ValueError, match="lora-format adapter"):
        train_temporary(tiny_ctx, "pam", parse_hyper("pam", {}), None, 2, d)  # would restart from init


def test_pam_alignment_runs_online(tiny_ctx, tiny_bench):
    init = LoraLearner(tiny_ctx).init_adapter
    glob = {k: v + 0.3 * torch.randn_like(v) for k, v in init.items()}
    hyper = parse_hyper("pam", {"steps": 6, "lr": 0.5, "every": 2, "percent": 100})
    _, info = train_temporary(tiny_ctx, "pam", hyper, glob, 1, tiny_bench.domains[0])
    assert info["align_calls"] == 3 and info["n_reset"] > 0


def _drive(s, domains, ctx):
    """Run a strategy on the batches train_temporary / train_domain_adapter draw."""
    for d in domains:
        gen = torch.Generator().manual_seed(ctx.seed)
        for _ in range(s.begin_domain(d)):
            idx = torch.randint(len(d.y_train), (ctx.train.batch_size,), generator=gen)
            s.train_step(*d.batch(idx))
        s.end_domain()


def _online(method, hyper, ctx, domains):
    """What the server's worker does per domain; returns the served adapter (and α for adaptive methods)."""
    h = parse_hyper(method, hyper)
    glob, adapters, c, alpha = None, [], None, None
    buf = ReplayBuffer(getattr(h, "spc", 1), seed=ctx.seed)
    for n, d in enumerate(domains):
        if method == "adaptive":
            a, _ = train_domain_adapter(ctx, h, d)
        else:
            a, _ = train_temporary(ctx, method, h, glob, n, d)
            glob = merge_into_global(method, glob, a, h)
        if method in ALPHA_METHODS:
            adapters.append(a)
            buf.add(d.name, d.x_train, d.y_train)
            served, alpha, c = fit_adaptive(ctx, adapters, buf, h, c)
        else:
            served = glob
    return served, alpha


@pytest.mark.parametrize(
    ("method", "hyper"),
    [
        ("ties", {"density": 0.2}),
        ("tall", {"lam": 0.1}),
        ("pam", {"every": 2, "percent": 30}),
        ("adaptive", {"base": "linear", "fit_steps": 5, "spc": 2}),
        ("pam_adaptive", {"every": 2, "fit_steps": 5, "b_max": 2}),
    ],
)
def test_online_equals_benchmark(method, hyper, tiny_ctx, tiny_bench):
    domains = tiny_bench.domains[:2]
    served, alpha = _online(method, hyper, tiny_ctx, domains)
    s = create_strategy(method, tiny_ctx, **hyper)
    _drive(s, domains, tiny_ctx)
    bench, fmt = s.adapter()
    assert fmt == ("delta" if method in ALPHA_METHODS else "lora") and set(bench) == set(served)
    for k in bench:
        assert torch.equal(bench[k], served[k]), k  # bit-exact: one implementation
    if alpha is not None:
        assert torch.equal(alpha, s.alpha)


def test_adaptive_online_path(tiny_ctx, tiny_bench):
    h = parse_hyper("adaptive", {"spc": 2, "b_max": 2.5, "fit_steps": 20, "fit_lr": 0.3})
    buf = ReplayBuffer(h.spc, seed=0)
    adapters, c, domains = [], None, tiny_bench.domains
    for i, d in enumerate(domains):
        a, info = train_domain_adapter(tiny_ctx, h, d)
        assert 0 <= info["A_t"] <= 1 and any(k.endswith(".lora_A.weight") for k in a)  # lora format
        adapters.append(a)
        buf.add(d.name, d.x_train, d.y_train)
        merged, alpha, c = fit_adaptive(tiny_ctx, adapters, buf, h, c)
        assert alpha.shape == c.shape == (i + 1,)  # one coefficient per domain
        assert bool((alpha > 0).all() and (alpha < h.b_max).all())
    assert len(buf) == h.spc * 3 * len(domains)
    assert any(k.endswith(".delta") for k in merged) and not any("lora_" in k for k in merged)
    model = materialise(tiny_ctx.base, merged)  # folds into the bare backbone
    for d in domains:
        assert 0.0 <= accuracy(tiny_ctx.task, model, d, tiny_ctx.device, 64) <= 1.0
    # adapters trained from the common initial adapter differ per domain
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_fit_adaptive_uses_the_buffer(tiny_ctx, tiny_bench):
    h = parse_hyper("adaptive", {"fit_steps": 10, "fit_lr": 0.5})
    d0, d1 = tiny_bench.domains[:2]
    adapters = [train_domain_adapter(tiny_ctx, h, d)[0] for d in (d0, d1)]
    with pytest.raises(ValueError, match="empty"):
        fit_adaptive(tiny_ctx, adapters, ReplayBuffer(1), h, None)
    buf = ReplayBuffer(1)
    buf.add(d0.name, d0.x_train, d0.y_train)
    buf.add(d1.name, d1.x_train, d1.y_train)
    flipped = ReplayBuffer(1)
    flipped.add(d0.name, d0.x_train, (d0.y_train + 1) % 3)  # same images, other labels
    flipped.add(d1.name, d1.x_train, (d1.y_train + 1) % 3)
    _, a, c = fit_adaptive(tiny_ctx, adapters, buf, h, None)
    _, a_flipped, _ = fit_adaptive(tiny_ctx, adapters, flipped, h, None)
    assert not torch.allclose(a, a_flipped, atol=1e-4)
    _, a_resumed, _ = fit_adaptive(tiny_ctx, adapters, buf, h, c[:1])  # c carried over from a previous fit
    assert not torch.equal(a, a_resumed)
    with pytest.raises(ValueError, match="initial logits"):
        fit_adaptive(tiny_ctx, adapters[:1], buf, h, c)
    with pytest.raises(TypeError, match="AdaptiveHyper"):
        fit_adaptive(tiny_ctx, adapters, buf, parse_hyper("ties", {}), None)
