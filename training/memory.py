"""Memory a process holds for nothing: the CUDA libraries of a CUDA build of torch on a machine with no GPU,
and the heap a finished job freed.

``pip install torch`` on Linux x86-64 installs the CUDA build, and ``import torch`` maps its CUDA libraries
(cuBLAS, cuDNN, NCCL, ...) whether or not a GPU exists: about 250 MB of every torch process's resident
memory (RSS) are pages of those files that a CPU-only process never executes. They are clean, read-only,
file-backed pages, so the kernel may drop them at any time and read them again if they are ever touched;
:func:`release_unused_gpu_libraries` asks it to drop them now (``madvise(MADV_DONTNEED)``), so that they stop
counting against the process (its RSS, a container's working set). Pages anything wrote to (relocations,
data) are never touched. A no-op where a GPU is present, off Linux, or with
``MERGESERVE_KEEP_GPU_LIBRARIES=1``.
"""

from __future__ import annotations

import ctypes
import os
import re

#: mapped files that belong to the CUDA runtime and libraries (the nvidia-* wheels, torch's CUDA parts)
GPU_LIBRARY = re.compile(r"/nvidia/|libtorch_cuda|libc10_cuda|libcudnn|libcublas|libnccl|libcusparse|libcufft|"
                         r"libcurand|libcusolver|libnvrtc|libnvJitLink|libcudart|triton")
MADV_DONTNEED = 4
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def clean_gpu_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """``(start, end, resident kB)`` of every read-only mapping of a GPU library in ``/proc/<pid>/smaps`` text
    that holds no page written to (no dirty, no anonymous page): what can be dropped and read back unchanged."""
    out, cur, written, rss = [], None, 0, 0
    for line in smaps.splitlines() + ["0-0 ---p 0 0:0 0"]:  # a sentinel header closes the last mapping
        m = _HEADER.match(line)
        if m:
            if cur is not None and written == 0:
                out.append((*cur, rss))
            perms, path = m.group(3), m.group(4)
            cur = (int(m.group(1), 16), int(m.group(2), 16)) if GPU_LIBRARY.search(path) and "w" not in perms else None
            written = rss = 0
        elif cur is not None and line.startswith(("Private_Dirty:", "Shared_Dirty:", "Anonymous:")):
            written += int(line.split()[1])
        elif cur is not None and line.startswith("Rss:"):
            rss = int(line.split()[1])
    return out


def release_unused_gpu_libraries() -> int:
    """Drop the clean pages of mapped GPU libraries when torch sees no GPU; returns the resident bytes dropped.

    Call after torch is imported and the model built (what a library does when loaded has run by then).
    """
    if os.environ.get("MERGESERVE_KEEP_GPU_LIBRARIES") == "1" or not os.path.exists("/proc/self/smaps"):
        return 0
    import torch

    if torch.cuda.is_available():
        return 0
    with open("/proc/self/smaps") as f:
        regions = clean_gpu_mappings(f.read())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(kb * 1024 for start, end, kb in regions if libc.madvise(start, end - start, MADV_DONTNEED) == 0)


def trim_heap() -> int:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``); returns 1 if any were.

    PyTorch's CPU tensors come from ``malloc``, and glibc keeps what a job freed (training activations,
    evaluation batches: ~360 MB after a default ``digits5`` job) for the next allocation; an idle training
    worker need not hold it. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return 0
    import gc

    gc.collect()
    return int(libc.malloc_trim(0))
