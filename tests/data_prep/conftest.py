"""Hand-made files in the exact Amazon 2023 / 2018 formats, and a loopback HTTP server with Range support."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DAY_MS = 86_400_000
T0 = 1_664_582_400_000  # 2022-10-01 00:00 UTC


def review_2023(user: str, item: str, rating: float, ts: int) -> dict:
    return {
        "rating": rating,
        "title": "Love it &amp; more",
        "text": "Works great.<br />Would buy again — 👍",
        "images": [],
        "asin": item + "X",
        "parent_asin": item,
        "user_id": user,
        "timestamp": ts,
        "helpful_vote": 0,
        "verified_purchase": True,
    }


def meta_2023(item: str, title: str | None, **extra) -> dict:
    record = {
        "main_category": "Video Games",
        "title": title,
        "average_rating": 4.5,
        "rating_number": 12,
        "features": ["Fast"],
        "description": ["A <b>great</b> game &amp; more.", "Second   paragraph."],
        "price": "None",
        "images": [
            {"thumb": "https://x/y.jpg", "large": "https://x/z.jpg", "variant": "MAIN", "hi_res": None}
        ],
        "videos": [],
        "store": "Acme",
        "categories": ["Video Games", "PC"],
        "details": {"Release date": "May 1, 2020", "Rank": [1, 2]},
        "parent_asin": item,
        "bought_together": None,
    }
    record.update(extra)
    return record


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


def small_log() -> list[tuple[str, str, float, int]]:
    """(user, item, rating, ts): 4 users over 6 items; u1 repeats a pair; u5 has one interaction."""
    rows = []
    for u, items in {"u1": "ABCDE", "u2": "BCDEF", "u3": "CDEFA", "u4": "DEFAB"}.items():
        for k, item in enumerate(items):
            rows.append((u, "I" + item, float(1 + (k % 5)), T0 + (k * 4 + int(u[1])) * DAY_MS))
    rows.append(("u1", "IA", 2.0, T0 + 30 * DAY_MS))  # repeated pair: the earlier one is kept
    rows.append(("u5", "IB", 5.0, T0 + 3 * DAY_MS))  # single interaction: no sample
    rows.append(("u2", "IZ", 5.0, T0 + 2 * DAY_MS))  # item missing from the metadata
    return rows


def small_meta() -> list[dict]:
    return [
        meta_2023("IA", "Caf&eacute; Racer &amp; Friends"),
        meta_2023("IB", "  Space   <i>Odyssey</i>\n2 "),
        meta_2023("IC", "Ünïcödé Quest 日本"),
        meta_2023("ID", "Dragon Saga", description=[]),
        meta_2023("IE", "Racing Pro", categories=[]),
        meta_2023("IF", "Puzzle Box", average_rating=None, rating_number=None),
        meta_2023("IG", None),  # missing title: dropped
    ]


@pytest.fixture
def amazon2023_files(tmp_path: Path) -> dict[str, Path]:
    reviews = [review_2023(u, i, r, t) for u, i, r, t in small_log()]
    return {
        "jsonl": write_jsonl(tmp_path / "Video_Games.jsonl", reviews),
        "jsonl.gz": write_jsonl(tmp_path / "Video_Games.jsonl.gz", reviews),
        "csv": write_lines(
            tmp_path / "Video_Games.csv",
            ["user_id,parent_asin,rating,timestamp"] + [f"{u},{i},{r},{t}" for u, i, r, t in small_log()],
        ),
        "meta": write_jsonl(tmp_path / "meta_Video_Games.jsonl.gz", small_meta()),
    }


@pytest.fixture
def amazon2018_files(tmp_path: Path) -> dict[str, Path]:
    reviews = [
        {
            "overall": r,
            "verified": True,
            "reviewTime": "10 20, 2022",
            "reviewerID": u,
            "asin": i,
            "style": {"Format:": " Paperback"},
            "reviewerName": "Tracy",
            "reviewText": "Nice &amp; good",
            "summary": "Great",
            "unixReviewTime": t // 1000,
        }
        for u, i, r, t in small_log()
    ]
    meta = [
        {
            "category": ["Books", "Science &amp; Math"],
            "tech1": "",
            "description": [f"About {m['parent_asin']}."],
            "title": m["title"] or "",
            "also_buy": [],
            "brand": "Big Dreams",
            "feature": [],
            "rank": "1,234 in Books (" if k % 2 else ["1 in Books"],
            "main_cat": "Books",
            "price": "$12.99" if k % 2 else "",
            "asin": m["parent_asin"],
            "imageURL": [],
        }
        for k, m in enumerate(small_meta())
    ]
    return {
        "reviews": write_jsonl(tmp_path / "Books_5.json.gz", reviews),
        "meta": write_jsonl(tmp_path / "meta_Books.json.gz", meta),
    }


class FileServer:
    """Serves `files` (url path -> bytes) on 127.0.0.1 with HTTP Range; can cut the first response short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_first_response_at: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_first_response_at is not None:
                    payload = payload[: server.cut_first_response_at]
                    server.cut_first_response_at = None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def ranges(self) -> list[str | None]:
        return [r for _, r in self.requests]


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
