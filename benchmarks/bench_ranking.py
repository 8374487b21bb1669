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
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument(
        "--naive-users",
        type=int,
        default=256,
        help="users given to the argsort path (it takes minutes at 4,096 on 2 cores); compare users/s",
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
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


def ranks_agree(
    naive: torch.Tensor, scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor
) -> bool:
    """The argsort rank may place exact ties (float32 randn has a few) before or after the target."""
    rank = target_rank(scores, target, exclude)
    target_score = scores.gather(1, target.unsqueeze(1))  # (users, 1)
    equal = (scores == target_score) & ~exclude  # (users, items)
    ties = equal.scatter_(1, target.unsqueeze(1), False).sum(dim=1)  # other candidates equal to the target
    return bool(((rank - naive >= 0) & (rank - naive <= ties)).all())


def report(name: str, ms: float, users: int) -> None:
    print(f"  {name:<44} {ms:10.1f} ms median  {users / (ms / 1e3):12,.0f} users/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    users, items = args.users, args.items
    print(
        f"ranking {users:,} users x {items:,} items, {args.history} history items each, device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps}",
        flush=True,
    )
    scores = torch.randn(users, items, generator=generator).to(device)  # (users, items)
    target = torch.randint(0, items, (users,), generator=generator).to(device)
    history = torch.randint(0, items, (users, args.history), generator=generator).tolist()

    exclude = history_mask(history, items, device=device)
    rank = target_rank(scores, target, exclude)
    timings = {
        "history_mask (from lists)": lambda: history_mask(history, items, device=device),
        "target_rank": lambda: target_rank(scores, target, exclude),
        "softmax_reward": lambda: softmax_reward(scores, target, exclude),
        "ndcg_reward + ranking_metrics": lambda: (ndcg_reward(rank), ranking_metrics(rank)),
    }
    sort_free_ms = 0.0
    for name, fn in timings.items():
        ms = median_ms(fn, args.reps, device)
        report(name, ms, users)
        sort_free_ms += ms if name != "history_mask (from lists)" else 0.0
    report("sort-free total: rank + softmax + metrics", sort_free_ms, users)

    few = slice(0, min(args.naive_users, users))
    naive_users = few.stop
    naive_ms = median_ms(lambda: naive_rank(scores[few], target[few], exclude[few]), args.reps, device)
    report(f"naive argsort rank only ({naive_users:,} users)", naive_ms, naive_users)
    per_user_ratio = (naive_ms / naive_users) / (sort_free_ms / users)
    agree = ranks_agree(
        naive_rank(scores[few], target[few], exclude[few]), scores[few], target[few], exclude[few]
    )
    print(
        f"  argsort rank alone costs {per_user_ratio:.1f}x the whole sort-free step per user; ranks agree: {agree}"
    )
    return 0 if agree else 1
