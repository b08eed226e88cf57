"""Serve's start-up gap answers 503 + Retry-After instead of 404 (issue 29).

With HAProxy on the main port (Ray 2.60), HAProxy listens before the application's routes exist, and its
``default_backend`` answers every request ``404 Path '...' not found``: a client cannot tell that from a wrong
URL, and a restart showed 53-61 of them per client loop (``benchmarks/faults.py``). Once the app is deployed at
``route_prefix="/"`` every path matches its backend, so the default backend only ever answers during that gap:
there it should say "not ready, retry", as the app itself does (problem ``not-ready``).

Ray builds that configuration inside its ``HAProxyManager`` actor from a template constant, with no setting
for it. ``install`` (Ray's ``worker_process_setup_hook``, run in every worker process of an in-process Ray)
rewrites the constant when, and only if, that module is imported: other workers import nothing more.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

MODULE = "ray.serve._private.haproxy_templates"
OLD = ("    http-request return status 404 content-type text/plain lf-string \"Path '%[path]' not found. "
       "Ping http://.../-/routes for available routes.\"")
NEW = ("    http-request return status 503 content-type application/problem+json string "
       "'{\"type\":\"/problems/not-ready\",\"title\":\"Not ready\",\"status\":503,"
       "\"detail\":\"the server is starting: its routes are not deployed yet; retry\"}' hdr Retry-After 1")


def rewrite(template: str) -> str:
    """The template with the default backend's 404 replaced by a 503 not-ready problem; unchanged (and so
    still correct, if less helpful) when Ray's line is not there, e.g. after an upgrade."""
    return template.replace(OLD, NEW)


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``MODULE`` with the regular finders, runs it, then rewrites its template."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # let the regular finders find it, once
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        module.HAPROXY_CONFIG_TEMPLATE = rewrite(module.HAPROXY_CONFIG_TEMPLATE)


def install() -> None:
    """Rewrite the template in this process: now if it is imported already, else when it is."""
    if MODULE in sys.modules:
        mod = sys.modules[MODULE]
        mod.HAPROXY_CONFIG_TEMPLATE = rewrite(mod.HAPROXY_CONFIG_TEMPLATE)
    elif not any(isinstance(f, _Patch) for f in sys.meta_path):
        sys.meta_path.insert(0, _Patch())
