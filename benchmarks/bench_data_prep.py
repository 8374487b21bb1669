"""data_prep speed: `data_prep amazon2023` on a synthetic 1M-interaction file, timed in a subprocess.

Target (issue 2): under 60 s and under 3 GiB peak memory on 2 CPU cores. The synthetic input is
cached under bench_out/ so that only the first run pays for writing it.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_prep.options import SyntheticOptions
from data_prep.synthetic import write_synthetic


def _input(folder: Path, users: int, items: int, interactions: int) -> dict[str, Path]:
    raw = folder / f"raw-{users}u-{items}i-{interactions}x"
    paths = {"reviews": raw / "Synthetic.jsonl.gz", "meta": raw / "meta_Synthetic.jsonl.gz"}
    if not all(p.is_file() for p in paths.values()):
        started = time.perf_counter()
        write_synthetic(
            SyntheticOptions(users=users, items=items, interactions=interactions, out_raw=str(raw))
        )
        print(f"wrote the synthetic input in {time.perf_counter() - started:.1f}s: {raw}", flush=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks data_prep -- ", description=__doc__)
    parser.add_argument(
        "--interactions", type=int, default=1_000_000, help="interactions in the file (default: 1000000)"
    )
    parser.add_argument("--items", type=int, default=100_000, help="items (default: 100000)")
    parser.add_argument("--users", type=int, default=100_000, help="users (default: 100000)")
    parser.add_argument(
        "--dir", default="bench_out/data_prep", help="cache and output folder (default: bench_out/data_prep)"
    )
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    paths = _input(folder, args.users, args.items, args.interactions)
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "data_prep", "amazon2023", "--reviews", str(paths["reviews"])]
    command += ["--meta", str(paths["meta"]), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    rate = args.interactions / seconds
    ok = seconds < 60 and peak_gib < 3
    print(
        f"data_prep amazon2023: {args.interactions} interactions in {seconds:.1f}s = {rate:,.0f} interactions/s, "
        f"peak RSS {peak_gib:.2f} GiB ({'within' if ok else 'OUTSIDE'} the 60 s / 3 GiB target)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
