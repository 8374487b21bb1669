"""recipes/memory.py: freed heap memory really goes back to the system (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from recipes.memory import release_freed_memory

# 200 blocks of 1 MB in glibc's heap (mmap and automatic trimming held off by the environment, so that the
# blocks come from the heap as a run's tensors do once glibc has raised its dynamic thresholds), all freed but
# the last, which pins the heap's top: only malloc_trim can give the free middle back.
SCRIPT = """
from recipes.memory import release_freed_memory, resident_mb

blocks = [bytearray(2**20) for _ in range(200)]
pin = blocks[-1]
del blocks
before = resident_mb()
released = release_freed_memory()
print(released, before, resident_mb())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)
def test_freed_heap_pages_go_back_to_the_system():
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40), "PYTHONPATH": "."}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    assert before - after > 150  # of the ~199 MB freed


def test_says_false_where_the_c_library_is_not_glibc(monkeypatch):
    from recipes import memory

    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    memory._malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        memory._malloc_trim.cache_clear()


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_releases_after_every_step_and_index_only_when_asked(
    on, tokenizer, synthetic_data, tmp_path, monkeypatch
):
    from recipes import trainer as trainer_module
    from tests.recipes.conftest import build_trainer

    calls = []
    monkeypatch.setattr(trainer_module, "release_freed_memory", lambda: calls.append(1) or True)
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", release_freed_memory=on)
    trainer.train()
    trainer.refresh_item_index()
    # Asked for: after two steps and after the two index builds (the first RecPO step's and the one asked for
    # here). Always: once before each of the two builds.
    assert len(calls) == (6 if on else 2)


def test_every_item_index_build_starts_by_handing_back_what_training_freed(
    tokenizer, synthetic_data, tmp_path, monkeypatch
):
    from recipes import trainer as trainer_module
    from tests.recipes.conftest import build_trainer

    events = []
    build = trainer_module.build_item_index
    monkeypatch.setattr(trainer_module, "release_freed_memory", lambda: events.append("release") or True)
    monkeypatch.setattr(
        trainer_module, "build_item_index", lambda *a, **k: events.append("build") or build(*a, **k)
    )
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out")  # release_freed_memory off
    trainer.train()
    trainer.ranking_evaluation({"valid": trainer.eval_rows})
    assert events == ["release", "build", "release", "build"]


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_switches_the_norms_and_mlps_when_asked(on, tokenizer, synthetic_data, tmp_path):
    from tests.recipes.conftest import build_trainer

    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", keep_fewer_activations=on)
    switched = [m for m in trainer.model.modules() if "forward" in vars(m) and type(m).__name__ == "LlamaMLP"]
    assert bool(switched) == on
