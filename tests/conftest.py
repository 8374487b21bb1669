"""One cache folder per test session, so the tests leave nothing in the user's `$RECPO_CACHE`.

The tiny runs of the suite write untrained evaluations and item indexes keyed by their random weights; those
belong to the session, not to the user's cache. Only the converted embedded model (`models/`, half a minute to
build) is shared with the user's cache, through a link, so it is converted once per machine, not per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_recpo_cache(tmp_path_factory) -> Path:
    user_cache = Path(os.environ.get("RECPO_CACHE") or Path.home() / ".cache" / "recpo")
    (user_cache / "models").mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("recpo-cache")
    (cache / "models").symlink_to(user_cache / "models", target_is_directory=True)
    os.environ["RECPO_CACHE"] = str(cache)
    return cache
