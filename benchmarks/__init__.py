"""Benchmarks: ``benchmarks.serve`` is ``mergeserve bench-serve`` (installed with the product); the other
modules here are scripts run from a checkout (``python benchmarks/<name>.py``)."""
