import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from _shipped import TIMINGS  # noqa: E402


@pytest.fixture(autouse=True)
def _report_step_times(request):
    """Hand the step times recorded during a test (or by the background scenario meanwhile) to its report;
    tests/conftest.py prints them at the end of the run (a pytest-xdist controller sees reports only)."""
    yield
    while TIMINGS:
        request.node.user_properties.append(("acceptance-step", TIMINGS.pop(0)))
