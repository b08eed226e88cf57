import pytest
import torch

import merge


def _lora(rank, g, mods=("m1", "m2"), out_dim=6, in_dim=5):
    sd = {}
    for m in mods:
        sd[f"{m}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        sd[f"{m}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    sd["head.weight"] = torch.randn(3, in_dim, generator=g)
    return sd


def test_delta_is_scaled_product():
    sd = _lora(2, torch.Generator().manual_seed(0))
    d = merge.lora_to_delta(sd, 0.5)
    torch.testing.assert_close(d["m1.delta"], 0.5 * sd["m1.lora_B.weight"] @ sd["m1.lora_A.weight"])
    torch.testing.assert_close(d["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("rank", [2, 4])
def test_svd_roundtrip_exact_when_rank_suffices(rank):
    sd = _lora(2, torch.Generator().manual_seed(1))
    d = merge.lora_to_delta(sd, 2.0)
    back = merge.delta_to_lora(d, rank, 2.0)
    assert back["m1.lora_A.weight"].shape == (rank, 5)
    d2 = merge.lora_to_delta(back, 2.0)
    for k in d:
        torch.testing.assert_close(d2[k], d[k], atol=1e-4, rtol=1e-4)


def test_svd_truncation_is_best_rank_r():
    sd = _lora(4, torch.Generator().manual_seed(2))
    d = merge.lora_to_delta(sd, 1.0)
    back = merge.lora_to_delta(merge.delta_to_lora(d, 1, 1.0), 1.0)
    s = torch.linalg.svdvals(d["m1.delta"])
    err = (back["m1.delta"] - d["m1.delta"]).norm()
    torch.testing.assert_close(err, s[1:].norm(), atol=1e-4, rtol=1e-4)  # Eckart-Young


def test_cat_is_exact_weighted_sum_of_deltas():
    g = torch.Generator().manual_seed(3)
    a, b = _lora(2, g), _lora(3, g)
    cat = merge.lora_cat([a, b], [0.25, 2.0])
    assert cat["m2.lora_A.weight"].shape == (5, 5)
    exact = merge.linear([merge.lora_to_delta(a, 1.0), merge.lora_to_delta(b, 1.0)], [0.25, 2.0])
    got = merge.lora_to_delta(cat, 1.0)
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], atol=1e-5, rtol=1e-5)


def test_factor_average_is_not_delta_average():
    g = torch.Generator().manual_seed(4)
    a, b = _lora(2, g), _lora(2, g)
    factor = merge.lora_to_delta(merge.average([a, b]), 1.0)
    exact = merge.average([merge.lora_to_delta(a, 1.0), merge.lora_to_delta(b, 1.0)])
    assert not torch.allclose(factor["m1.delta"], exact["m1.delta"], atol=1e-3)


def test_unpaired_factor_raises():
    sd = _lora(2, torch.Generator().manual_seed(5))
    del sd["m1.lora_B.weight"]
    with pytest.raises(ValueError, match="m1"):
        merge.lora_to_delta(sd, 1.0)
