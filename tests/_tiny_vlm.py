"""Tiny random LLaVA and PaliGemma ``vlm`` tasks built from config objects (no download), for the tests.

The processors are real ``LlavaProcessor`` / ``PaliGemmaProcessor`` objects over a tokenizer built here from
the project's word list (a ``tokenizers`` WordPiece wrapped in ``PreTrainedTokenizerFast``).
"""

import os
import tempfile

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

from training.tasks.vilt import VOCAB_DIR
from training.tasks.vlm import VlmTask


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


#: the layer sizes every tiny tower here shares (vision and text)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _text(tok: PreTrainedTokenizerFast, vocab_size: int) -> dict:
    """A tiny decoder's keyword arguments besides its head layout."""
    return {**TINY, "vocab_size": vocab_size, "max_position_embeddings": 128,
            "initializer_range": 0.3,  # random lm_head rows large enough that LoRA can move the logits
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


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
        vision_config=CLIPVisionConfig(**TINY, image_size=32, patch_size=8),
        text_config=LlamaConfig(**_text(tok, len(tok)), num_key_value_heads=2),
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
    text = GemmaConfig(**_text(tok, len(proc.tokenizer)), num_key_value_heads=1, head_dim=16)
    vision = SiglipVisionConfig(**TINY, image_size=32, patch_size=8)
    vision.projection_dim = 32
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
    )
    return VlmTask(lambda seed: PaliGemmaForConditionalGeneration(cfg), proc, model_type=cfg.model_type)


def tiny_llava_dir() -> str:
    """:func:`tiny_llava` saved with ``save_pretrained`` (model + processor), as a user's local checkpoint
    directory for ``get_task("vlm", model_id=<dir>)``; built once per machine (seeded, so always the same)."""
    import torch

    path = os.path.join(tempfile.gettempdir(), "mergeserve-tests", "tiny_llava_v1")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        task = tiny_llava()
        torch.manual_seed(0)
        task.build_base(0).save_pretrained(path)
        task.processor.save_pretrained(path)
    return path
