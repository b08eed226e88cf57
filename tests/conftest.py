import pytest
import torch

_steps: list[tuple[str, float]] = []  # tests/acceptance's step times, from the reports (see its conftest)


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _steps.extend(tuple(v) for k, v in report.user_properties if k == "acceptance-step")


def pytest_terminal_summary(terminalreporter):
    """The time of each acceptance step (the README session's commands, starts, restarts)."""
    if _steps:
        terminalreporter.section("acceptance steps (wall seconds)")
        for step, seconds in _steps:
            terminalreporter.write_line(f"{seconds:8.1f}  {step[:110]}")


@pytest.fixture
def tvs():
    """Three task vectors with two keys of different shapes."""
    g = torch.Generator().manual_seed(0)
    return [{"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
