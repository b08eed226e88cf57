"""Every registry is a :class:`training.registry.Registry`: it lists its names, and an unknown name's KeyError
names the registered ones."""

from __future__ import annotations

import pytest

from training.artifacts import BUILDERS
from training.backbones import BACKBONES, get_spec
from training.configs import ALL_METHODS
from training.data import BENCHMARKS, load_benchmark
from training.recipes.vqa import RECIPES
from training.registry import Registry
from training.strategies import STRATEGIES
from training.tasks import TASKS, get_task

REGISTRIES = {
    "backbone": (BACKBONES, get_spec, {"vit_test", "vit_tiny_offline", "efficientnet_lite0_offline"}),
    "benchmark": (BENCHMARKS, load_benchmark, {"digits5", "folder", "scenes_vqa"}),
    "task": (TASKS, get_task, {"vqa", "vlm"}),
    "method": (STRATEGIES, STRATEGIES.get, {"finetune", "pam", "adaptive", "joint"}),
    "weights builder": (BUILDERS, BUILDERS.get, {"vit_tiny_offline", "vilt_scenes", "film_scenes"}),
    "VQA model": (RECIPES, RECIPES.get, {"vilt_scenes", "film_scenes"}),
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_registry_lists_its_names(kind: str) -> None:
    reg, _, some = REGISTRIES[kind]
    assert isinstance(reg, Registry) and reg.kind == kind
    assert some <= set(reg.names()) and reg.names() == sorted(reg) and len(reg) == len(reg.names())
    assert all(name in reg and reg[name] is reg.get(name) for name in reg)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_unknown_name_lists_the_registered_ones(kind: str) -> None:
    reg, lookup, _ = REGISTRIES[kind]
    with pytest.raises(KeyError) as e:
        lookup("no-such-name")
    assert f"unknown {kind} 'no-such-name'; registered: {reg.names()}" in str(e.value)
    assert "no-such-name" not in reg


def test_register_decorator_and_order() -> None:
    reg: Registry[int] = Registry("thing")

    @reg.register("b")
    def b() -> int:
        return 2

    assert reg.add("a", 1) == 1 and b() == 2
    assert list(reg) == ["b", "a"] and reg.names() == ["a", "b"] and reg.items() == [("b", b), ("a", 1)]
    assert repr(reg) == "Registry('thing', ['b', 'a'])"


def test_all_methods_is_every_strategy_oracles_last() -> None:
    assert sorted(ALL_METHODS) == STRATEGIES.names()
    assert ALL_METHODS[:6] == ["finetune", "average", "ties", "tall", "magmax", "pam"]
    assert ALL_METHODS[-2:] == ["joint", "independent"]
