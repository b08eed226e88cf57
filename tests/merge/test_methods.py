import pytest
import torch
from peft.utils import merge_utils as pmu

import merge

WEIGHTED = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tall"]


def _peft(name, ts, w, density):
    return {
        "ties": lambda: pmu.ties(ts, w, density),
        "magnitude_prune": lambda: pmu.magnitude_prune(ts, w, density),
        "dare_linear": lambda: pmu.dare_linear(ts, w, density),
        "dare_ties": lambda: pmu.dare_ties(ts, w, density),
    }[name]()


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.2, 0.7])
def test_matches_peft_per_key(tvs, name, density):
    w = torch.tensor([0.3, 1.2, 0.7])
    torch.manual_seed(1)
    ours = merge.MERGE_METHODS[name](tvs, w, density=density)
    torch.manual_seed(1)
    for k in ["a", "b"]:  # same key order as ours, so the global RNG is consumed identically
        ref = _peft(name, [tv[k] for tv in tvs], w, density)
        torch.testing.assert_close(ours[k], ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_generator_reproduces_peft_rng(tvs, name):
    w = [1.0, 0.5, 2.0]
    fn = getattr(merge, name)
    torch.manual_seed(7)
    ref = fn(tvs, w, 0.4)
    ours = fn(tvs, w, 0.4, generator=torch.Generator().manual_seed(7))
    again = fn(tvs, w, 0.4, generator=torch.Generator().manual_seed(7))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(again[k], ours[k], rtol=0, atol=0)


def test_linear_and_average(tvs):
    out = merge.linear(tvs, [1.0, -2.0, 0.5])
    torch.testing.assert_close(out["a"], tvs[0]["a"] - 2 * tvs[1]["a"] + 0.5 * tvs[2]["a"])
    avg = merge.average(tvs)
    torch.testing.assert_close(avg["b"], (tvs[0]["b"] + tvs[1]["b"] + tvs[2]["b"]) / 3)


@pytest.mark.parametrize("name", list(merge.MERGE_METHODS))
def test_one_adapter_weight_one_returns_it(tvs, name):
    one = [tvs[0]]
    out = merge.MERGE_METHODS[name](one, [1.0], density=1.0)
    for k in tvs[0]:
        torch.testing.assert_close(out[k], tvs[0][k])


@pytest.mark.parametrize("name", ["linear", "average", "ties", "magnitude_prune", "magmax", "tall"])
def test_order_does_not_matter(tvs, name):
    w = [0.2, 0.5, 0.9]
    fn = merge.MERGE_METHODS[name]
    a = fn(tvs, w)
    b = fn(tvs[::-1], w[::-1])
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("name", list(merge.MERGE_METHODS))
def test_pure_preserves_dtype_and_inputs(tvs, name):
    half = [{k: v.to(torch.bfloat16) for k, v in tv.items()} for tv in tvs]
    before = [{k: v.clone() for k, v in tv.items()} for tv in half]
    out = merge.MERGE_METHODS[name](half, [0.4, 0.4, 0.4])
    assert set(out) == set(half[0])
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    for tv, ref in zip(half, before):
        for k in tv:
            assert torch.equal(tv[k], ref[k])


@pytest.mark.parametrize("name", list(merge.MERGE_METHODS))
def test_mismatched_key_names_the_key(tvs, name):
    bad = [tvs[0], {"a": tvs[1]["a"], "zzz": tvs[1]["b"]}]
    with pytest.raises(ValueError, match="zzz|'b'"):
        merge.MERGE_METHODS[name](bad, [0.5, 0.5])


@pytest.mark.parametrize("name", list(merge.MERGE_METHODS))
def test_mismatched_shape_names_the_key(tvs, name):
    bad = [tvs[0], {"a": tvs[1]["a"], "b": torch.zeros(3)}]
    with pytest.raises(ValueError, match="'b'"):
        merge.MERGE_METHODS[name](bad, [0.5, 0.5])


def test_wrong_weight_count_and_density(tvs):
    with pytest.raises(ValueError, match="weights"):
        merge.linear(tvs, [1.0, 2.0])
    with pytest.raises(ValueError, match="density"):
        merge.ties(tvs, [1, 1, 1], 1.5)


def test_magmax_picks_largest_magnitude_later_wins_ties():
    t1 = {"w": torch.tensor([1.0, -5.0, 2.0, 3.0])}
    t2 = {"w": torch.tensor([-4.0, 2.0, 2.0, -3.0])}
    out = merge.magmax([t1, t2])["w"]
    assert out.tolist() == [-4.0, -5.0, 2.0, -3.0]


def test_magmax_property_random(tvs):
    out = merge.magmax(tvs)["a"]
    stacked = torch.stack([tv["a"] for tv in tvs])
    assert torch.equal(out.abs(), stacked.abs().amax(0))
    assert bool(((stacked == out).any(0)).all())


def test_tall_lambda_zero_keeps_everything(tvs):
    w = [0.3, 0.3, 0.4]
    merged, masks = merge.tall_masks(tvs, w, lam=0.0)
    lin = merge.linear(tvs, w)
    for k in lin:
        torch.testing.assert_close(merged[k], lin[k])
    assert all(bool(m[k].all()) for m in masks for k in m)


def test_tall_consensus_by_hand():
    t1, t2 = {"w": torch.tensor([1.0, 0.0, 3.0])}, {"w": torch.tensor([1.0, 2.0, -3.0])}
    merged, masks = merge.tall_masks([t1, t2], [1.0, 1.0], lam=1.0, min_agree=2)
    # mtl = [2, 2, 0]; m1 = |t1| >= |mtl-t1| = [1>=1, 0>=2, 3>=3]; m2 = [1>=1, 2>=0, 3>=3]
    assert masks[0]["w"].tolist() == [True, False, True]
    assert masks[1]["w"].tolist() == [True, True, True]
    assert merged["w"].tolist() == [2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="lam"):
        merge.tall_masks([t1], [1.0], lam=-1)
