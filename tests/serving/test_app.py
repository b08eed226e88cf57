"""``mergeserve serve``'s flags → the server config (no Ray started)."""

import argparse

import pytest

from serving.app import add_arguments, config_from_args


def _cfg(*argv: str):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_no_flags_give_the_documented_defaults():
    cfg = _cfg()
    assert cfg.worker_idle_s == 120 and cfg.vqa.enabled and cfg.vqa.num_replicas == 1
    assert cfg.bootstrap and cfg.vqa.bootstrap == []


def test_vqa_scales_to_zero_after_the_idle_seconds_given():
    cfg = _cfg("--vqa-replicas", "auto", "--vqa-idle-s", "15", "--no-bootstrap", "--worker-idle-s", "0")
    a = cfg.vqa.autoscaling
    assert cfg.vqa.num_replicas == "auto" and a["min_replicas"] == 0 and a["max_replicas"] >= 1
    assert a["downscale_delay_s"] == a["downscale_to_zero_delay_s"] == 15
    assert cfg.worker_idle_s == 0 and cfg.bootstrap == [] and cfg.vqa.bootstrap == []  # flags compose


def test_serve_accepts_the_autoscaling_it_is_given():
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**_cfg("--vqa-replicas", "auto").vqa.autoscaling)  # Serve's own validation, not ours


@pytest.mark.parametrize("argv", [("--vqa-replicas", "many"), ("--worker-idle-s", "-1")])
def test_bad_flags_fail_before_anything_starts(argv):
    with pytest.raises(ValueError):
        _cfg(*argv)
