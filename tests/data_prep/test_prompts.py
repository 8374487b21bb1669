import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.prompts import (
    ANSWER_MARKER,
    format_age,
    item_messages,
    item_prompt_column,
    user_messages,
    user_prompt_column,
)
from data_prep.sequences import Samples

HOUR_MS = 3_600_000


def test_answer_marker_is_the_answer_tag():
    assert ANSWER_MARKER == "<answer>"


def test_age_is_days_and_tenths_of_hours():
    assert format_age(3 * 24 * HOUR_MS + 4 * HOUR_MS) == "3d 4.0h"
    assert format_age(int(23.96 * HOUR_MS)) == "1d 0.0h"  # rounding never shows 24.0h


def test_user_prompt_has_instruction_then_one_line_per_item_newest_last_and_no_assistant_turn():
    messages = user_messages(["Old", "New"], [2 * 24 * HOUR_MS, HOUR_MS // 2], [4.0, 3.5])
    assert [m["role"] for m in messages] == ["system", "user"]
    lines = messages[1]["content"].split("\n")
    assert ANSWER_MARKER in lines[0]
    assert lines[1:] == ["- 2d 0.0h ago: Old (rated 4.0)", "- 0d 0.5h ago: New (rated 3.5)"]


def test_item_prompt_prefills_the_marker_and_cuts_the_description_to_100_words():
    messages = item_messages("Game", " ".join(f"w{k}" for k in range(150)), ["Toys", "Puzzles"], 4.25, 17)
    assert messages[-1] == {"role": "assistant", "content": ANSWER_MARKER}
    user = messages[1]["content"].split("\n")
    assert user[1:4] == ["Title: Game", "Rating: 4.2 (17 ratings)", "Categories: Toys, Puzzles"]
    assert user[4].split() == ["Description:"] + [f"w{k}" for k in range(100)]


def test_item_prompt_leaves_out_unknown_fields():
    assert item_messages("Film")[1]["content"].split("\n")[1:] == ["Title: Film"]


def test_item_prompt_column_writes_each_items_messages():
    items = pa.table(
        {
            "title": ["A", "B", "C"],
            "description": ["", "  two\n words ", ""],
            "categories": [[], ["c", "d"], []],
            "average_rating": [None, 3.0, 4.5],
            "rating_number": [None, 2, None],
        }
    )
    system = {"role": "system", "content": "You are a recommender system."}
    instruction = "Summarise this item for a recommender, then write <answer>."
    answer = {"role": "assistant", "content": "<answer>"}
    assert item_prompt_column(items).to_pylist() == [
        [system, {"role": "user", "content": f"{instruction}\nTitle: A"}, answer],
        [
            system,
            {
                "role": "user",
                "content": f"{instruction}\nTitle: B\nRating: 3.0 (2 ratings)\nCategories: c, d\n"
                "Description: two words",
            },
            answer,
        ],
        [system, {"role": "user", "content": f"{instruction}\nTitle: C\nRating: 4.5"}, answer],
    ]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 5),
)
def test_vectorised_user_prompts_equal_the_one_at_a_time_reference(lengths, seed, chunk):
    rng = np.random.default_rng(seed)
    titles = pa.array(["Ünï", "Space Odyssey 2", "Café & Bar", "x y z"])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    samples = Samples(
        user=np.zeros(len(lengths), dtype=np.int64),
        target=np.zeros(len(lengths), dtype=np.int64),
        timestamp=rng.integers(10**12, 2 * 10**12, len(lengths)),
        row=np.arange(len(lengths)),
        offsets=offsets,
        history=rng.integers(0, len(titles), total),
        history_timestamps=rng.integers(0, 10**12, total),
        history_ratings=rng.choice([1.0, 2.5, 5.0], total),
    )
    column = user_prompt_column(samples, titles, chunk=chunk)
    for i in range(len(lengths)):
        a, b = offsets[i], offsets[i + 1]
        expected = user_messages(
            [titles[j].as_py() for j in samples.history[a:b]],
            (samples.timestamp[i] - samples.history_timestamps[a:b]).tolist(),
            samples.history_ratings[a:b].tolist(),
        )
        assert column[i].as_py() == expected
