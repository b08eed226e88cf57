"""The ``vqa`` task and its offline ViLT, on a tiny config (the published model is pretrained elsewhere)."""

import hashlib
import json
import os

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import merge
from training.data import load_benchmark
from training.data.scenes import ANSWERS, FAMILIES, VqaSamples, make_family
from training.lora import LoraSettings, materialise
from training.recipes.vilt_scenes import VqaPretrainConfig, pretrain_vqa
from training.tasks import TASKS, Task, attach_lora, evaluate, get_task, predict, vilt
from training.tasks.probe import probe
from training.tasks.vilt import (
    VOCAB_DIR,
    VqaModelConfig,
    build_vilt,
    load_vilt,
    tokenizer_from_vocab,
    weights_path,
)
from training.tasks.vqa import VqaTask

torch.set_num_threads(1)
TINY = VqaModelConfig(hidden=32, layers=2, heads=2, mlp=64, image_size=32, patch=8)
SETTINGS = LoraSettings(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_vocab()


@pytest.fixture(scope="module")
def task(tok) -> VqaTask:
    model = build_vilt(TINY, len(tok), ANSWERS, seed=0)
    with torch.no_grad():  # a trained head's scale: the 0.02 init leaves a frozen head almost no logit range
        model.classifier[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return VqaTask(model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def samples() -> VqaSamples:
    return make_family("shape", 48, seed=2)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.inputs).logits


def test_registered_and_a_task(task):
    assert "vqa" in TASKS and isinstance(task, Task)
    assert task.answers == ANSWERS and task.modules_to_save == ()


def test_project_vocab_covers_every_question(tok, tmp_path):
    unk = tok.unk_token_id
    for fam in FAMILIES:
        for q in make_family(fam, 30, seed=1).questions:
            assert unk not in tok(q)["input_ids"], q
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(str(tmp_path), local_files_only=True)
    q = "what color is the object left of the red object?"
    assert again(q)["input_ids"] == tok(q)["input_ids"]
    assert len(again) == len(tok) == len((VOCAB_DIR / "vocab.txt").read_text().split())


def test_lora_targets_every_encoder_linear_but_not_the_head(task):
    model = task.build_base()
    names = task.lora_targets(model)
    assert len(names) == 6 * TINY.layers  # q, k, v, attention output, MLP in, MLP out per layer
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert not any(n.startswith("classifier") or "pooler" in n for n in names)
    assert {"query", "value", "dense"} <= {n.split(".")[-1] for n in names}


def test_adapter_holds_only_lora_factors(task):
    pm = attach_lora(task, task.build_base(), SETTINGS)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the shared answer head stays frozen
    assert all(".lora_A." in k or ".lora_B." in k for k in get_peft_model_state_dict(pm))


def test_batch_and_response(task, samples):
    b = task.make_batch(samples.subset(slice(0, 5)))
    assert b.inputs["pixel_values"].shape == (5, 3, TINY.image_size, TINY.image_size)
    assert b.inputs["input_ids"].shape[0] == 5 and b.labels.tolist() == samples.answers[:5].tolist()
    assert b.targets == [ANSWERS[i] for i in samples.answers[:5].tolist()]
    body = task.respond(task.forward(task.build_base(), b), top_k=3)
    assert len(body) == 5
    for r in body:
        scores = [t["score"] for t in r["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6
        assert r["answer"] == r["top_k"][0]["answer"] and r["answer"] in ANSWERS
    assert task.score(["red", "blue"], ["red", "green"]) == 0.5


def test_unknown_answers_rejected(task):
    assert task.encode_answers(["red", "yes"]).tolist() == [ANSWERS.index("red"), ANSWERS.index("yes")]
    with pytest.raises(ValueError, match="vocabulary"):
        task.encode_answers(["red", "mauve"])


def test_lora_learns_and_folds_exactly(task, samples):
    base = task.build_base()
    pm = attach_lora(task, task.build_base(), SETTINGS, seed=0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    b = task.make_batch(samples)
    pm.train()
    losses = []
    for _ in range(15):
        loss = task.loss(pm, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # the head is frozen: LoRA alone lowers the loss
    ref = _logits(pm, b)
    adapter = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    own = materialise(base, merge.lora_to_delta(adapter, SETTINGS.scaling))  # the server's fold
    torch.testing.assert_close(_logits(own, b), ref, atol=1e-5, rtol=1e-5)
    preds = predict(task, pm, b)
    folded = pm.merge_and_unload()
    torch.testing.assert_close(_logits(folded, b), ref, atol=1e-5, rtol=1e-5)
    assert predict(task, folded, b) == preds == predict(task, own, b)
    assert 0.0 <= evaluate(task, folded, samples, batch_size=16) <= 1.0


def test_probe_reports_every_family_and_an_exact_fold(task):
    bench = load_benchmark("scenes_vqa", domains=["shape", "exist"], n_train=32, n_test=16)
    r = probe(task, bench, "shape", steps=3, batch_size=8, lora=SETTINGS)
    assert set(r["before"]) == set(r["after"]) == {"shape", "exist"} and set(r["forgetting"]) == {"exist"}
    assert r["fold_mismatches"] == {"merge_and_unload": 0, "materialise": 0, "of": 32}


def _tiny_recipe(**kw) -> VqaPretrainConfig:
    return VqaPretrainConfig(model=TINY, steps=3, batch_size=8, n_per_family=6, n_test=4, threads=1, **kw)


def test_pretrain_is_deterministic_and_loads(tmp_path, monkeypatch, samples):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path / "cache"))
    out = weights_path()
    assert out.startswith(str(tmp_path))
    prov = pretrain_vqa(out, _tiny_recipe(), progress=False)
    assert set(prov["heldout_acc"]) == set(FAMILIES) and prov["answers"] == ANSWERS
    assert json.load(open(out[: -len(".safetensors")] + ".json")) == prov
    first = load_file(out)
    pretrain_vqa(str(tmp_path / "again.safetensors"), _tiny_recipe(), progress=False)
    second = load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded, threads pinned
    model, tok, p = load_vilt()  # the default cache path, architecture read from the provenance
    assert p == {k: v for k, v in prov.items() if k != "sha256"} and not any(
        p.requires_grad for p in model.parameters()
    )
    assert prov["sha256"] == hashlib.sha256(open(out, "rb").read()).hexdigest()
    loaded = get_task("vqa", model_name="vilt_scenes")
    assert loaded.answers == ANSWERS and loaded.image_size == TINY.image_size
    b = loaded.make_batch(samples.subset(slice(0, 4)))
    torch.testing.assert_close(_logits(loaded.build_base(), b), _logits(model, b))


def test_shipped_weights_used_when_nothing_is_cached(tmp_path, monkeypatch):
    shipped = tmp_path / "assets" / "vilt_scenes.safetensors"
    pretrain_vqa(str(shipped), _tiny_recipe(), progress=False)
    monkeypatch.setattr(vilt, "SHIPPED", shipped)
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path / "empty"))
    assert vilt.default_weights() == str(shipped)
    assert load_vilt(ensure_pretrained=False)[2]["model"]["hidden"] == TINY.hidden


def test_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(vilt, "SHIPPED", tmp_path / "not-shipped.safetensors")
    with pytest.raises(FileNotFoundError):
        load_vilt(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_vilt(ensure_pretrained=False)
    assert not os.path.exists(weights_path())
