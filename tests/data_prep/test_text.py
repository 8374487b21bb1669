import pyarrow as pa

from data_prep.text import clean_items, clean_text


def _items(titles, prices=None):
    n = len(titles)
    columns = {
        "item_id": [f"I{k}" for k in range(n)],
        "title": titles,
        "description": [["<p>Hello &amp;   world</p>", "   "]] * n,
        "categories": [["Toys &amp; Games", ""]] * n,
        "average_rating": [4.0] * n,
        "rating_number": [3] * n,
    }
    if prices is not None:
        columns["price"] = prices
    return pa.table(columns)


def test_clean_text_unescapes_strips_tags_and_collapses_whitespace():
    out = clean_text(pa.array(["Caf&eacute; &amp; <b>Bar</b>\n\t 2", "  a\u00a0 b ", "plain", None]))
    assert out.to_pylist() == ["Café & Bar 2", "a b", "plain", None]


def test_clean_text_removes_tags_that_were_escaped():
    assert clean_text(pa.array(["&lt;i&gt;Odyssey&lt;/i&gt; 2"])).to_pylist() == ["Odyssey 2"]


def test_clean_text_keeps_unicode():
    assert clean_text(pa.array(["Ünïcödé Quest 日本 🎮"])).to_pylist() == ["Ünïcödé Quest 日本 🎮"]


def test_clean_items_drops_unusable_titles_and_counts_each_reason():
    titles = ["Good Game", None, "   ", "X", "var x = 1; function(){}", " ".join(["w"] * 21), "Twenty " * 20]
    items, counters = clean_items(_items(titles), max_title_words=20, require_price=False)
    assert items.column("title").to_pylist() == ["Good Game", ("Twenty " * 20).strip()]
    assert counters["missing_title"] == 2
    assert counters["one_character_title"] == 1
    assert counters["markup_title"] == 1
    assert counters["too_long_title"] == 1
    assert counters["items_out"] == 2


def test_clean_items_cleans_description_and_categories():
    items, _ = clean_items(_items(["Good Game"]), max_title_words=20, require_price=False)
    row = items.to_pylist()[0]
    assert row["description"] == "Hello & world"
    assert row["categories"] == ["Toys & Games"]


def test_clean_items_keeps_the_first_row_of_a_repeated_item_id():
    table = _items(["First", "Second"]).set_column(0, "item_id", pa.array(["I0", "I0"]))
    items, counters = clean_items(table, max_title_words=20, require_price=False)
    assert items.column("title").to_pylist() == ["First"] and counters["duplicate_item_ids"] == 1


def test_require_price_drops_items_whose_price_is_not_a_number():
    table = _items(["A game", "B game", "C game", "D game"], prices=["$12.99", "None", None, "1,299.00"])
    items, counters = clean_items(table, max_title_words=20, require_price=True)
    assert items.column("item_id").to_pylist() == ["I0", "I3"] and counters["price_not_a_number"] == 2
