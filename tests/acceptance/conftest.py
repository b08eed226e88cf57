import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _shipped import TIMINGS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """The time of each acceptance step (the README session's commands, starts, restarts)."""
    if not TIMINGS:
        return
    terminalreporter.section("acceptance steps (wall seconds)")
    for step, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f}  {step[:110]}")
