"""``mergeserve pretrain-vqa``: deterministic pretraining of an offline VQA model, picked from :data:`RECIPES`.

    mergeserve pretrain-vqa                          # film_scenes (the default model) into the cache
    mergeserve pretrain-vqa --model vilt_scenes --out vilt.safetensors

Seeded, threads pinned: the same flags give the same weights bit for bit on one machine and torch version.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..registry import Registry
from ..tasks import film_scenes as film_model
from ..tasks import vilt as vilt_model
from . import film_scenes, vilt_scenes


@dataclass(frozen=True)
class VqaRecipe:
    """How one model is pretrained: its recipe config, the function and the default destination."""

    config: type  # dataclass with ``steps``, ``seed`` and ``threads`` fields
    pretrain: Callable[[str, Any], dict]  # (out, config) -> provenance
    default_out: Callable[[], str]  # the cache path the model is loaded from


RECIPES: Registry[VqaRecipe] = Registry("VQA model")
RECIPES.add(film_model.NAME,
            VqaRecipe(film_scenes.FilmPretrainConfig, film_scenes.pretrain_film, film_model.weights_path))
RECIPES.add(vilt_model.NAME,
            VqaRecipe(vilt_scenes.VqaPretrainConfig, vilt_scenes.pretrain_vqa, vilt_model.weights_path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLI flags; unset ones keep the chosen recipe's defaults."""
    p.add_argument("--model", default="film_scenes", choices=sorted(RECIPES), help="model (default film_scenes)")
    p.add_argument("--out", default=None, help="destination (default: the cache the model is loaded from)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default 1; results depend on it)")
    p.add_argument("--extra-answers", help="film_scenes: comma-separated answer words beyond the scenes "
                   "vocabulary (new rows of the answer layer, learned later by a domain's LoRA)")


def run(args: argparse.Namespace) -> int:
    """Pretrain ``args.model`` with the parsed flags."""
    recipe = RECIPES[args.model]
    over = {k: getattr(args, k) for k in ("steps", "seed", "threads") if getattr(args, k) is not None}
    if args.extra_answers:
        if "extra_answers" not in recipe.config.__dataclass_fields__:
            raise SystemExit(f"mergeserve pretrain-vqa: --extra-answers is not offered for {args.model}")
        over["extra_answers"] = tuple(a for a in args.extra_answers.split(",") if a.strip())
    cfg = replace(recipe.config(), **over)
    recipe.pretrain(args.out or recipe.default_out(), cfg)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
