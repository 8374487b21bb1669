"""A bound on oneDNN's cache of compiled matrix kernels, which otherwise grows a CPU run's memory step by step.

oneDNN (torch's CPU kernels for bf16 matrix products, among others) compiles a primitive for every distinct
shape it meets and keeps up to `ONEDNN_PRIMITIVE_CACHE_CAPACITY` of them, 1024 unless told otherwise. Every
training step and every evaluation batch brings new shapes (each prompt and completion length is another one),
so on the CPU recipe the cache and its scratch memory grew through the whole of `make train`: peak RSS 3.41 GB.
Bounded at 64, the same run peaked at 2.72 GB with the same step times and bit-identical ranks (reports/README.md,
"bf16 on CPU"). oneDNN reads the variable when it builds its first primitive, so setting it at the start of a
run, after torch is imported, is enough. A value already in the environment wins.
"""

from __future__ import annotations

import os

PRIMITIVE_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
# 64 kept the CPU recipe's speed (its distinct hot shapes fit) and most of the memory saving; 1024 is oneDNN's own.
DEFAULT_PRIMITIVE_CACHE_CAPACITY = 64


def bound_primitive_cache(capacity: int = DEFAULT_PRIMITIVE_CACHE_CAPACITY) -> int:
    """Set oneDNN's primitive cache capacity unless the environment sets it already; the capacity in force."""
    value = os.environ.setdefault(PRIMITIVE_CACHE_VARIABLE, str(capacity))
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {PRIMITIVE_CACHE_VARIABLE}={value!r}: expected a whole number of primitives"
        ) from None
