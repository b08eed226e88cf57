"""Experiment configs. Each docstring holds its run command and the number it is expected to give."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from .hyper import base_method, parse_bench_hyper
from .lora import LoraSettings
from .strategies import STRATEGIES, TrainSettings

#: the oracles that see more than a continual learner may (all domains' data, one adapter per domain): listed last
_ORACLES = ("joint", "independent")
#: every registered strategy, in registration order, the oracles last
ALL_METHODS = [m for m in STRATEGIES if m not in _ORACLES] + [m for m in _ORACLES if m in STRATEGIES]


class BenchConfig(BaseModel):
    """A DIL benchmark run."""

    benchmark: str = "digits5"  # registered benchmark (training.data.BENCHMARKS)
    benchmark_args: dict = Field(default_factory=dict)  # e.g. {"root": ..., "domains": [...]}
    backbone: str = "vit_tiny_offline"  # registered backbone (training.backbones.BACKBONES)
    task: str | None = None  # a training.tasks name (vqa): its model replaces the backbone; None = classify
    task_args: dict = Field(default_factory=dict)  # e.g. {"weights": "path/to/vilt.safetensors"}
    # strategies to compare; METHOD@VARIANT runs METHOD again under that label with hyper[label]
    methods: list[str] = Field(default_factory=lambda: list(ALL_METHODS))
    hyper: dict[str, dict] = Field(default_factory=dict)  # per-method hyper-parameters
    orders: int = Field(3, ge=1)  # task orders per seed; mean ± SD (ddof = 1) is over seeds × orders
    seed: int = 0  # one seed for backbone head, LoRA init, batches, orders (the first of ``seeds``)
    seeds: int = Field(1, ge=1)  # seeds seed, seed + 1, …; each runs every order
    vary_data: bool = False  # the seed also seeds the benchmark's generated data (benchmark_args["seed"])
    # method pairs A-B whose per-run differences (same seed and order) get a paired 95 % interval
    pairs: list[str] = Field(default_factory=lambda: ["pam-average", "average-finetune", "pam-finetune"])
    device: str = "auto"  # cpu | cuda | auto
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if base_method(m) not in STRATEGIES or m.count("@") > 1 or "." in m]
        if unknown or not v or len(set(v)) < len(v):
            raise ValueError(
                f"unknown or repeated methods {unknown or v}; registered: {sorted(STRATEGIES)} "
                "(METHOD@VARIANT for another setting of one; no '.' in a label)"
            )
        return v

    @field_validator("hyper")
    @classmethod
    def _valid_hyper(cls, v: dict[str, dict]) -> dict[str, dict]:
        for method, h in v.items():
            parse_bench_hyper(method, h)  # HyperError (a ValueError) names the method, key and range
        return v


DIGITS5 = BenchConfig()
"""Offline default: all methods, 5 digit domains, 3 orders, vit_tiny_offline, LoRA r=8, 80 steps/domain.

Run: ``mergeserve bench dil --benchmark digits5 --orders 3 --seed 0 --out results.json --plot docs/digits5.png``
Expected (docs/results.md): see the committed table; finishes in under 15 minutes on 2 CPU cores.
"""

FAST = BenchConfig(
    benchmark_args={"domains": ["mnist", "sklearn"], "n_test": 100},  # 2 domains, small held-out splits
    backbone="vit_test",  # random trunk: no pretraining on first use (minutes); accuracies are not meaningful
    orders=1,  # one task order
    train=TrainSettings(steps=20),  # 20 optimizer steps per domain
)
"""CI smoke test: every method end to end on 2 digits5 domains (numbers are not meaningful).

Run: ``mergeserve bench dil --fast --out /tmp/fast.json``
Expected: a full table, all 10 methods; about 1 minute on 2 CPU cores.
"""

SCENES_VQA = BenchConfig(
    benchmark="scenes_vqa",
    benchmark_args={"domains": ["color", "shape", "count", "where"], "n_train": 1000, "n_test": 200},
    task="vqa",
    task_args={"model_name": "vilt_scenes"},  # the offline ViLT (training/assets/vilt_scenes.safetensors)
    methods=["finetune", "average", "ties", "tall", "magmax", "pam", "joint"],  # as committed in docs/results.md
    orders=2,
    train=TrainSettings(steps=100, batch_size=32, lr=1e-3, eval_batch=200),
)
"""Continual VQA on the scenes question families (CoIN-style: a family per domain), the PAM paper's
Table 1 protocol at CPU scale: 4 families, 100 LoRA steps each, 2 orders.

Run: ``mergeserve bench dil --config scenes_vqa --out vqa.json --plot docs/scenes_vqa.png``
Expected (docs/results.md, 2 CPU cores): the committed table; about 25 minutes.
"""

SCENES_VQA_SINGLE = SCENES_VQA.model_copy(
    update={
        "benchmark_args": {  # one object per scene: the shipped ViLT answers color/exist/count well zero-shot
            "domains": ["color", "where", "exist", "count"], "n_train": 1000, "n_test": 200, "objects": [1, 1],
        },
        "train": TrainSettings(steps=100, batch_size=32, lr=3e-3, eval_batch=200),  # enough to forget with
    }
)
"""Continual VQA where the model has something to lose: single-object scenes, on which the offline ViLT
answers colour (1.00), existence (0.88) and counting (0.68) zero-shot but not position (0.11); a LoRA
trained on ``where`` alone drops colour to 0.61 and existence to 0.46 (``python -m training.tasks.probe
--family where --steps 100 --max-objects 1 --families color,shape,count,where,exist``). The table is
then mostly about what each method keeps.

Run: ``mergeserve bench dil --config scenes_vqa_single --out vqa1.json --plot docs/scenes_vqa_single.png``
Expected (docs/results.md, 2 CPU cores): the committed table; about 13 minutes.
"""

SCENES_VQA_NEW = BenchConfig(
    benchmark="scenes_vqa",
    # families film_scenes was never pretrained on (it learned color, shape, relation, exist): new question
    # templates, and for where new answer words (count, the other family with new answers, reached only 0.45
    # in 400 steps: docs/vqa.md); 2-6 objects per scene as in pretraining
    benchmark_args={"domains": ["where", "color_at", "rel_exist", "shape_at", "rel_shape"], "n_train": 1000,
                    "n_test": 200},
    task="vqa",
    task_args={"model_name": "film_scenes"},  # the default model (training/assets/film_scenes/)
    methods=list(ALL_METHODS),
    orders=3,
    seeds=3,  # runs = 3 seeds × 3 orders, paired run by run between methods
    vary_data=True,  # every seed generates its own scenes and questions
    train=TrainSettings(steps=400, batch_size=64, lr=3e-3, eval_batch=200),  # the online recipe (VqaServing)
)
"""Continual VQA in the PAM paper's regime (Table 1: LoRA lifts each task far above zero-shot, and methods
separate on forgetting): film_scenes on five question families it never trained on, trunk features cached
per domain.

Run: ``mergeserve bench dil --config scenes_vqa_new --out docs/scenes_vqa_new.json``
Expected (docs/results.md, 2 CPU cores): the committed table and its paired intervals.
"""

SCENES_VQA_NEW_R32 = SCENES_VQA_NEW.model_copy(update={
    # the recipe probe's (benchmarks/vqa_fit.py, docs/vqa.md "A recipe for the hard families"): r 8 / 400
    # steps overfits rel_exist, shape_at and rel_shape at ~70 %; r 32 with LoRA dropout 0.2 at 800 steps
    # reaches 97-100 % on each family alone
    "lora": LoraSettings(rank=32, alpha=64.0, dropout=0.2),
    "train": TrainSettings(steps=800, batch_size=64, lr=3e-3, eval_batch=200),
    "methods": ["finetune", "average", "pam", "joint", "independent"],  # the comparisons
    # joint's pool draws 64 samples per pooled domain and step: with a fixed 64 the five-family pool leaves
    # rel_exist at chance (docs/vqa.md "Joint training")
    "hyper": {"joint": {"pool_batch": "per_domain"}},
    "orders": 1,
})
"""``scenes_vqa_new`` with the recipe that learns every family (LoRA r 32, α 64, dropout 0.2, 800 steps of 64):
whether merging still separates from fine-tuning once each temporary really learns its family. Costs
about twice the server's recipe per domain (over the online 60 s budget, so the server keeps r 8 / 400).

Run (one process per seed, one thread each, then pooled):
``OMP_NUM_THREADS=1 mergeserve bench dil --config scenes_vqa_new_r32 --seed S --seeds 1 --out rS.json`` for S
in 0 1 2, then ``mergeserve bench dil --config scenes_vqa_new_r32 --combine r0.json r1.json r2.json --out
docs/scenes_vqa_new_r32.json``. The committed record adds each seed's second and third orders of
``domain_orders`` as six more runs, each passed as ``--domains ORDER`` (``orders`` stays 1: an order passed that
way draws its minibatches by the family's position in it, so ``--orders 3`` would give other, equally valid,
draws). ~55 minutes a run on one thread (joint ~20 of them: its batch grows with the pool).
Expected (docs/results.md, 2 CPU cores, 9 runs): ACC finetune 13.9, average 25.3, pam 26.1, joint 94.2,
independent 97.1; average - finetune +11.4 [+7.1, +15.7]; pam - average +0.8 [-1.8, +3.4] (over 19 runs of
average and pam alone, docs/scenes_vqa_new_r32_pam_average.json: +0.5 [-0.8, +1.7]).
"""

CONFIGS: dict[str, BenchConfig] = {
    "digits5": DIGITS5, "fast": FAST, "scenes_vqa": SCENES_VQA, "scenes_vqa_single": SCENES_VQA_SINGLE,
    "scenes_vqa_new": SCENES_VQA_NEW, "scenes_vqa_new_r32": SCENES_VQA_NEW_R32,
}
