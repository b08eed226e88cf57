import math

import pytest
import torch

from merge import pam_align


def _reference(temp, glob, percent):
    """Literal reading of PAM Algorithm 1, element by element."""
    mags = sorted((abs(float(x)) for v in glob.values() for x in v.flatten()), reverse=True)
    k = math.ceil(percent / 100 * len(mags))
    tau = mags[k - 1] if k else math.inf
    bad = {}
    for key in glob:
        t, g = temp[key].flatten().tolist(), glob[key].flatten().tolist()
        bad[key] = [
            (math.copysign(1, a) if a else 0) != (math.copysign(1, b) if b else 0) and b != 0 and abs(b) >= tau
            for a, b in zip(t, g)
        ]
    return bad


@pytest.mark.parametrize("percent", [0, 10, 33.3, 50, 100])
def test_resets_exactly_the_defined_elements(percent):
    g = torch.Generator().manual_seed(3)
    glob = {"x": torch.randn(4, 5, generator=g), "y": torch.randn(9, generator=g)}
    glob["x"][0, 0] = 0.0  # zero global weight: never a reason to reset
    temp = {k: torch.randn(v.shape, generator=g) for k, v in glob.items()}
    temp["y"][2] = 0.0  # zero temp vs nonzero global: signs differ
    aligned, n = pam_align(temp, glob, percent)
    ref = _reference(temp, glob, percent)
    assert n == sum(sum(b) for b in ref.values())
    for key in glob:
        mask = torch.tensor(ref[key]).reshape(glob[key].shape)
        torch.testing.assert_close(aligned[key], torch.where(mask, glob[key], temp[key]))
    if percent == 0:
        assert n == 0


def test_threshold_is_inclusive_for_ties():
    glob = {"w": torch.tensor([3.0, 2.0, 2.0, 1.0])}
    temp = {"w": -glob["w"]}
    # k = ceil(0.5 * 4) = 2 -> tau = 2.0; both 2.0's are at the threshold and count
    _, n = pam_align(temp, glob, 50)
    assert n == 3


def test_reinit_zero_and_inputs_untouched():
    glob = {"w": torch.tensor([1.0, -1.0, 0.5])}
    temp = {"w": torch.tensor([-2.0, -3.0, 4.0])}
    keep = temp["w"].clone()
    aligned, n = pam_align(temp, glob, 100, reinit="zero")
    assert n == 1 and aligned["w"].tolist() == [0.0, -3.0, 4.0]
    assert torch.equal(temp["w"], keep)


def test_bad_arguments():
    glob = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="percent"):
        pam_align(glob, glob, 101)
    with pytest.raises(ValueError, match="reinit"):
        pam_align(glob, glob, 50, reinit="random")
    with pytest.raises(ValueError, match="'[vw]'"):
        pam_align({"v": torch.ones(2)}, glob, 50)


@pytest.mark.parametrize("percent", [10, 50])
def test_per_tensor_threshold_is_the_global_rule_on_each_tensor_alone(percent):
    g = torch.Generator().manual_seed(5)
    glob = {"big": 10 * torch.randn(6, 4, generator=g), "small": 0.1 * torch.randn(12, generator=g)}
    temp = {k: torch.randn(v.shape, generator=g) for k, v in glob.items()}
    aligned, n = pam_align(temp, glob, percent, per_tensor=True)
    total = 0
    for key in glob:
        alone, m = pam_align({key: temp[key]}, {key: glob[key]}, percent)
        torch.testing.assert_close(aligned[key], alone[key])
        total += m
    assert n == total
    # one global τ protects only the large tensor at these percentages; per tensor protects both
    glob_aligned, _ = pam_align(temp, glob, percent)
    assert torch.equal(glob_aligned["small"], temp["small"])
    assert not torch.equal(aligned["small"], temp["small"])
