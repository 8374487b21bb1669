"""Full-catalog ranking speed: the sort-free rewards.ranking path against a naive per-user argsort.

`python -m benchmarks ranking` (defaults: 4,096 users x 100,000 items, 20 history items per user, CPU).
Arguments after `--` go here, for instance `python -m benchmarks ranking -- --users 512 --reps 3`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rewards.ranking import history_mask, ndcg_reward, ranking_metrics, softmax_reward, target_rank


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ranking", description=__doc__)
    parser.add_argument("--users", type=int, default=4096, help="users (rows of the score matrix)")
    parser.add_argument("--items", type=int, default=100_000, help="catalog size")
    parser.add_argument("--history", type=int, default=20, help="history items masked out per user")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the sort-free path")
    parser.add_argument("--naive-reps", type=int, default=2, help="timed repetitions of the argsort path")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def naive_rank(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Rank by sorting every user's catalog; ties fall wherever the sort puts them."""
    target_score = scores.gather(1, target.unsqueeze(1))  # (users, 1)
    masked = scores.masked_fill(exclude, float("-inf")).scatter_(1, target.unsqueeze(1), target_score)
    order = torch.argsort(masked, dim=1, descending=True)  # (users, items)
    return (order == target.unsqueeze(1)).int().argmax(dim=1) + 1


def sort_free_step(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    rank = target_rank(scores, target, exclude)
    ndcg_reward(rank)
    softmax_reward(scores, target, exclude)
    ranking_metrics(rank)
    return rank


def report(name: str, ms: float, users: int) -> None:
    print(f"  {name:<38} {ms:10.1f} ms median   {users / (ms / 1e3):12,.0f} users/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"ranking {args.users:,} users x {args.items:,} items, {args.history} history items each, "
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )
    scores = torch.randn(args.users, args.items, generator=generator).to(device)  # (users, items)
    target = torch.randint(0, args.items, (args.users,), generator=generator).to(device)
    history = torch.randint(0, args.items, (args.users, args.history), generator=generator)  # (users, H)
    history_lists = history.tolist()

    exclude = history_mask(history_lists, args.items, device=device)
    report(
        "history_mask (from lists)",
        median_ms(lambda: history_mask(history_lists, args.items, device), args.reps, device),
        args.users,
    )
    report(
        "target_rank", median_ms(lambda: target_rank(scores, target, exclude), args.reps, device), args.users
    )
    report(
        "softmax_reward",
        median_ms(lambda: softmax_reward(scores, target, exclude), args.reps, device),
        args.users,
    )
    rank = target_rank(scores, target, exclude)
    report(
        "ndcg_reward + ranking_metrics",
        median_ms(lambda: (ndcg_reward(rank), ranking_metrics(rank)), args.reps, device),
        args.users,
    )
    fused_ms = median_ms(lambda: sort_free_step(scores, target, exclude), args.reps, device)
    report("sort-free: rank + softmax + metrics", fused_ms, args.users)
    naive_ms = median_ms(lambda: naive_rank(scores, target, exclude), args.naive_reps, device)
    report("naive: argsort rank only", naive_ms, args.users)

    agree = torch.equal(naive_rank(scores, target, exclude), rank)  # random float scores: no ties
    print(f"  naive / sort-free time: {naive_ms / fused_ms:.1f}x; ranks agree: {agree}", flush=True)
    return 0 if agree else 1
