"""mergeserve: an inference server that keeps learning (LoRA continual learning by aligned merging)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeserve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
