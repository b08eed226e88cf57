import subprocess
import sys
import typing

import pytest
import torch
from pydantic import ValidationError

from training.configs import BenchConfig
from training.hyper import HYPER, HyperError, parse_bench_hyper, parse_hyper
from training.lora import get_adapter
from training.online import ONLINE_METHODS, merge_into_global
from training.strategies import STRATEGIES, create_strategy
from training.strategies.merging import COMBINE_METHODS, combine
from training.strategies.sequential import train_context

FIELDS = [(m, f) for m, model in HYPER.items() for f in model.model_fields]


@pytest.mark.parametrize("method", sorted(HYPER))
def test_defaults_parse(method):
    h = parse_hyper(method, {})
    assert type(h) is HYPER[method] and h == HYPER[method]() == parse_hyper(method, None)
    assert h.steps is None and h.lr is None  # server defaults unless asked
    assert method in STRATEGIES  # every online method is also a benchmark strategy


def test_online_methods_are_the_registry():
    assert ONLINE_METHODS == tuple(HYPER)
    assert set(COMBINE_METHODS) == set(HYPER) - {"adaptive"}


@pytest.mark.parametrize("method", sorted(HYPER))
def test_unknown_key_names_it_and_lists_allowed(method):
    with pytest.raises(HyperError, match="'bogus'") as e:
        parse_hyper(method, {"bogus": 1})
    assert e.value.field == "bogus" and "allowed keys" in str(e.value)
    for k in HYPER[method].model_fields:
        assert k in str(e.value)


@pytest.mark.parametrize(("method", "field"), FIELDS)
def test_string_instead_of_value_names_field(method, field):
    with pytest.raises(HyperError, match=rf"{method}\.{field}='abc'.*allowed: ") as e:
        parse_hyper(method, {field: "abc"})
    assert e.value.field == field


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("every", 0, "≥ 1"),
        ("lr", 1e30, "in (0, 1.0]"),
        ("lr", 0, "in (0, 1.0]"),
        ("lr", float("nan"), "in (0, 1.0]"),
        ("steps", 0, "≥ 1"),
        ("steps", True, "integer"),  # a bool is not an integer
        ("steps", 2.0, "integer"),
        ("percent", 100.5, "in [0, 100]"),
        ("reinit", "random", "'global' or 'zero'"),
        ("density", 0, "in (0, 1]"),
        ("lam", -0.1, "≥ 0"),
        ("spc", 6, "in [1, 5]"),
        ("b_max", 0.5, "in [1, 10]"),
        ("fit_steps", 1001, "in [1, 1000]"),
        ("base", "dare_linear", "'linear' or 'ties' or 'dare_ties'"),
    ],
)
def test_out_of_range_names_field_and_range(field, value, allowed):
    methods = [m for m, model in HYPER.items() if field in model.model_fields]
    assert methods
    for m in methods:
        with pytest.raises(HyperError) as e:
            parse_hyper(m, {field: value})
        assert e.value.field == field and f"{m}.{field}=" in str(e.value) and allowed in str(e.value)


@pytest.mark.parametrize("method", sorted(HYPER))
def test_steps_over_server_maximum(method):
    assert parse_hyper(method, {"steps": 100}, max_steps=100).steps == 100
    with pytest.raises(HyperError, match=r"steps=101.*\[1, 100\]") as e:
        parse_hyper(method, {"steps": 101}, max_steps=100)
    assert e.value.field == "steps"


def test_ints_accepted_for_floats_and_values_kept():
    h = parse_hyper("pam_adaptive", {"lr": 1, "percent": 30, "b_max": 5, "every": 4, "reinit": "zero"})
    assert h.lr == 1.0 and isinstance(h.lr, float) and h.percent == 30.0 and h.b_max == 5.0
    assert (h.every, h.reinit, h.spc) == (4, "zero", 1)
    with pytest.raises(ValidationError):
        h.every = 5  # frozen: a parsed model cannot drift from what was validated


def test_unknown_method_and_non_dict():
    with pytest.raises(HyperError, match="methods: .*'pam'") as e:
        parse_hyper("joint", {})  # benchmark-only
    assert e.value.field is None
    assert parse_bench_hyper("joint", {"steps": 3}).steps == 3
    with pytest.raises(HyperError, match="must be an object"):
        parse_hyper("pam", [("every", 3)])


def test_every_field_has_a_bound_or_a_literal():
    for model in HYPER.values():
        for name, f in model.model_fields.items():
            assert f.metadata or typing.get_origin(f.annotation) is typing.Literal or f.annotation is bool, name


def test_bool_fields_are_strict_and_described():
    from training.hyper import allowed

    assert parse_hyper("pam", {"align_last": False}).align_last is False
    with pytest.raises(HyperError, match=r"pam.align_head='no'.*allowed: boolean \(default True\)"):
        parse_hyper("pam", {"align_head": "no"})
    assert allowed(HYPER["pam"].model_fields["align_last"]) == "boolean (default True)"


def test_module_is_torch_free():
    code = "import sys, training.hyper; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _two_domains(s, bench):
    """Train two domains; returns (W_G before the second merge, W', W_G after)."""
    d0, d1 = bench.domains[:2]
    for d in (d0, d1):
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        if d is d1:
            g, temp = s.global_, get_adapter(s.learner.model)
        s.end_domain()
    return g, temp, get_adapter(s.learner.model)


@pytest.mark.parametrize(
    ("method", "hyper", "default_differs"),
    [
        ("ties", {"density": 0.2}, True),
        ("tall", {"lam": 0.1}, True),
        ("pam", {"percent": 30, "every": 2}, False),
        ("average", {}, False),
        ("magmax", {}, False),
    ],
)
def test_server_merge_equals_benchmark_merge(method, hyper, default_differs, tiny_ctx, tiny_bench):
    s = create_strategy(method, tiny_ctx, **hyper)
    g, temp, bench_merged = _two_domains(s, tiny_bench)
    server_merged = merge_into_global(method, g, temp, parse_hyper(method, hyper))
    assert set(server_merged) == set(bench_merged)
    for k in bench_merged:
        assert torch.equal(server_merged[k], bench_merged[k]), k  # bit-exact
    if default_differs:  # the hyper-parameter is honoured, not dropped
        default = merge_into_global(method, g, temp, parse_hyper(method, {}))
        assert any(not torch.equal(default[k], server_merged[k]) for k in default)


def test_combine_checks_its_inputs():
    a, b = {"w": torch.ones(3)}, {"w": torch.zeros(3)}
    assert merge_into_global("finetune", a, b, parse_hyper("finetune", {})) == b  # finetune: W_G = W'
    with pytest.raises(TypeError, match="TiesHyper"):
        combine("ties", a, a, {"density": 0.2})  # a dict would be dropped silently before
    with pytest.raises(TypeError, match="TiesHyper"):
        combine("ties", a, a, parse_hyper("tall", {}))
    with pytest.raises(ValueError, match="no global-LoRA merge"):
        merge_into_global("adaptive", None, a, parse_hyper("adaptive", {}))


def test_benchmark_rejects_bad_hyper(tiny_ctx):
    with pytest.raises(HyperError, match="'dens'"):
        create_strategy("ties", tiny_ctx, dens=0.2)
    with pytest.raises(HyperError, match=r"adaptive\.spc"):
        create_strategy("adaptive", tiny_ctx, spc=0)
    with pytest.raises(ValidationError, match=r"ties\.density"):
        BenchConfig(hyper={"ties": {"density": 2}})
    with pytest.raises(ValidationError, match="unknown method"):
        BenchConfig(hyper={"nope": {}})


def test_train_context_applies_and_validates(tiny_ctx, tiny_bench):
    assert train_context(tiny_ctx, parse_hyper("pam", {})) is tiny_ctx
    tiny_ctx.independent_cache[("d0", 0)] = {}
    c = train_context(tiny_ctx, parse_hyper("pam", {"steps": 7, "lr": 0.5}))
    assert (c.train.steps, c.train.lr, c.train.batch_size) == (7, 0.5, tiny_ctx.train.batch_size)
    assert (tiny_ctx.train.steps, tiny_ctx.train.lr) == (4, 0.05)  # the caller's settings are untouched
    assert c.independent_cache == {} and c.zero_shot_cache is tiny_ctx.zero_shot_cache
    assert create_strategy("ties", tiny_ctx, steps=3).begin_domain(tiny_bench.domains[0]) == 3
    with pytest.raises(ValidationError):
        train_context(tiny_ctx, parse_hyper("pam", {}).model_copy(update={"lr": -1.0}))  # re-validated
