"""Handing freed heap memory back to the system (glibc), so that resident memory follows what a run holds.

A CPU run frees and allocates activations of ever-changing sizes (prompts of different lengths, a key/value
cache that grows a token at a time). glibc keeps freed blocks inside its heap for reuse, and when the next
sizes do not fit them it grows the heap instead: the resident size ratchets up to the largest mix seen, about
0.9 GB above what the CPU default holds between warm-up steps (measured: 1.94 GB resident after 12 steps, 1.09 GB
after a `malloc_trim`). `malloc_trim(0)` returns the free pages; the next phase faults back in what it uses.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys


@functools.cache
def _malloc_trim():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; True where that happened (glibc), False elsewhere."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def can_release_freed_memory() -> bool:
    """Whether `release_freed_memory` can hand pages back here (glibc's malloc_trim is there)."""
    return _malloc_trim() is not None


def resident_mb() -> float:
    """The process's resident memory now, in MB (0 where the platform has no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB (0 where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KB on Linux


def peak_memory_metrics() -> dict[str, float]:
    """The run's peaks so far as logged metrics: resident memory, and the GPU's allocations where there is one."""
    metrics = {"memory/peak_rss_mb": peak_rss_mb()}
    import torch  # here, so that the resident-size readers above stay importable without torch

    if torch.cuda.is_available():
        metrics["memory/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return metrics
