import gzip
import random

import pytest

from data_prep.download import DownloadError, amazon2023_urls, download

PAYLOAD = gzip.compress(b"".join(b'{"n": %d}\n' % random.Random(k).getrandbits(64) for k in range(30000)))


def test_urls_follow_the_amazon_2023_layout():
    reviews, meta = amazon2023_urls("https://host/amazon_2023/", "Video_Games", "5core")
    assert reviews == "https://host/amazon_2023/benchmark/5core/rating_only/Video_Games.csv.gz"
    assert meta == "https://host/amazon_2023/raw/meta_categories/meta_Video_Games.jsonl.gz"
    assert amazon2023_urls("h", "X", "reviews")[0] == "h/raw/review_categories/X.jsonl.gz"


def test_download_fetches_and_verifies_the_file(file_server, tmp_path):
    file_server.files["/f.jsonl.gz"] = PAYLOAD
    path = download(file_server.url + "/f.jsonl.gz", tmp_path)
    assert path.read_bytes() == PAYLOAD and not path.with_name("f.jsonl.gz.part").exists()


def test_verified_download_is_not_fetched_again(file_server, tmp_path):
    file_server.files["/f.jsonl.gz"] = PAYLOAD
    download(file_server.url + "/f.jsonl.gz", tmp_path)
    download(file_server.url + "/f.jsonl.gz", tmp_path)
    assert len(file_server.requests) == 1


def test_partial_download_resumes_with_a_range_request(file_server, tmp_path):
    file_server.files["/f.jsonl.gz"] = PAYLOAD
    (tmp_path / "f.jsonl.gz.part").write_bytes(PAYLOAD[:1000])
    path = download(file_server.url + "/f.jsonl.gz", tmp_path)
    assert file_server.ranges() == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD


def test_connection_cut_mid_file_is_retried_from_where_it_stopped(file_server, tmp_path):
    file_server.files["/f.jsonl.gz"] = PAYLOAD
    file_server.cut_first_response_at = 300_000
    path = download(file_server.url + "/f.jsonl.gz", tmp_path, backoff_s=0.01)
    first, second = file_server.ranges()
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 300_000
    assert path.read_bytes() == PAYLOAD


def test_corrupt_gzip_is_moved_aside_and_reported(file_server, tmp_path):
    broken = bytearray(PAYLOAD)
    broken[len(broken) // 2 : len(broken) // 2 + 64] = b"\0" * 64
    file_server.files["/f.jsonl.gz"] = bytes(broken)
    with pytest.raises(DownloadError, match="corrupt"):
        download(file_server.url + "/f.jsonl.gz", tmp_path)
    assert (tmp_path / "f.jsonl.gz.corrupt").exists() and not (tmp_path / "f.jsonl.gz").exists()


def test_missing_file_fails_without_retrying(file_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(file_server.url + "/nope.jsonl.gz", tmp_path, backoff_s=0.01)
    assert len(file_server.requests) == 1
