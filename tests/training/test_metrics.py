import pytest

from training import metrics

A = [[0.9, 0.2, 0.1], [0.7, 0.8, 0.3], [0.8, 0.6, 0.95]]


def test_by_hand():
    assert metrics.acc(A) == pytest.approx((0.8 + 0.6 + 0.95) / 3)
    assert metrics.bwt(A) == pytest.approx(((0.8 - 0.9) + (0.6 - 0.8)) / 2)
    assert metrics.fwt(A, [0.1, 0.1, 0.1]) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert metrics.a_m(A) == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    assert metrics.a_t([1.0, 0.9, 0.8]) == pytest.approx(0.9)
    # from the maximum: domain 0 peaked at 0.9 (t=0), domain 1 at 0.8 (t=1)
    assert metrics.forgetting_from_max(A) == pytest.approx(((0.9 - 0.8) + (0.8 - 0.6)) / 2)


def test_definitions_differ_when_merging_lifts_an_old_domain():
    lifted = [[0.5, 0.0], [0.9, 0.9]]
    assert metrics.bwt(lifted) == pytest.approx(0.4)  # positive backward transfer
    assert metrics.forgetting_from_max(lifted) == pytest.approx(-0.4)  # max over t<T-1 is 0.5
    three = [[0.5, 0, 0], [0.9, 0.8, 0], [0.7, 0.8, 0.9]]
    assert metrics.bwt(three) == pytest.approx(0.1)
    assert metrics.forgetting_from_max(three) == pytest.approx(0.1)


def test_single_domain_and_bad_shapes():
    assert metrics.bwt([[0.5]]) == 0.0 and metrics.fwt([[0.5]], [0.1]) == 0.0
    with pytest.raises(ValueError):
        metrics.acc([[0.1, 0.2]])
    with pytest.raises(ValueError):
        metrics.fwt(A, [0.1])
    s = metrics.summarize(A, [0.9, 0.9, 0.9], [0, 0, 0])
    assert set(s) == {"ACC", "BWT", "FWT", "A_t", "A_m", "forgetting_max"}


def test_paired_difference_by_hand_and_invariants():
    r = metrics.paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])  # differences 0.1, 0.2, 0.3
    half = 4.303 * 0.1 / 3**0.5  # t(0.975, df 2) × sd / √n
    assert r["mean"] == pytest.approx(0.2) and r["n"] == 3
    assert (r["lo"], r["hi"]) == pytest.approx((0.2 - half, 0.2 + half))
    same = metrics.paired_difference([0.3, 0.9, 0.5], [0.3, 0.9, 0.5])
    assert same["mean"] == same["lo"] == same["hi"] == 0.0  # a method against itself: exactly no difference
    shifted = metrics.paired_difference([0.32, 0.92, 0.53], [0.3, 0.9, 0.5])
    assert shifted["lo"] > 0  # a small but consistent gain is real, however different the runs are
    swapped = metrics.paired_difference([0.3, 0.9, 0.5], [0.32, 0.92, 0.53])
    assert (swapped["lo"], swapped["hi"]) == pytest.approx((-shifted["hi"], -shifted["lo"]))
    with pytest.raises(ValueError):
        metrics.paired_difference([0.1], [0.1, 0.2])
