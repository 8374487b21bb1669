"""Bounds on the two caches of compiled matrix kernels that otherwise grow a CPU run's memory step by step.

torch's CPU kernels for bf16 matrix products (among others) are oneDNN's, and two caches keep what they build
for every distinct shape, 1024 entries each unless told otherwise. Every training step and every evaluation
batch brings new shapes (each prompt and completion length is another one), so both grew through the whole run:
- oneDNN's own primitive cache, `ONEDNN_PRIMITIVE_CACHE_CAPACITY`: bounded at 64, `make train` peaked at
  2.72 GB instead of 3.41 GB with the same step times and bit-identical ranks (reports/README.md, "bf16 on CPU");
- ideep's cache of matrix-product computations in front of it (ideep is the C++ layer torch calls oneDNN
  through), `LRU_CACHE_CAPACITY`: with oneDNN's bounded at 64, the resident size after freeing (malloc_trim)
  still crept 8 MB a step (963 -> 1,157 MB over 25 warm-up steps of the CPU recipe, 2-core Intel Xeon with AMX);
  bounded at 16 it stayed at 921-930 MB, with the same step times (reports/README.md, "The kernel caches").
Both libraries read their variable when they build their first kernel, so setting it at the start of a run,
after torch is imported, is enough (tests/recipes/test_onednn.py measures it in a fresh process). A value
already in the environment wins.
"""

from __future__ import annotations

import os

PRIMITIVE_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
# 64 kept the CPU recipe's speed (its distinct hot shapes fit) and most of the memory saving; 1024 is oneDNN's own.
DEFAULT_PRIMITIVE_CACHE_CAPACITY = 64
COMPUTATION_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"
# A miss here falls through to oneDNN's primitive cache above, so a small bound costs little; 1024 is ideep's own.
DEFAULT_COMPUTATION_CACHE_CAPACITY = 16


def _bound(variable: str, capacity: int, what: str) -> int:
    value = os.environ.setdefault(variable, str(capacity))
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {variable}={value!r}: expected a whole number of {what}"
        ) from None


def bound_kernel_caches(
    capacity: int = DEFAULT_PRIMITIVE_CACHE_CAPACITY,
    computation_capacity: int = DEFAULT_COMPUTATION_CACHE_CAPACITY,
) -> int:
    """Bound oneDNN's primitive cache and ideep's computation cache unless the environment sets them already;
    returns the primitive cache's capacity in force."""
    _bound(COMPUTATION_CACHE_VARIABLE, computation_capacity, "cached computations")
    return _bound(PRIMITIVE_CACHE_VARIABLE, capacity, "primitives")
