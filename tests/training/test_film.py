"""``film_scenes``: the FiLM VQA model (training/tasks/film.py), its files (training/tasks/film_scenes.py),
its pretraining (training/recipes/film_scenes.py) and its task (training/tasks/vqa.py: FilmVqaTask), on a tiny
config."""

import copy
import hashlib
import json
import os

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModel, BertTokenizerFast

import merge
from training import artifacts
from training.data import load_benchmark
from training.data.scenes import ANSWERS, VqaSamples, make_family
from training.lora import LoraSettings, get_adapter, materialise, set_adapter
from training.recipes import film_scenes as fr
from training.tasks import Task, attach_lora, evaluate, get_task, predict, prepare
from training.tasks import film_scenes as fs
from training.tasks.film import FilmVqaConfig, FilmVqaModel, register_auto
from training.tasks.vilt import tokenizer_from_vocab
from training.tasks.vqa import FilmVqaTask

torch.set_num_threads(1)
TINY = {"embed_dim": 8, "question_dim": 16, "channels": 8, "blocks": 2, "classifier_channels": 16, "hidden": 16,
        "norm_groups": 2, "image_size": 32}
SETTINGS = LoraSettings(rank=2, alpha=4.0)


def tiny_recipe(**kw) -> fr.FilmPretrainConfig:
    return fr.FilmPretrainConfig(model=TINY, steps=3, batch_size=8, n_per_family=6, n_test=4, **kw)


@pytest.fixture(scope="module")
def task() -> FilmVqaTask:
    tok = tokenizer_from_vocab()
    model = fs.build_film(FilmVqaConfig(vocab_size=len(tok), answers=ANSWERS, **TINY), seed=0)
    return FilmVqaTask(model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def samples() -> VqaSamples:
    return make_family("where", 24, seed=3)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.inputs).logits


def _trained_lora(task, samples, steps: int = 5):
    pm = attach_lora(task, task.build_base(), SETTINGS, seed=0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    b = task.make_batch(prepare(task, samples))
    pm.train()
    for _ in range(steps):
        loss = task.loss(pm, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm


def test_a_registered_task_with_its_model_name(task):
    assert isinstance(task, Task) and task.model_name == "film_scenes" and task.answers == ANSWERS
    with pytest.raises(KeyError, match="film_scenes"):
        get_task("vqa", model_name="nope")


def test_lora_adapts_every_linear_and_conv_outside_the_trunk(task):
    model = task.build_base()
    names = task.lora_targets(model)
    kinds = {type(model.get_submodule(n)) for n in names}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d} and not any(n.startswith("trunk") for n in names)
    assert {"film", "stem", "answer", "blocks.0.conv2"} <= set(names)  # a 3×3 conv too
    every = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(names) == sorted(n for n in every if not n.startswith("trunk"))
    assert not any(isinstance(m, torch.nn.GRU) for m in model.modules())  # a Linear question encoder
    pm = attach_lora(task, task.build_base(), SETTINGS)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_trunk_holds_the_imagenet_weights_and_stays_frozen_in_train_mode(task, samples):
    model = task.build_base()
    want = fs.trunk_state(model)
    assert all(torch.equal(model.trunk.state_dict()[k], v) for k, v in want.items())
    pm = _trained_lora(task, VqaSamples(samples.images, samples.questions, samples.answers), steps=2)  # pixels
    after = pm.get_base_model().trunk.state_dict()
    assert all(torch.equal(after[k], v) for k, v in want.items())  # BatchNorm statistics included
    assert not pm.get_base_model().trunk.training


def test_cached_features_give_exactly_the_pixel_path(task, samples):
    """The cache is exact: the trunk is never adapted, so features computed once serve every adapter."""
    prepared = prepare(task, samples)
    assert prepared.features.shape == (len(samples), 40, 4, 4) and prepare(task, prepared) is prepared
    pm = _trained_lora(task, samples)
    with_pixels, with_features = task.make_batch(samples), task.make_batch(prepared)
    assert "pixel_values" in with_pixels.inputs and "image_features" in with_features.inputs
    torch.testing.assert_close(_logits(pm, with_features), _logits(pm, with_pixels), atol=1e-5, rtol=1e-5)
    d = prepare(task, load_benchmark("scenes_vqa", domains=["where"], n_train=6, n_test=4).domains[0])
    assert d.train.features.shape[0] == 6 and d.test.features.shape[0] == 4
    assert d.batch(torch.tensor([1, 2]))[0].features.shape[0] == 2


def test_lora_fold_equals_peft_forward(task, samples):
    """ΔW = s·B·A of every target (3×3 convs included) folded by the server's ``materialise`` and by peft's
    ``merge_and_unload`` computes what the adapter model computes."""
    base = task.build_base()
    pm = _trained_lora(task, samples)
    b = task.make_batch(prepare(task, samples))
    ref = _logits(pm, b)
    adapter = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    assert adapter["blocks.0.conv2.lora_A.weight"].shape == (SETTINGS.rank, TINY["channels"], 3, 3)
    own = materialise(base, merge.lora_to_delta(adapter, SETTINGS.scaling))
    torch.testing.assert_close(_logits(own, b), ref, atol=1e-5, rtol=1e-5)
    folded = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(_logits(folded, b), ref, atol=1e-5, rtol=1e-5)
    assert predict(task, own, b) == predict(task, pm, b)


def test_merged_adapters_fold_like_their_average(task, samples):
    """Two adapters averaged in factor space (PAM's merge) load into peft and fold identically."""
    a = get_adapter(_trained_lora(task, samples, steps=2))
    c = get_adapter(_trained_lora(task, make_family("color", 24, seed=4), steps=2))
    avg = merge.average([a, c])
    pm = attach_lora(task, task.build_base(), SETTINGS)
    set_adapter(pm, avg)
    b = task.make_batch(prepare(task, samples))
    own = materialise(task.build_base(), merge.lora_to_delta(avg, SETTINGS.scaling))
    torch.testing.assert_close(_logits(own, b), _logits(pm, b), atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip(task, samples, tmp_path):
    model = task.build_base()
    model.save_pretrained(tmp_path)
    task.tokenizer.save_pretrained(tmp_path)
    again = FilmVqaModel.from_pretrained(str(tmp_path), local_files_only=True)
    tok = BertTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    q = samples.questions[0]
    assert tok(q)["input_ids"] == task.tokenizer(q)["input_ids"]
    b = task.make_batch(samples)
    torch.testing.assert_close(_logits(again, b), _logits(model, b), atol=0, rtol=0)
    register_auto()
    auto = AutoModel.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(auto, FilmVqaModel) and auto.config.answers == ANSWERS
    torch.testing.assert_close(_logits(auto, b), _logits(model, b), atol=0, rtol=0)


def test_pretraining_is_deterministic_and_ships_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path / "cache"))
    out = fs.weights_path()
    prov = fr.pretrain_film(out, tiny_recipe(), progress=False)
    assert prov["config"]["families"] == list(fr.BASE_FAMILIES) and prov["answers"] == ANSWERS
    assert set(prov["heldout_acc"]) >= {"where", "count", "rel_shape"}  # the new families' zero-shot too
    weights = os.path.join(out, fs.WEIGHTS)
    assert prov["sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert json.load(open(os.path.join(out, fs.PROVENANCE))) == prov
    assert fs.read_provenance(out) == {k: v for k, v in prov.items() if k != "sha256"}
    again = str(tmp_path / "again")
    fr.pretrain_film(again, tiny_recipe(), progress=False)  # the file differs only in its wall-time record
    first, second = load_file(weights), load_file(os.path.join(again, fs.WEIGHTS))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # seeded
    model, tok, p = fs.load_film()  # the default: the cache
    assert not any(q.requires_grad for q in model.parameters()) and len(tok) == model.config.vocab_size
    loaded = get_task("vqa", weights=out)
    assert isinstance(loaded, FilmVqaTask) and loaded.image_size == TINY["image_size"]


def test_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(fs, "SHIPPED", tmp_path / "not-shipped")
    with pytest.raises(FileNotFoundError):
        fs.load_film(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        fs.load_film(ensure_pretrained=False)


def test_missing_or_corrupt_cached_weights_are_built_by_the_registered_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(fs, "SHIPPED", tmp_path / "not-shipped")
    built = []

    def build(out: str) -> None:  # the registered recipe, on a tiny config
        built.append(out)
        fr.pretrain_film(out, tiny_recipe(), progress=False)

    monkeypatch.setattr(artifacts, "builder", lambda name: build if name == fs.NAME else None)
    fs.load_film()
    assert built == [fs.weights_path()]
    fs.load_film()
    assert len(built) == 1  # verified against provenance.json: not rebuilt
    with open(os.path.join(fs.weights_path(), fs.WEIGHTS), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) == b"\x00" else b"\x00")
    fs.load_film()
    assert len(built) == 2 and artifacts.verified(os.path.join(fs.weights_path(), fs.WEIGHTS),
                                                  os.path.join(fs.weights_path(), fs.PROVENANCE))


def test_shipped_model_is_the_default_and_matches_its_checksum():
    """The package ships the default model: files, provenance and checksum agree."""
    assert (fs.SHIPPED / fs.WEIGHTS).exists(), "training/assets/film_scenes/ is package data"
    prov = json.load(open(fs.SHIPPED / fs.PROVENANCE))
    assert prov["sha256"] == hashlib.sha256((fs.SHIPPED / fs.WEIGHTS).read_bytes()).hexdigest()
    assert prov["model_name"] == "film_scenes" and prov["answers"] == ANSWERS
    assert all(prov["heldout_acc"][f] >= 0.9 for f in ("color", "shape", "exist"))
    assert get_task("vqa").model_name == "film_scenes"
    pyproject = (fs.SHIPPED.parents[2] / "pyproject.toml").read_text()
    assert '"assets/film_scenes/*"' in pyproject  # shipped by pip install .
    recipe = fr.FilmPretrainConfig()
    assert {k: prov["config"][k] for k in ("steps", "n_per_family", "seed", "threads")} == {
        "steps": recipe.steps, "n_per_family": recipe.n_per_family, "seed": recipe.seed, "threads": recipe.threads}


def test_evaluate_reads_cached_features(task, samples):
    prepared = prepare(task, samples)
    assert evaluate(task, task.build_base(), prepared, batch_size=8) == evaluate(task, task.build_base(), samples)


def test_extra_answers_are_new_rows_a_lora_learns(tmp_path):
    """New answer words: a model pretrained with ``extra_answers`` has rows for them (after the scenes
    vocabulary, whose ids stay valid); a domain whose answers use one is accepted and its LoRA learns it."""
    from serving.archive import read_vqa_domain  # noqa: F401  (the upload check reads the model's answers)

    out = str(tmp_path / "film")
    prov = fr.pretrain_film(out, tiny_recipe(extra_answers=("pink",)), progress=False)
    assert prov["answers"] == [*ANSWERS, "pink"]
    with pytest.raises(ValueError, match="distinct"):
        fr.answer_vocabulary(("red",))
    task = get_task("vqa", weights=out)
    assert task.answers[-1] == "pink" and task.encode_answers(["pink", "red"]).tolist() == [len(ANSWERS), 0]
    s = make_family("color", 48, seed=5)
    red = s.answers == ANSWERS.index("red")
    s.answers[red] = len(ANSWERS)  # every red answer is now "pink"
    s = prepare(task, s)
    b = task.make_batch(s)
    assert "pink" not in predict(task, task.build_base(), b)
    pm = attach_lora(task, task.build_base(), LoraSettings(rank=4, alpha=8.0), seed=0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    pm.train()
    for _ in range(40):
        loss = task.loss(pm, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "pink" in predict(task, pm, b)


def test_probe_the_shipped_model_learns_a_family_it_never_saw():
    """The issue's probe in one family, on the shipped weights: zero-shot on ``where`` (never pretrained;
    its answers, the grid cells, never produced) is at most chance, and a short LoRA run lifts it by 25
    points or more; the adapter folds exactly."""
    from training.tasks.probe import probe

    task = get_task("vqa")
    bench = load_benchmark("scenes_vqa", domains=["where"], n_train=PROBE["n_train"], n_test=100, seed=7)
    r = probe(task, bench, "where", steps=PROBE["steps"], batch_size=PROBE["batch"], lr=PROBE["lr"])
    assert r["before"]["where"] <= 1 / 9 + 0.05, r  # chance: 9 cells
    assert r["after"]["where"] - r["before"]["where"] >= 0.25, r
    assert r["fold_mismatches"]["materialise"] == r["fold_mismatches"]["merge_and_unload"] == 0


PROBE = {"n_train": 300, "steps": 200, "batch": 32, "lr": 3e-3}  # ~15 s on one thread; where reached 0.94
