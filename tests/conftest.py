import pytest
import torch


@pytest.fixture
def tvs():
    """Three task vectors with two keys of different shapes."""
    g = torch.Generator().manual_seed(0)
    return [{"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
