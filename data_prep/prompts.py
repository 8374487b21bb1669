"""Chat-message prompts, stored model-agnostic; the trainer applies the model's chat template.

User prompt: system + user message (instruction, then one line per history item, newest last); no
assistant turn: the model writes its reasoning and ends with ANSWER_MARKER, whose hidden state is the
user vector. Item prompt: system + user message (instruction, title, rating, categories, description)
+ an assistant turn holding just ANSWER_MARKER (apply the template with continue_final_message=True).
Texts are short on purpose: the CPU default trains a 135M model and every token costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ANSWER_MARKER = "<answer>"
SYSTEM = "You are a recommender system."
USER_INSTRUCTION = (
    "Here is a user's history, oldest first. Reason briefly about the user's taste and what they "
    f"will want next, then write {ANSWER_MARKER}."
)
ITEM_INSTRUCTION = f"Summarise this item for a recommender, then write {ANSWER_MARKER}."
DESCRIPTION_WORDS = 100
MS_PER_TENTH_HOUR = 360_000
TENTHS_PER_DAY = 240
PROMPT_CHUNK = 100_000  # samples per vectorised batch: keeps every string array far below 2 GiB

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)


# ---- one prompt at a time (the reference the vectorised code is tested against) ----


def format_tenths(tenths: int) -> str:
    return f"{tenths // 10}.{tenths % 10}"


def format_age(ms: int) -> str:
    """How long before the target: '3d 4.0h'."""
    tenths = round(ms / MS_PER_TENTH_HOUR)
    return f"{tenths // TENTHS_PER_DAY}d {format_tenths(tenths % TENTHS_PER_DAY)}h"


def history_line(age_ms: int, title: str, rating: float) -> str:
    return f"- {format_age(age_ms)} ago: {title} (rated {format_tenths(round(rating * 10))})"


def user_messages(
    titles: Sequence[str], ages_ms: Sequence[int], ratings: Sequence[float]
) -> list[dict[str, str]]:
    """The prompt for one user: history items oldest first, ages measured back from the target time."""
    lines = [history_line(a, t, r) for t, a, r in zip(titles, ages_ms, ratings, strict=True)]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "\n".join([USER_INSTRUCTION, *lines])},
    ]


def item_messages(
    title: str,
    description: str = "",
    categories: Sequence[str] = (),
    average_rating: float | None = None,
    rating_number: int | None = None,
) -> list[dict[str, str]]:
    lines = [ITEM_INSTRUCTION, f"Title: {title}"]
    if average_rating is not None and rating_number is not None:
        lines.append(f"Rating: {average_rating:.1f} ({rating_number} ratings)")
    elif average_rating is not None:
        lines.append(f"Rating: {average_rating:.1f}")
    if categories:
        lines.append("Categories: " + ", ".join(categories))
    words = description.split()
    if words:
        lines.append("Description: " + " ".join(words[:DESCRIPTION_WORDS]))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "\n".join(lines)},
        {"role": "assistant", "content": ANSWER_MARKER},
    ]


# ---- whole columns ----


def _pool(texts: list[str]) -> pa.Array:
    return pa.array(texts, pa.string())


def _user_chunk(
    titles: pa.Array,
    target_ts: np.ndarray,
    offsets: np.ndarray,
    history: np.ndarray,
    history_ts: np.ndarray,
    history_ratings: np.ndarray,
) -> pa.Array:
    """user_messages for a run of samples whose histories are flat[offsets[i]:offsets[i+1]]."""
    offsets = offsets - offsets[0]
    n, total = len(offsets) - 1, int(offsets[-1])
    if n and np.diff(offsets).min() < 1:
        raise ValueError("every sample needs at least one history item")
    first, last = np.zeros(total, dtype=np.int64), np.zeros(total, dtype=np.int64)
    first[offsets[:-1]] = 1
    last[offsets[1:] - 1] = 1
    age = np.repeat(target_ts, np.diff(offsets)) - history_ts  # (flat history,) ms
    tenths = np.rint(age / MS_PER_TENTH_HOUR).astype(np.int64)
    days = tenths // TENTHS_PER_DAY
    stars = np.clip(np.rint(history_ratings * 10).astype(np.int64), 0, None)
    n_days, n_stars = int(days.max(initial=0)) + 1, int(stars.max(initial=0)) + 1
    # Every number is a lookup into a small pool of pre-formatted pieces. A sample's first line also
    # carries the system text and the instruction, its other lines end in a newline: the sample's
    # lines then lie back to back in one buffer, and both messages are views into it (no copy).
    head = SYSTEM + USER_INSTRUCTION + "\n"
    day_pool = _pool([f"- {d}d " for d in range(n_days)] + [f"{head}- {d}d " for d in range(n_days)])
    hour_pool = _pool([f"{format_tenths(t)}h ago: " for t in range(TENTHS_PER_DAY)])
    star_pool = _pool(
        [f" (rated {format_tenths(r)})\n" for r in range(n_stars)]
        + [f" (rated {format_tenths(r)})" for r in range(n_stars)]
    )
    lines = pc.binary_join_element_wise(
        day_pool.take(pa.array(days + first * n_days)),
        hour_pool.take(pa.array(tenths % TENTHS_PER_DAY)),
        titles.take(pa.array(history)),
        star_pool.take(pa.array(stars + last * n_stars)),
        "",
    )
    line_start = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + total + 1]
    sample_start = line_start[offsets].astype(np.int64)  # (n + 1,) byte offsets of each sample's text
    message_start = np.empty(2 * n + 1, dtype=np.int32)
    message_start[0:-1:2] = sample_start[:-1]
    message_start[1::2] = sample_start[:-1] + len(SYSTEM.encode())
    message_start[-1] = sample_start[-1]
    contents = pa.StringArray.from_buffers(2 * n, pa.py_buffer(message_start), lines.buffers()[2])
    roles = pa.array(["system", "user"]).take(pa.array(np.tile([0, 1], n)))
    list_offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    return pa.ListArray.from_arrays(
        list_offsets, pa.StructArray.from_arrays([roles, contents], fields=list(MESSAGE))
    )


def user_prompt_column(samples: Any, titles: pa.Array, chunk: int = PROMPT_CHUNK) -> pa.ChunkedArray:
    """user_messages for every sample, built over whole arrays `chunk` samples at a time."""
    chunks = []
    for start in range(0, max(len(samples), 1), chunk):
        stop = min(start + chunk, len(samples))
        lo, hi = samples.offsets[start], samples.offsets[stop]
        chunks.append(
            _user_chunk(
                titles,
                samples.timestamp[start:stop],
                samples.offsets[start : stop + 1],
                samples.history[lo:hi],
                samples.history_timestamps[lo:hi],
                samples.history_ratings[lo:hi],
            )
        )
    return pa.chunked_array(chunks, type=MESSAGES)


def item_prompt_column(items: pa.Table) -> pa.Array:
    """item_messages for every catalog item (one Python call per item: catalogs are far smaller than logs)."""
    rows = zip(
        items.column("title").to_pylist(),
        items.column("description").to_pylist(),
        items.column("categories").to_pylist(),
        items.column("average_rating").to_pylist(),
        items.column("rating_number").to_pylist(),
        strict=True,
    )
    return pa.array([item_messages(*row) for row in rows], type=MESSAGES)
