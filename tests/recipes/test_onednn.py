import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.memory import can_release_freed_memory
from recipes.onednn import (
    COMPUTATION_CACHE_VARIABLE,
    DEFAULT_COMPUTATION_CACHE_CAPACITY,
    DEFAULT_PRIMITIVE_CACHE_CAPACITY,
    PRIMITIVE_CACHE_VARIABLE,
    bound_kernel_caches,
)
from recipes.precision import cpu_bf16_units


def test_the_primitive_cache_gets_the_default_bound_when_the_environment_sets_none(monkeypatch):
    monkeypatch.delenv(PRIMITIVE_CACHE_VARIABLE, raising=False)
    monkeypatch.delenv(COMPUTATION_CACHE_VARIABLE, raising=False)
    assert bound_kernel_caches() == DEFAULT_PRIMITIVE_CACHE_CAPACITY == 64
    assert os.environ[PRIMITIVE_CACHE_VARIABLE] == "64"


def test_a_capacity_the_user_exported_is_kept(monkeypatch):
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "1024")
    assert bound_kernel_caches() == 1024


def test_a_capacity_that_is_not_a_number_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "lots")
    with pytest.raises(ValueError, match="ONEDNN_PRIMITIVE_CACHE_CAPACITY='lots'"):
        bound_kernel_caches()


def test_the_computation_cache_gets_its_bound_and_an_explicit_value_wins(monkeypatch):
    monkeypatch.delenv(COMPUTATION_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv(PRIMITIVE_CACHE_VARIABLE, "64")
    bound_kernel_caches()
    assert os.environ[COMPUTATION_CACHE_VARIABLE] == str(DEFAULT_COMPUTATION_CACHE_CAPACITY) == "16"
    monkeypatch.setenv(COMPUTATION_CACHE_VARIABLE, "1024")
    bound_kernel_caches()
    assert os.environ[COMPUTATION_CACHE_VARIABLE] == "1024"
    monkeypatch.setenv(COMPUTATION_CACHE_VARIABLE, "few")
    with pytest.raises(ValueError, match="LRU_CACHE_CAPACITY='few'"):
        bound_kernel_caches()


# bf16 matrix products of 300 distinct row counts, the way a run meets new prompt lengths, then the resident
# growth once freed memory is handed back. The bound is set in-process after torch is imported, as recpo.py does.
_GROWTH = """
import torch
from recipes.memory import release_freed_memory, resident_mb
from recipes.onednn import bound_kernel_caches
bound_kernel_caches()
torch.set_num_threads(1)
w = torch.randn(1536, 576, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(8, 576, dtype=torch.bfloat16), w)
release_freed_memory()
before = resident_mb()
for rows in range(100, 400):
    torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), w)
release_freed_memory()
print(resident_mb() - before)
"""


def _growth_mb(env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _GROWTH], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not can_release_freed_memory(), reason="glibc's malloc_trim")
@pytest.mark.skipif(
    cpu_bf16_units() is None, reason="bf16 products go through oneDNN only on CPUs with bf16 units"
)
def test_the_bounds_stop_the_resident_size_growing_with_every_new_shape():
    env = {
        k: v for k, v in os.environ.items() if k not in (PRIMITIVE_CACHE_VARIABLE, COMPUTATION_CACHE_VARIABLE)
    }
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    bounded = _growth_mb(env)
    unbounded = _growth_mb({**env, PRIMITIVE_CACHE_VARIABLE: "1024", COMPUTATION_CACHE_VARIABLE: "1024"})
    # Measured with this script on a 2-core Intel Xeon: 32 MB bounded against 191 MB at the libraries' own 1024
    # entries with AMX, 27 against 182 with oneDNN held to AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, the
    # AMD EPYCs' bf16 units).
    assert unbounded > 100, f"300 new shapes grew the unbounded caches by only {unbounded:.0f} MB"
    assert bounded < unbounded / 3, f"bounded {bounded:.0f} MB against unbounded {unbounded:.0f} MB"
