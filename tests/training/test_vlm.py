"""The ``vlm`` task on tiny random LLaVA and PaliGemma models built from config objects (no download).

The processors are real ``LlavaProcessor`` / ``PaliGemmaProcessor`` objects over a tokenizer built here from
the project's word list (a ``tokenizers`` WordPiece wrapped in ``PreTrainedTokenizerFast``).
"""

import os
import sys

import peft
import pytest
import torch
from peft import set_peft_model_state_dict

import merge
from training.data.scenes import VqaSamples, make_family
from training.lora import LoraSettings, materialise
from training.tasks import Task, attach_lora, get_task, predict
from training.tasks.vlm import VlmTask, normalize_answer

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/_tiny_vlm.py
from _tiny_vlm import tiny_llava, tiny_paligemma  # noqa: E402

torch.set_num_threads(1)
SETTINGS = LoraSettings(rank=4, alpha=8.0)


BUILDERS = {"llava": tiny_llava, "paligemma": tiny_paligemma}


@pytest.fixture(scope="module", params=list(BUILDERS))
def task(request) -> VlmTask:
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def samples() -> VqaSamples:
    a, b = make_family("color", 4, seed=3), make_family("where", 4, seed=3)
    return VqaSamples(torch.cat([a.images, b.images]), a.questions + b.questions, torch.cat([a.answers, b.answers]))


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.inputs).logits


def test_is_a_task(task):
    assert isinstance(task, Task)


def test_targets_are_the_decoders_linears(task):
    model = task.build_base(0)
    names = task.lora_targets(model)
    leaves = {n.split(".")[-1] for n in names}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaves
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert not any("vision" in n or "projector" in n or n == "lm_head" for n in names)


def test_loss_sees_only_answer_tokens(task, samples):
    b = task.make_batch(samples)
    for i, ans in enumerate(b.targets):
        want = task.tokenizer(ans, add_special_tokens=False)["input_ids"] + [task.tokenizer.eos_token_id]
        kept = b.labels[i][b.labels[i] != -100]
        assert kept.tolist() == want  # answer + EOS, nothing of the prompt
        pos = (b.labels[i] != -100).nonzero().flatten()
        assert torch.equal(b.inputs["input_ids"][i, pos], kept)
        assert b.inputs["attention_mask"][i, pos].all()
    # generation prompts are left-padded: every row ends with its last prompt token
    assert b.prompt_inputs["attention_mask"][:, -1].all()


def test_training_reduces_loss_and_fold_is_exact(task, samples):
    base = task.build_base(0)
    pm = attach_lora(task, base, SETTINGS, seed=0)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in pm.named_parameters() if p.requires_grad
    )
    b = task.make_batch(samples)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    losses = []
    for _ in range(12):
        loss = task.loss(pm, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    before = _logits(pm, b)
    folded = pm.merge_and_unload()
    assert not any("lora_" in n for n, _ in folded.named_modules())
    torch.testing.assert_close(_logits(folded, b), before, atol=1e-4, rtol=1e-4)


def _random_adapter(pm, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = peft.get_peft_model_state_dict(pm)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_merge_two_adapters_then_fold(task, samples):
    """Factor-space average (PAM's merge) and ΔW-space average, each folded into the weights."""
    b = task.make_batch(samples)
    base = task.build_base(0)
    pm = attach_lora(task, task.build_base(0), SETTINGS, seed=0)
    a1, a2 = _random_adapter(pm, 1), _random_adapter(pm, 2)
    # factor space: merge.average over LoRA factors, served through peft and folded two ways
    set_peft_model_state_dict(pm, merge.average([a1, a2]))
    ref = _logits(pm, b)
    prefix = "base_model.model."
    delta = merge.lora_to_delta(
        {k.removeprefix(prefix): v for k, v in merge.average([a1, a2]).items()}, SETTINGS.scaling
    )
    torch.testing.assert_close(_logits(materialise(base, delta), b), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(pm.merge_and_unload(), b), ref, atol=1e-4, rtol=1e-4)
    # ΔW space: average the dense deltas; equals the exact rank-2r concatenation served by peft
    deltas = [
        merge.lora_to_delta({k.removeprefix(prefix): v for k, v in a.items()}, SETTINGS.scaling) for a in (a1, a2)
    ]
    folded = materialise(base, merge.linear(deltas, [0.5, 0.5]))
    cat_cfg = LoraSettings(rank=2 * SETTINGS.rank, alpha=SETTINGS.scaling * 2 * SETTINGS.rank)
    pm2 = attach_lora(task, task.build_base(0), cat_cfg, seed=0)
    set_peft_model_state_dict(pm2, merge.lora_cat([a1, a2], [0.5, 0.5]))
    torch.testing.assert_close(_logits(folded, b), _logits(pm2, b), atol=1e-4, rtol=1e-4)


def test_generate_and_respond(task, samples):
    model = task.build_base(0)
    b = task.make_batch(samples)
    out = task.forward(model, b)
    assert out.shape[0] == len(samples) and out.shape[1] <= task.max_new_tokens
    body = task.respond(out, top_k=3)
    assert len(body) == len(samples) and all(set(r) == {"answer", "score", "top_k"} for r in body)
    preds = predict(task, model, b)
    assert 0.0 <= task.score(preds, b.targets) <= 1.0
    assert task.score(b.targets, b.targets) == 1.0


def test_normalize_answer():
    assert normalize_answer("The Top-Left.") == "top left" == normalize_answer("top - left")
    assert normalize_answer("Two") == "2"
    assert normalize_answer("an orange!") == "orange"


def test_registry_builds_from_parts():
    t = tiny_llava()
    assert isinstance(get_task("vlm", build=t._build, processor=t.processor), VlmTask)
    with pytest.raises(KeyError, match="registered"):
        get_task("nope")


def test_a_saved_checkpoint_directory_loads_offline(samples):
    """What a server config names (``tasks: {vlm: {args: {model_id: <dir>}}}``): a local directory, loaded
    with the Auto classes and no network, gives the saved model's outputs."""
    from _tiny_vlm import tiny_llava_dir

    t = get_task("vlm", model_id=tiny_llava_dir())
    assert t.prompt.startswith("USER:") and isinstance(t, Task)
    again = get_task("vlm", model_id=tiny_llava_dir())
    b = t.make_batch(samples.subset(slice(0, 2)))
    assert torch.equal(_logits(t.build_base(0), b), _logits(again.build_base(5), b))  # weights, not seeds


def test_the_input_size_comes_from_the_processor(task):
    assert task.image_size == 32  # both tiny processors crop / resize to 32 px
