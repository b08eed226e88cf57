import pytest
import torch

import merge


@pytest.mark.parametrize("b_max", [1.0, 3.0, 5.0])
def test_alpha_bounds(b_max):
    m = merge.AdaptiveCoefficients(4, b_max)
    with torch.no_grad():
        m.c.copy_(torch.tensor([-30.0, -1.0, 1.0, 30.0]))
        m.b_raw.fill_(30.0)
    a = m().detach()
    assert a.shape == (4,)
    assert bool((a > 0).all()) and bool((a <= b_max).all())
    assert float(a[3]) == pytest.approx(b_max, rel=1e-4)


@pytest.mark.parametrize("name", ["linear", "ties", "dare_ties", "dare_linear", "magnitude_prune", "tall"])
def test_gradients_flow_to_coefficients(tvs, name):
    coef = merge.AdaptiveCoefficients(3, b_max=3.0)
    torch.manual_seed(0)
    out = merge.MERGE_METHODS[name](tvs, coef(), density=0.6)
    loss = sum((v - 1.0).pow(2).sum() for v in out.values())
    loss.backward()
    assert coef.c.grad is not None and float(coef.c.grad.abs().sum()) > 0
    assert float(coef.b_raw.grad.abs()) > 0


def test_coefficients_move_under_training(tvs):
    target = merge.linear(tvs, [2.0, 0.1, 1.0])
    coef = merge.AdaptiveCoefficients(3, b_max=3.0)
    opt = torch.optim.Adam(coef.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        out = merge.linear(tvs, coef())
        sum((out[k] - target[k]).pow(2).sum() for k in out).backward()
        opt.step()
    torch.testing.assert_close(coef().detach(), torch.tensor([2.0, 0.1, 1.0]), atol=0.05, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        merge.AdaptiveCoefficients(0)
    with pytest.raises(ValueError):
        merge.AdaptiveCoefficients(2, b_max=0.5)
    with pytest.raises(ValueError):
        merge.AdaptiveCoefficients(2, init_c=torch.zeros(3))
