import pytest
import torch

import merge
from training.bench import domain_orders, format_table, run_one
from training.lora import LoraSettings, get_adapter
from training.strategies import STRATEGIES, TrainSettings, create_strategy


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_each_method_end_to_end(method, tiny_ctx, tiny_bench):
    run = run_one(method, tiny_ctx, tiny_bench, ["d0", "d1", "d2"], {})
    assert len(run["A"]) == 3 and all(len(r) == 3 for r in run["A"])
    assert all(0.0 <= v <= 1.0 for r in run["A"] for v in r)
    assert set(run["metrics"]) >= {"ACC", "BWT", "FWT", "A_t", "A_m"}
    s = create_strategy(method, tiny_ctx)
    tensors, fmt = s.adapter()
    assert fmt in ("lora", "delta") and all(torch.isfinite(v).all() for v in tensors.values())


def test_pam_aligns_on_schedule_and_changes_adapter(tiny_ctx, tiny_bench, monkeypatch):
    calls = []
    real = merge.pam_align

    def spy(temp, global_, percent, reinit="global", per_tensor=False):
        out, n = real(temp, global_, percent, reinit, per_tensor)
        calls.append((n, any(not torch.equal(out[k], temp[k]) for k in temp)))
        return out, n

    monkeypatch.setattr(merge, "pam_align", spy)
    tiny_ctx.train.steps = 6
    tiny_ctx.train.lr = 0.5  # large steps so signs flip and alignment has something to reset
    s = create_strategy("pam", tiny_ctx, every=2, percent=50.0)
    for i, d in enumerate(tiny_bench.domains):
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        assert len(calls) == 3 * i  # never on the first domain (no global yet), then every 2 of 6 steps
        s.end_domain()
    assert s.align_calls == 6 and s.n_reset == sum(n for n, _ in calls) > 0
    assert all(changed == (n > 0) for n, changed in calls)


@pytest.mark.parametrize(
    "hyper",
    [{"align_last": False}, {"align_head": False}, {"threshold": "per_tensor"}],
    ids=["no-last-step", "no-head", "per-tensor"],
)
def test_pam_alignment_options(hyper, tiny_ctx, tiny_bench, monkeypatch):
    seen = []
    real = merge.pam_align

    def spy(temp, global_, percent, reinit="global", per_tensor=False):
        seen.append((sorted(temp), per_tensor))
        return real(temp, global_, percent, reinit, per_tensor)

    monkeypatch.setattr(merge, "pam_align", spy)
    tiny_ctx.train.steps, tiny_ctx.train.lr = 6, 0.5
    s = create_strategy("pam", tiny_ctx, every=2, percent=50.0, **hyper)
    d0, d1 = tiny_bench.domains[:2]
    for _ in range(s.begin_domain(d0)):
        s.train_step(*d0.batch(torch.arange(8)))
    s.end_domain()
    for _ in range(s.begin_domain(d1)):
        s.train_step(*d1.batch(torch.arange(8)))
    keys = sorted(get_adapter(s.learner.model))
    assert len(seen) == (2 if hyper.get("align_last") is False else 3)  # steps 2, 4 (and 6)
    lora_only = sorted(k for k in keys if "lora_" in k)
    assert all(k == (lora_only if hyper.get("align_head") is False else keys) for k, _ in seen)
    assert len(lora_only) < len(keys)  # the tiny model has a trained head to exclude
    assert all(p == (hyper.get("threshold") == "per_tensor") for _, p in seen)


def test_merge_strategy_merges_into_global(tiny_ctx, tiny_bench):
    s = create_strategy("average", tiny_ctx)
    d0, d1 = tiny_bench.domains[:2]
    for d in (d0,):
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        s.end_domain()
    g = get_adapter(s.learner.model)
    for _ in range(s.begin_domain(d1)):
        s.train_step(*d1.batch(torch.arange(8)))
    temp = get_adapter(s.learner.model)
    s.end_domain()
    after = get_adapter(s.learner.model)
    for k in g:
        torch.testing.assert_close(after[k], (g[k] + temp[k]) / 2)


@pytest.mark.parametrize("base", ["linear", "ties", "dare_ties"])
def test_adaptive_coefficients_bounded_and_learned(tiny_ctx, tiny_bench, base):
    s = create_strategy("adaptive", tiny_ctx, base=base, b_max=3.0, spc=2, fit_steps=15)
    for d in tiny_bench.domains[:2]:
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        s.end_domain()
    init = merge.AdaptiveCoefficients(2, 3.0)().detach()
    assert s.alpha.shape == (2,)
    assert bool((s.alpha > 0).all() and (s.alpha < 3.0).all())
    assert not torch.allclose(s.alpha, init, atol=1e-3)  # the coefficients moved
    assert len(s.buffer) == 2 * 2 * 3  # spc x domains x classes
    tensors, fmt = s.adapter()
    assert fmt == "delta" and any(k.endswith(".delta") for k in tensors)


def _learn(s, domains):
    for d in domains:
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        s.end_domain()


@pytest.mark.parametrize("base", ["linear", "ties"])
def test_adaptive_fixed_w_is_the_plain_merge_with_weight_w(tiny_ctx, tiny_bench, base, monkeypatch):
    from training.strategies import adaptive as ad

    monkeypatch.setattr(ad, "fit_merge", lambda *a, **k: pytest.fail("fixed W must not fit α"))
    s = create_strategy("adaptive", tiny_ctx, base=base, fixed_w=3)
    _learn(s, tiny_bench.domains[:2])
    assert s.alpha.tolist() == [3.0, 3.0]
    want = ad.merge_task_vectors(s.tvs, torch.full((2,), 3.0), s.init_delta, s.hyper)
    got, fmt = s.adapter()
    assert fmt == "delta" and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_adaptive_oracle_fits_on_the_held_out_sets(tiny_ctx, tiny_bench, monkeypatch):
    from training.strategies import adaptive as ad

    sizes, real = [], ad.fit_merge
    monkeypatch.setattr(ad, "fit_merge", lambda ctx, tvs, init, samples, h, c: sizes.append(
        len(samples.domain().y_train)) or real(ctx, tvs, init, samples, h, c))
    s = create_strategy("adaptive", tiny_ctx, oracle=True, fit_steps=3)
    _learn(s, tiny_bench.domains[:2])
    n_test = [len(d.y_test) for d in tiny_bench.domains[:2]]
    assert sizes == [n_test[0], sum(n_test)]


def test_adaptive_head_mean_serves_the_mean_of_the_trained_heads(tiny_ctx, tiny_bench):
    s = create_strategy("adaptive", tiny_ctx, head="mean", base="ties", density=0.2, fit_steps=3)
    _learn(s, tiny_bench.domains[:2])
    merged, _ = s.adapter()
    heads = [k for k in merged if not k.endswith(".delta")]
    assert heads
    for k in heads:  # task vectors are (trained head − initial head): their mean plus the initial head
        torch.testing.assert_close(merged[k], s.init_delta[k] + (s.tvs[0][k] + s.tvs[1][k]) / 2)


def test_adaptive_shared_head_trains_later_domains_under_the_first_head(tiny_ctx, tiny_bench):
    s = create_strategy("adaptive", tiny_ctx, freeze_head=True, head="mean", fit_steps=3)
    _learn(s, tiny_bench.domains)
    heads = [k for k in s.tvs[0] if not k.endswith(".delta")]
    assert heads and any(s.tvs[0][k].abs().sum() > 0 for k in heads)  # the first domain trained its head
    for tv in s.tvs[1:]:
        for k in heads:
            torch.testing.assert_close(tv[k], s.tvs[0][k])
        assert any(v.abs().sum() > 0 for k, v in tv.items() if k.endswith(".delta"))  # LoRA still trained
    indep = tiny_ctx.independent_cache
    assert set(indep) == {(tiny_bench.domains[0].name, 0)}  # later shared-head adapters are not cached


def test_adaptive_controls_are_benchmark_only():
    from training.hyper import HyperError, parse_bench_hyper, parse_hyper

    assert parse_bench_hyper("adaptive@w3", {"fixed_w": 3}).fixed_w == 3
    for bad in ({"fixed_w": 3}, {"oracle": True}, {"freeze_head": True}):
        with pytest.raises(HyperError, match="unknown hyper-parameter"):
            parse_hyper("adaptive", bad)  # the server's door


def test_variant_labels_run_one_method_under_several_settings(tiny_ctx, tiny_bench):
    from training.configs import BenchConfig

    cfg = BenchConfig(methods=["pam", "pam@p0"], hyper={"pam@p0": {"percent": 0}})
    assert cfg.hyper["pam@p0"] == {"percent": 0}
    for bad in (["pam@x@y"], ["nope@x"], ["pam", "pam"], ["pam@a.b"]):
        with pytest.raises(ValueError, match="unknown or repeated"):
            BenchConfig(methods=bad)
    with pytest.raises(ValueError, match="percent"):
        BenchConfig(methods=["pam@p"], hyper={"pam@p": {"percent": 101}})
    tiny_ctx.train.steps, tiny_ctx.train.lr = 4, 0.5
    runs = {m: run_one(m, tiny_ctx, tiny_bench, ["d0", "d1"], h) for m, h in
            [("pam", {"every": 2}), ("pam@p0", {"every": 2, "percent": 0})]}
    assert runs["pam"]["n_reset"] > 0 and runs["pam@p0"]["n_reset"] == 0


@pytest.mark.parametrize("pool_batch", ["fixed", "per_domain"])
def test_joint_draws_its_batches_from_the_pool_of_domains_seen(pool_batch, tiny_ctx, tiny_bench, monkeypatch):
    s = create_strategy("joint", tiny_ctx, pool_batch=pool_batch)
    drawn: list[torch.Tensor] = []
    monkeypatch.setattr(s.learner, "train_step", lambda x, y: drawn.append(y) or torch.tensor(0.0))
    per_domain = pool_batch == "per_domain"
    for t, d in enumerate(tiny_bench.domains, 1):
        s.begin_domain(d)
        s.train_step(*d.batch(torch.arange(4)))
        s.end_domain()
        assert len(drawn[-1]) == 4 * (t if per_domain else 1)  # a sequential method's batch per pooled domain
        assert len(s.pool.y_train) == sum(len(x.y_train) for x in tiny_bench.domains[:t])


def test_orders_and_table(tiny_ctx, tiny_bench):
    orders = domain_orders(["a", "b", "c"], 3, 0)
    assert orders[0] == ["a", "b", "c"] and len({tuple(o) for o in orders}) == 3
    run = run_one("finetune", tiny_ctx, tiny_bench, ["d0", "d1"], {})
    res = {"results": {"finetune": {"mean_std": {k: (v, 0.0) for k, v in run["metrics"].items()}}}}
    assert "finetune" in format_table(res)


def test_unknown_method_lists_registered(tiny_ctx):
    with pytest.raises(KeyError, match="pam"):
        create_strategy("nope", tiny_ctx)


def test_parse_hyper():
    from training.bench import parse_hyper_args as parse_hyper

    assert parse_hyper(["adaptive.spc=5", "adaptive.base=linear", "pam.percent=30.5", "pam@x.align_head=false"]) == {
        "adaptive": {"spc": 5, "base": "linear"},
        "pam": {"percent": 30.5},
        "pam@x": {"align_head": False},
    }
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_hyper(["spc=5"])


def test_pam_adaptive_aligns_temporaries_and_learns_alpha(tiny_ctx, tiny_bench):
    tiny_ctx.train.steps, tiny_ctx.train.lr = 6, 0.5  # large steps so alignment has signs to reset
    s = create_strategy("pam_adaptive", tiny_ctx, every=2, percent=50.0, b_max=2.0, fit_steps=10)
    for i, d in enumerate(tiny_bench.domains):
        for _ in range(s.begin_domain(d)):
            s.train_step(*d.batch(torch.arange(8)))
        temp = get_adapter(s.trainer.learner.model)
        glob = s.trainer.global_
        s.end_domain()
        assert s.alpha.shape == (i + 1,) and bool((s.alpha > 0).all() and (s.alpha < 2.0).all())
        pam_global = get_adapter(s.trainer.learner.model)
        if glob is not None:  # the PAM global the next temporary is cloned from: Avg(W_G, W')
            for k in temp:
                torch.testing.assert_close(pam_global[k], (glob[k] + temp[k]) / 2)
    assert s.trainer.align_calls == 6 and s.trainer.n_reset > 0  # 3 per domain after the first
    assert len(s.tvs) == 3 and len(s.buffer) == 3 * 3
    tensors, fmt = s.adapter()
    assert fmt == "delta" and any(k.endswith(".delta") for k in tensors)
    assert 0.0 <= s.evaluate(tiny_bench.domains[0]) <= 1.0


def test_fast_preset(tmp_path, monkeypatch, capsys):
    import argparse

    from training import bench

    seen = []

    def fake_run_dil(cfg, progress=True):
        seen.append(cfg)
        return {"results": {}, "wall_s": 0.0, "device": "cpu"}

    monkeypatch.setattr(bench, "run_dil", fake_run_dil)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["dil", "--fast", "--out", str(tmp_path / "r.json")])) == 0
    out = ["--out", str(tmp_path / "r2.json")]
    assert bench.run(p.parse_args(["dil", "--fast", "--steps", "3", "--hyper", "ties.density=0.2", *out])) == 0
    fast, custom = seen
    assert set(fast.methods) == set(STRATEGIES)  # the smoke test covers every method
    assert (fast.orders, fast.train.steps, len(fast.benchmark_args["domains"])) == (1, 20, 2)
    assert custom.train.steps == 3 and custom.hyper == {"ties": {"density": 0.2}}
    assert bench.run(p.parse_args(["dil", "--fast", "--hyper", "ties.density=2", *out])) == 2
    assert "ties.density=2" in capsys.readouterr().err and len(seen) == 2  # rejected before running


VQA_METHODS = ["finetune", "average", "ties", "tall", "magmax", "pam", "joint", "independent"]


@pytest.fixture(scope="module")
def vqa_task():
    from training.data.scenes import ANSWERS
    from training.tasks.vilt import VqaModelConfig, build_vilt, tokenizer_from_vocab
    from training.tasks.vqa import VqaTask

    tok = tokenizer_from_vocab()
    model = build_vilt(VqaModelConfig(hidden=32, layers=2, heads=2, mlp=64, image_size=32, patch=8), len(tok), ANSWERS)
    return VqaTask(model=model, tokenizer=tok)


@pytest.mark.parametrize("method", VQA_METHODS)
def test_each_method_runs_on_the_vqa_task(method, vqa_task):
    """The same strategies, loop and merges on the second task: batches are the task's samples (with
    questions), loss and accuracy come from the task, LoRA targets from the model."""
    from training.data import load_benchmark
    from training.strategies import LearnerContext

    bench = load_benchmark("scenes_vqa", domains=["color", "count"], n_train=24, n_test=8)
    ctx = LearnerContext(vqa_task, vqa_task.build_base(), LoraSettings(rank=2, alpha=4.0),
                         TrainSettings(steps=3, batch_size=8, lr=1e-2), seed=0)
    run = run_one(method, ctx, bench, ["color", "count"], {})
    assert len(run["A"]) == 2 and all(0.0 <= v <= 1.0 for r in run["A"] for v in r)
    s = create_strategy(method, ctx)
    tensors, fmt = s.adapter()
    assert fmt == "lora" and tensors and all(".encoder." in k for k in tensors)  # the answer head is not adapted


def test_run_dil_with_a_task(tmp_path, monkeypatch):
    """``bench dil`` builds the task's model when the config names a task (the scenes_vqa preset, shrunk);
    without ``vary_data`` every seed trains on the same data, generated and prepared once."""
    import training.bench as bench_mod
    from training.bench import run_dil
    from training.configs import CONFIGS
    from training.recipes.vilt_scenes import VqaPretrainConfig, pretrain_vqa
    from training.tasks.vilt import VqaModelConfig

    w = str(tmp_path / "vilt.safetensors")
    pretrain_vqa(w, VqaPretrainConfig(model=VqaModelConfig(hidden=32, layers=2, heads=2, mlp=64, image_size=32,
                                                           patch=8), steps=2, batch_size=8, n_per_family=4, n_test=4,
                                      threads=1), progress=False)
    cfg = CONFIGS["scenes_vqa"].model_copy(update={
        "task_args": {"model_name": "vilt_scenes", "weights": w}, "methods": ["pam", "joint"], "orders": 1,
        "seeds": 2, "benchmark_args": {"domains": ["shape", "exist"], "n_train": 16, "n_test": 8},
        "train": TrainSettings(steps=2, batch_size=8, lr=1e-3),
    })
    assert not cfg.vary_data
    loads, load = [], bench_mod.load_benchmark
    monkeypatch.setattr(bench_mod, "load_benchmark", lambda *a, **k: loads.append(k) or load(*a, **k))
    res = run_dil(cfg, progress=False)
    assert set(res["results"]) == {"pam", "joint"}
    assert [(r["seed"], r["order"]) for r in res["results"]["pam"]["runs"]] == [
        (0, ["shape", "exist"]), (1, ["shape", "exist"])]
    assert len(loads) == 1 and "seed" not in loads[0]


def _vqa_configs() -> list[str]:
    from training.configs import CONFIGS

    return [name for name, cfg in CONFIGS.items() if cfg.task == "vqa"]


@pytest.mark.parametrize("name", _vqa_configs())
def test_vqa_configs_ask_every_domain_they_name(name):
    """A preset's families must be askable at its scene size (``relation`` needs two objects)."""
    from training.configs import CONFIGS
    from training.data import load_benchmark

    cfg = CONFIGS[name]
    bench = load_benchmark(cfg.benchmark, **{**cfg.benchmark_args, "n_train": 2, "n_test": 2})
    assert [d.name for d in bench.domains] == cfg.benchmark_args["domains"]


def test_run_dil_seeds_vary_the_data_and_pair_runs(tmp_path):
    """The scenes_vqa_new preset, shrunk: film_scenes with cached features, every seed its own data, the
    adaptive methods through the task's loss, paired intervals and a table that names its ddof."""
    from training.bench import format_table, run_dil
    from training.configs import CONFIGS
    from training.recipes.film_scenes import FilmPretrainConfig, pretrain_film

    w = str(tmp_path / "film")
    tiny = {"embed_dim": 8, "question_dim": 16, "channels": 8, "blocks": 2, "classifier_channels": 16, "hidden": 16,
            "norm_groups": 2, "image_size": 32}
    pretrain_film(w, FilmPretrainConfig(model=tiny, steps=2, batch_size=8, n_per_family=4, n_test=2), progress=False)
    cfg = CONFIGS["scenes_vqa_new"].model_copy(update={
        "task_args": {"weights": w}, "methods": ["finetune", "average", "pam", "adaptive", "pam_adaptive"],
        "orders": 1, "seeds": 2, "hyper": {"adaptive": {"fit_steps": 2}, "pam_adaptive": {"fit_steps": 2}},
        "benchmark_args": {"domains": ["where", "rel_shape"], "n_train": 12, "n_test": 6},
        "train": TrainSettings(steps=2, batch_size=4, lr=1e-3),
    })
    res = run_dil(cfg, progress=False)
    runs = res["results"]["pam"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and res["std_ddof"] == 1
    assert set(res["zero_shot"]) == {"where", "rel_shape"}
    assert {(d["pair"], d["metric"]) for d in res["paired"]} == {
        (p, k) for p in ("pam - average", "average - finetune", "pam - finetune") for k in ("ACC", "BWT")}
    assert all(d["n"] == 2 for d in res["paired"])
    table = format_table(res)
    assert "ddof=1" in table and "rel_shape" in table and "pam - average" in table
    assert len(res["results"]["adaptive"]["runs"][0]["alpha"]) == 2
    from training.data import load_benchmark

    a, b = (load_benchmark("scenes_vqa", domains=["where"], n_train=4, n_test=0, seed=s).domains[0] for s in (0, 1))
    assert a.q_train != b.q_train  # what vary_data hands each seed
    from training.bench import combine

    one = [run_dil(cfg.model_copy(update={"seed": s, "seeds": 1, "methods": ["finetune", "pam"]}), progress=False)
           for s in (0, 1)]
    both = combine(one)  # one process per seed, pooled: the same record as one run over both seeds
    assert both["seeds"] == [0, 1] and [r["seed"] for r in both["results"]["pam"]["runs"]] == [0, 1]
    assert both["results"]["pam"]["mean_std"] == res["results"]["pam"]["mean_std"]
    with pytest.raises(ValueError, match="share runs"):
        combine([one[0], one[0]])
    other = run_dil(cfg.model_copy(update={"seed": 0, "seeds": 1, "methods": ["finetune", "pam"], "benchmark_args": {
        **cfg.benchmark_args, "domains": ["rel_shape", "where"]}}), progress=False)
    three = combine([*one, other])  # seed 0 again, in another order (`--domains`): a run of its own
    assert [(r["seed"], r["order"][0]) for r in three["results"]["pam"]["runs"]] == [
        (0, "where"), (1, "where"), (0, "rel_shape")]
    # one method rerun over the same runs (its own part) replaces that method of an earlier record
    rerun = combine([{**p, "config": {**p["config"], "methods": ["pam"], "hyper": {"pam": {"percent": 30.0}}},
                      "results": {"pam": p["results"]["pam"]}} for p in reversed(one)])
    mixed = combine([both, rerun], keep=[["finetune"], None])
    assert list(mixed["results"]) == ["finetune", "pam"] and mixed["config"]["hyper"] == {"pam": {"percent": 30.0}}
    assert [r["seed"] for r in mixed["results"]["pam"]["runs"]] == [0, 1]  # paired with finetune's runs
    assert mixed["results"]["pam"]["mean_std"] == both["results"]["pam"]["mean_std"]
    with pytest.raises(ValueError, match="different hyper-parameters"):
        combine([both, rerun])
    with pytest.raises(ValueError, match="made 2 of the 3 runs"):
        combine([three, rerun], keep=[["finetune"], None])
    with pytest.raises(ValueError, match="no runs of"):
        combine([rerun], keep=[["finetune"]])
    import json

    from mergeserve.cli import main

    (tmp_path / "old.json").write_text(json.dumps(both))
    (tmp_path / "new.json").write_text(json.dumps(rerun))
    out = tmp_path / "pooled.json"
    assert main(["bench", "dil", "--combine", f"{tmp_path / 'old.json'}:finetune", str(tmp_path / "new.json"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["hyper"] == {"pam": {"percent": 30.0}}
    assert main(["bench", "dil", "--combine", str(tmp_path / "old.json"), str(tmp_path / "new.json"),
                 "--out", str(out)]) == 2  # pam twice, under two settings: a one-line error, no file change
    assert json.loads(out.read_text())["config"]["hyper"] == {"pam": {"percent": 30.0}}
