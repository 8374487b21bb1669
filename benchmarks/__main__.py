"""Run the benchmarks: `python -m benchmarks [name ...] [-- extra args]`.

Each `benchmarks/bench_<name>.py` module has a `main(argv)` function. With no names, all of them run
in turn with their default (CPU-sized) settings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=f"Run benchmarks. Available: {', '.join(available())}. Arguments after `--` go to the benchmark.",
    )
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    from recipes.precision import cpu_bf16_units, cpu_model

    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, bf16 matrix units: {cpu_bf16_units() or 'none'}",
        flush=True,
    )
    status = 0
    for name in names:
        print(f"=== bench {name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        status |= int(module.main(extra) or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
