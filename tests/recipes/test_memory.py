"""recipes/memory.py: freed heap memory really goes back to the system (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from recipes.memory import release_freed_memory

# 200 blocks of 1 MB in glibc's heap (mmap and automatic trimming held off by the environment, so that the
# blocks come from the heap as a run's tensors do once glibc has raised its dynamic thresholds), all freed but
# the last, which pins the heap's top: only malloc_trim can give the free middle back.
SCRIPT = """
import os
from recipes.memory import release_freed_memory

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [bytearray(2**20) for _ in range(200)]
pin = blocks[-1]
del blocks
before = resident_mb()
released = release_freed_memory()
print(released, before, resident_mb())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)
def test_freed_heap_pages_go_back_to_the_system():
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40), "PYTHONPATH": "."}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    assert before - after > 150  # of the ~199 MB freed


def test_says_false_where_the_c_library_is_not_glibc(monkeypatch):
    from recipes import memory

    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    memory._malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        memory._malloc_trim.cache_clear()
