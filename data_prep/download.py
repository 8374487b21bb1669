"""Resumable downloads of the Amazon Reviews 2023 files, checked to be whole gzip before use.

A download goes to `<file>.part` and resumes from its size with an HTTP Range request; failures are
retried with exponential backoff. Once complete, the gzip is decompressed through to the end; a
corrupt file is moved to `<file>.corrupt` and reported, so the next run downloads it afresh.
"""

from __future__ import annotations

import gzip
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from data_prep.options import Amazon2023Options

CHUNK = 1 << 16  # bytes read at a time: a broken connection loses at most this much
TIMEOUT_S = 60


class DownloadError(Exception):
    """A file could not be downloaded (or came down corrupt); the message says what to do."""


class _Retry(Exception):
    pass


def amazon2023_urls(base_url: str, category: str, reviews_kind: str) -> tuple[str, str]:
    """(reviews url, metadata url) of a category, following the amazon_2023 site layout."""
    root = base_url.rstrip("/")
    if reviews_kind == "5core":
        reviews = f"{root}/benchmark/5core/rating_only/{category}.csv.gz"
    else:
        reviews = f"{root}/raw/review_categories/{category}.jsonl.gz"
    return reviews, f"{root}/raw/meta_categories/meta_{category}.jsonl.gz"


def check_gzip(path: Path) -> None:
    """Decompress the whole file; raises DownloadError if it is truncated or corrupt."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(16 * CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise DownloadError(f"{path} is not a whole gzip file ({err})") from err


def _download_once(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as err:
        raise _Retry(str(err)) from err
    with response:
        if response.status_code == 416 and have:
            return  # the part file already holds every byte
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise DownloadError(
                f"{url}: HTTP {response.status_code} {response.reason} (is the category name right?)"
            )
        if response.status_code == 200:
            have = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as fh,
            tqdm(
                total=expected, initial=have, unit="B", unit_scale=True, desc=part.name[: -len(".part")]
            ) as bar,
        ):
            try:
                for chunk in response.iter_content(CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as err:
                raise _Retry(f"connection broke after {fh.tell()} bytes ({err})") from err
    if expected is not None and part.stat().st_size < expected:
        raise _Retry(f"connection closed after {part.stat().st_size} of {expected} bytes")


def download(
    url: str, cache_dir: str | Path, retries: int = 5, backoff_s: float = 1.0, timeout: float = TIMEOUT_S
) -> Path:
    """The verified local copy of `url` in `cache_dir`, downloading (or resuming) it if needed."""
    dest = Path(cache_dir) / Path(urlsplit(url).path).name
    verified = dest.with_name(dest.name + ".verified")
    if dest.is_file() and verified.is_file() and verified.read_text().strip() == str(dest.stat().st_size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        dest.replace(part)  # present but never verified: check it as if just downloaded
    else:
        for attempt in range(1, retries + 1):
            try:
                _download_once(url, part, timeout)
                break
            except _Retry as err:
                if attempt == retries:
                    raise DownloadError(
                        f"{url}: gave up after {retries} attempts ({err}); run again to resume from {part}"
                    ) from err
                wait = backoff_s * 2 ** (attempt - 1)
                print(f"download of {url} failed ({err}); retrying in {wait:.0f}s", flush=True)
                time.sleep(wait)
    if dest.name.endswith(".gz"):
        try:
            check_gzip(part)
        except DownloadError as err:
            corrupt = dest.with_name(dest.name + ".corrupt")
            part.replace(corrupt)
            raise DownloadError(
                f"{url}: the download is corrupt ({err.__cause__}); moved it to {corrupt}; "
                "run again to download it afresh"
            ) from err
    part.replace(dest)
    verified.write_text(f"{dest.stat().st_size}\n")
    return dest


def amazon2023_files(options: Amazon2023Options) -> tuple[Path, Path]:
    """Local (reviews, meta) files: the given ones, or the category's downloads."""
    if options.reviews and options.meta:
        return Path(options.reviews), Path(options.meta)
    if not options.category:
        raise DownloadError("amazon2023 needs --category CAT, or both --reviews FILE and --meta FILE")
    reviews_url, meta_url = amazon2023_urls(options.base_url, options.category, options.reviews_kind)
    cache = Path(options.cache_dir)
    reviews = Path(options.reviews) if options.reviews else download(reviews_url, cache, options.retries)
    meta = Path(options.meta) if options.meta else download(meta_url, cache, options.retries)
    return reviews, meta
