import pytest
import torch

from training.data import Benchmark, Domain
from training.lora import LoraSettings
from training.strategies import LearnerContext, TrainSettings
from training.tasks import get_task


def make_domain(name: str, seed: int, n: int = 24, classes: int = 3) -> Domain:
    """Class-dependent blobs so a few steps can learn something; shifted per domain."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        x[i, (c + seed) % 3, 8 * c : 8 * c + 8] = 250
    return Domain(name, x[: n - 9], y[: n - 9], x[n - 9 :], y[n - 9 :])


@pytest.fixture
def tiny_bench() -> Benchmark:
    return Benchmark("tiny", ["a", "b", "c"], [make_domain("d0", 0), make_domain("d1", 1), make_domain("d2", 2)])


@pytest.fixture
def tiny_ctx() -> LearnerContext:
    task = get_task("classify", backbone="vit_test", class_names=["a", "b", "c"])
    return LearnerContext(
        task,
        task.build_base(0),
        LoraSettings(rank=2, alpha=4.0),
        TrainSettings(steps=4, batch_size=8, lr=0.05),
        seed=0,
    )
