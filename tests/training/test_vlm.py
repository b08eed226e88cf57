"""The ``vlm`` task on tiny random LLaVA and PaliGemma models built from config objects (no download).

The processors are real ``LlavaProcessor`` / ``PaliGemmaProcessor`` objects over a tokenizer built here from
the project's word list (a ``tokenizers`` WordPiece wrapped in ``PreTrainedTokenizerFast``).
"""

import peft
import pytest
import torch
from peft import set_peft_model_state_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

import merge
from training.data.scenes import VqaSamples, make_family
from training.lora import LoraSettings, materialise
from training.tasks import Task, attach_lora, get_task, predict
from training.tasks.vilt import VOCAB_DIR
from training.tasks.vlm import VlmTask, normalize_answer

torch.set_num_threads(1)
SETTINGS = LoraSettings(rank=4, alpha=8.0)


def _tokenizer() -> PreTrainedTokenizerFast:
    words = [w.strip() for w in (VOCAB_DIR / "vocab.txt").read_text().splitlines()[5:]]
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + words + ["user", "assistant", "answer", "en"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.add_tokens(["<image>"], special_tokens=True)  # never split by the pre-tokenizer
    return tok


def tiny_llava() -> VlmTask:
    tok = _tokenizer()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,  # CLIP's class token: 16 patches + 1 image tokens
        image_token="<image>",
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.3,  # random lm_head rows large enough that LoRA can move the logits
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return VlmTask(lambda seed: LlavaForConditionalGeneration(cfg), proc, model_type=cfg.model_type)


def tiny_paligemma() -> VlmTask:
    tok = _tokenizer()
    proc = PaliGemmaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16), tokenizer=tok
    )  # adds <image> and PaliGemma's <loc…>/<seg…> tokens to the tokenizer
    text = GemmaConfig(
        vocab_size=len(proc.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        initializer_range=0.3,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    vision.projection_dim = 32
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
    )
    return VlmTask(lambda seed: PaliGemmaForConditionalGeneration(cfg), proc, model_type=cfg.model_type)


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
