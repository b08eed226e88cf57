"""The built-in console's files (``GET /ui``): a static page shipped in the package, a client of the public API.

The page is plain HTML, CSS and ES modules under ``serving/ui/`` (package data), so it works on a laptop with
no network, no CDN and no build step. Only the files found there at start are served, by name, so no path a
client sends can reach anything else. The content security policy allows this origin only: a stray external
load would fail loudly in the browser (and in the browser test) instead of leaking a request.
"""

from __future__ import annotations

import functools
from importlib import resources

from .errors import Problem

#: media types of what the folder holds; other suffixes are not served
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
#: images the page draws itself are data: / blob: URLs (the try-it preview); everything else from this origin
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}


def _suffix(name: str) -> str:
    return name[name.rfind("."):] if "." in name else ""


@functools.cache
def files() -> dict[str, bytes]:
    """Every servable file of ``serving/ui`` by name, read once (a few tens of kB)."""
    folder = resources.files("serving") / "ui"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and _suffix(f.name) in MEDIA}


def asset(name: str) -> tuple[bytes, str]:
    """A console file's bytes and media type.

    Raises:
        Problem: 404 ``not-found`` for any name that is not one of :func:`files` (no path is ever joined).
    """
    body = files().get(name)
    if body is None:
        raise Problem(404, "not-found", f"the console has no file {name[:64]!r}")
    return body, MEDIA[_suffix(name)]
