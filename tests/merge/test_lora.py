import copy

import pytest
import torch
from torch import nn

import merge

# Factor shapes per target kind: peft's LoRA on nn.Linear, on a 1×1 conv and on a 3×3 conv.
KINDS = {
    "linear": lambda r, o, i: ((r, i), (o, r)),
    "conv1x1": lambda r, o, i: ((r, i, 1, 1), (o, r, 1, 1)),
    "conv3x3": lambda r, o, i: ((r, i, 3, 3), (o, r, 1, 1)),
}


def _lora(rank, g, mods=("m1", "m2"), out_dim=6, in_dim=5, kind="linear"):
    sd = {}
    a_shape, b_shape = KINDS[kind](rank, out_dim, in_dim)
    for m in mods:
        sd[f"{m}.lora_A.weight"] = torch.randn(*a_shape, generator=g)
        sd[f"{m}.lora_B.weight"] = torch.randn(*b_shape, generator=g)
    sd["head.weight"] = torch.randn(3, in_dim, generator=g)
    return sd


def _mat(t):
    return t.flatten(1)  # linear factors unchanged; conv factors as the matrices they multiply as


@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_scaled_product(kind):
    sd = _lora(2, torch.Generator().manual_seed(0), kind=kind)
    d = merge.lora_to_delta(sd, 0.5)
    a, b = sd["m1.lora_A.weight"], sd["m1.lora_B.weight"]
    assert d["m1.delta"].shape == (b.shape[0], *a.shape[1:])  # the target weight's shape
    torch.testing.assert_close(_mat(d["m1.delta"]), 0.5 * _mat(b) @ _mat(a))
    torch.testing.assert_close(d["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [2, 4])
def test_svd_roundtrip_exact_when_rank_suffices(rank, kind):
    sd = _lora(2, torch.Generator().manual_seed(1), kind=kind)
    d = merge.lora_to_delta(sd, 2.0)
    back = merge.delta_to_lora(d, rank, 2.0)
    for k in ("lora_A", "lora_B"):  # same layout as peft's factors, rank changed
        want = list(sd[f"m1.{k}.weight"].shape)
        want[0 if k == "lora_A" else 1] = rank
        assert back[f"m1.{k}.weight"].shape == tuple(want)
    d2 = merge.lora_to_delta(back, 2.0)
    for k in d:
        torch.testing.assert_close(d2[k], d[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_svd_truncation_is_best_rank_r(kind):
    sd = _lora(4, torch.Generator().manual_seed(2), kind=kind)
    d = merge.lora_to_delta(sd, 1.0)
    back = merge.lora_to_delta(merge.delta_to_lora(d, 1, 1.0), 1.0)
    s = torch.linalg.svdvals(_mat(d["m1.delta"]))
    err = (back["m1.delta"] - d["m1.delta"]).norm()
    torch.testing.assert_close(err, s[1:].norm(), atol=1e-4, rtol=1e-4)  # Eckart-Young


@pytest.mark.parametrize("kind", KINDS)
def test_cat_is_exact_weighted_sum_of_deltas(kind):
    g = torch.Generator().manual_seed(3)
    a, b = _lora(2, g, kind=kind), _lora(3, g, kind=kind)
    cat = merge.lora_cat([a, b], [0.25, 2.0])
    assert cat["m2.lora_A.weight"].shape[:2] == (5, 5)
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


@pytest.mark.parametrize(
    ("a_shape", "b_shape"), [((2, 5), (6, 2, 1, 1)), ((2, 5, 1, 1), (6, 2)), ((2, 5, 3, 3), (6, 2, 3, 3))]
)
def test_mixed_or_non_pointwise_b_factors_raise(a_shape, b_shape):
    sd = {"m.lora_A.weight": torch.zeros(a_shape), "m.lora_B.weight": torch.zeros(b_shape)}
    with pytest.raises(ValueError, match="'m'"):
        merge.lora_to_delta(sd, 1.0)


class _Tiny(nn.Module):
    """A linear, a 1×1 conv and a 3×3 conv: every layer kind peft puts LoRA on here."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 6, 1)
        self.k3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.k3(self.pw(x)).mean((2, 3)))


def test_delta_equals_peft_merge_and_unload():
    """ΔW from the saved factors is exactly what peft itself adds to each weight when merging."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    base = _Tiny()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=["pw", "k3", "fc"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # peft starts B at 0 (ΔW = 0): give it values so the test means something
            p.data.normal_()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y_lora = pm(x)
    sd = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    assert sd["pw.lora_A.weight"].shape == (2, 4, 1, 1) and sd["pw.lora_B.weight"].shape == (6, 2, 1, 1)
    delta = merge.lora_to_delta(sd, 6 / 2)
    merged = pm.merge_and_unload()
    for m in ("pw", "k3", "fc"):
        w0, w1 = getattr(base, m).weight, getattr(merged, m).weight
        torch.testing.assert_close(w1 - w0, delta[f"{m}.delta"], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y_lora, atol=1e-5, rtol=1e-5)
