"""A real browser for the console's test and its screenshots: Debian's ``chromium`` driven by playwright.

Playwright's own browser download cannot work on these machines (only package registries are reachable), so
the page runs in the distribution's chromium, which ``make test`` installs when it is missing (as it installs
prometheus). The flags keep chromium from calling home: on a closed network those connections are refused and
would show up as noise (or console errors) in a test that asserts there are none.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The chromium binary. Missing is a failure, never a skip: ``make test`` installs Debian's package."""
    path = shutil.which("chromium")
    if path is None:
        raise AssertionError("chromium not found on PATH; run `make test` (it installs Debian's chromium package)")
    return path


@contextmanager
def browser() -> Iterator[object]:
    """A headless chromium (``playwright.sync_api.Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
