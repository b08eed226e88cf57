"""``film_scenes``: a FiLM VQA head on frozen ImageNet EfficientNet-Lite0 features, as a transformers model.

Architecture (Perez et al. 2018, "FiLM: Visual Reasoning with a General Conditioning Layer", §3 and
Fig. 3, at CPU scale), every trainable layer an ``nn.Linear`` or ``nn.Conv2d`` so peft's LoRA adapts it
and ``merge/`` folds its ΔW = s·B·A:

* **trunk** (frozen, never adapted): EfficientNet-Lite0 stem and stages 0–2 with the ImageNet weights
  the classifier ships (:mod:`training.effnet`); 64 px → (40, 8, 8) features. Its BatchNorms always run
  on stored statistics, so its output for an image never changes and can be cached
  (:meth:`FilmVqaModel.image_features`; the ``vqa`` task caches it per domain).
* **question encoder** (Linear only: no GRU): token embedding + learned position embedding → a per-token
  Linear + ReLU → masked max over tokens → Linear + ReLU: q (question_dim,).
* **stem**: CoordConv (two coordinate channels appended, Liu et al. 2018) 3×3 conv + ReLU.
* **FiLM blocks** ×``blocks``: [coords] → 1×1 conv + ReLU → 3×3 conv → GroupNorm (no affine) →
  γ·x + β from q (FiLM, Eq. 1: FiLM(F | γ, β) = γ ⊙ F + β) → ReLU → + residual.
  γ, β come from one Linear (the FiLM generator) over q.
* **classifier**: [coords] → 1×1 conv + ReLU → global max pool → Linear + ReLU → ``answer`` Linear over
  the answer vocabulary.

Save / load like any transformers model: ``model.save_pretrained(d)``, ``FilmVqaModel.from_pretrained(d,
local_files_only=True)``; the tokenizer (``BertTokenizerFast`` over the project's ``vqa_vocab``) saves into
the same directory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

TRUNK_ARCH = "tf_efficientnet_lite0"  # timm name of the ImageNet trunk (see training/effnet.py)


class FilmVqaConfig(PretrainedConfig):
    """Architecture of :class:`FilmVqaModel` (defaults: the published ``film_scenes``, ~0.33 M trainable).

    Args:
        vocab_size: Tokenizer size (the project's ``vqa_vocab``: 161).
        max_question_len: Question tokens incl. [CLS]/[SEP]; longer questions are truncated.
        embed_dim: Token and position embedding width.
        question_dim: Width of the question vector q that drives FiLM.
        channels: Width of the stem and of every FiLM block.
        blocks: FiLM residual blocks.
        classifier_channels: 1×1 conv width before the global max pool.
        hidden: Width of the classifier's hidden Linear.
        norm_groups: GroupNorm groups in each FiLM block (no running statistics: train == eval).
        image_size: Input resolution of the trunk; images are resized to it.
        trunk_stages: EfficientNet-Lite0 stages kept after the stem (3 → 40 channels at 1/8 resolution).
        trunk_channels: Channels of the trunk's output (40 for 3 stages).
        answers: The answer vocabulary (the ``answer`` Linear's rows, in order).
    """

    model_type = "film_vqa"

    def __init__(
        self,
        vocab_size: int = 161,
        max_question_len: int = 24,
        embed_dim: int = 64,
        question_dim: int = 128,
        channels: int = 64,
        blocks: int = 3,
        classifier_channels: int = 128,
        hidden: int = 128,
        norm_groups: int = 8,
        image_size: int = 64,
        trunk_stages: int = 3,
        trunk_channels: int = 40,
        answers: list[str] | None = None,
        **kwargs: object,
    ) -> None:
        answers = list(answers or ["yes", "no"])
        kwargs.setdefault("id2label", dict(enumerate(answers)))
        kwargs.setdefault("label2id", {a: i for i, a in enumerate(answers)})
        super().__init__(**kwargs)
        self.vocab_size, self.max_question_len, self.embed_dim = vocab_size, max_question_len, embed_dim
        self.question_dim, self.channels, self.blocks = question_dim, channels, blocks
        self.classifier_channels, self.hidden, self.norm_groups = classifier_channels, hidden, norm_groups
        self.image_size, self.trunk_stages, self.trunk_channels = image_size, trunk_stages, trunk_channels
        self.answers = answers


def coords(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with two coordinate channels in [-1, 1] appended: (N, C + 2, H, W) (CoordConv)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


def build_trunk(stages: int) -> nn.Sequential:
    """EfficientNet-Lite0's stem and first ``stages`` stages (timm ``tf_efficientnet_lite0``), random weights."""
    import timm

    full = timm.create_model(TRUNK_ARCH, pretrained=False, num_classes=0)
    return nn.Sequential(full.conv_stem, full.bn1, *full.blocks[:stages])


class QuestionEncoder(nn.Module):
    """Tokens → q: embeddings + positions, a per-token Linear + ReLU, masked max-pool, Linear + ReLU."""

    def __init__(self, cfg: FilmVqaConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.position = nn.Embedding(cfg.max_question_len, cfg.embed_dim)
        self.token = nn.Linear(cfg.embed_dim, cfg.question_dim)
        self.proj = nn.Linear(cfg.question_dim, cfg.question_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = F.relu(self.token(self.embed(input_ids) + self.position(pos)))  # (N, L, Q)
        h = h.masked_fill(~attention_mask.bool()[..., None], float("-inf")).amax(1)  # (N, Q)
        return F.relu(self.proj(h))


class FilmBlock(nn.Module):
    """Residual block of FiLM (Perez et al. 2018, Fig. 3): coords → 1×1 conv → 3×3 conv → norm → FiLM → ReLU."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c + 2, c, 1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c, affine=False)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(coords(x)))
        h = self.norm(self.conv2(h))
        h = F.relu(gamma[..., None, None] * h + beta[..., None, None])  # FiLM, Eq. 1
        return x + h


class FilmVqaModel(PreTrainedModel):
    """Closed-vocabulary VQA: frozen trunk features, FiLM-conditioned on the question, answer logits."""

    config_class = FilmVqaConfig
    base_model_prefix = "film"
    main_input_name = "input_ids"

    def __init__(self, config: FilmVqaConfig) -> None:
        super().__init__(config)
        c = config.channels
        self.trunk = build_trunk(config.trunk_stages)
        self.question = QuestionEncoder(config)
        self.stem = nn.Conv2d(config.trunk_channels + 2, c, 3, padding=1)
        self.film = nn.Linear(config.question_dim, 2 * c * config.blocks)  # the FiLM generator
        self.blocks = nn.ModuleList(FilmBlock(c, config.norm_groups) for _ in range(config.blocks))
        self.pool_conv = nn.Conv2d(c + 2, config.classifier_channels, 1)
        self.fc = nn.Linear(config.classifier_channels, config.hidden)
        self.answer = nn.Linear(config.hidden, len(config.answers))
        self.trunk.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh heads only (the trunk's weights always come from a checkpoint): PyTorch's default init,
        zero biases."""
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(module is m for m in self.trunk.modules()):
            module.reset_parameters()

    def train(self, mode: bool = True) -> FilmVqaModel:
        """Train mode for the head; the trunk always runs on stored BatchNorm statistics (frozen)."""
        super().train(mode)
        self.trunk.eval()
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) → trunk features (N, trunk_channels, S/8, S/8); never trained."""
        with torch.no_grad():
            return self.trunk(pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        """Answer logits (N, n_answers); give ``pixel_values`` or cached ``image_features``.

        Raises:
            ValueError: neither (or both) of ``pixel_values`` and ``image_features`` given.
        """
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values and image_features")
        x = self.image_features(pixel_values) if image_features is None else image_features
        q = self.question(input_ids, attention_mask)  # (N, Q)
        film = self.film(q).view(q.shape[0], len(self.blocks), 2, -1)  # (N, blocks, γ|β, C)
        h = F.relu(self.stem(coords(x)))
        for i, block in enumerate(self.blocks):
            h = block(h, 1 + film[:, i, 0], film[:, i, 1])  # γ around 1: the identity FiLM at init
        h = F.relu(self.pool_conv(coords(h))).amax((2, 3))  # (N, classifier_channels)
        logits = self.answer(F.relu(self.fc(h)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def head_modules(self) -> list[str]:
        """Names of every ``nn.Linear`` / ``nn.Conv2d`` outside the trunk: the LoRA targets."""
        return [
            n for n, m in self.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("trunk")
        ]


def register_auto() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know ``film_vqa`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(FilmVqaConfig.model_type, FilmVqaConfig)
        AutoModel.register(FilmVqaConfig, FilmVqaModel)
    except ValueError:  # already registered
        pass
