"""`recipes/recpo.py` stops in one line, with a non-zero status, where a model cannot be loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_unreachable_hub_id_stops_recpo_in_one_line(synthetic_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [
        sys.executable,
        "recipes/recpo.py",
        "--model_name_or_path",
        "nobody/no-such-model",
        "--data_dir",
    ]
    command += [
        str(synthetic_data),
        "--output_dir",
        str(tmp_path / "out"),
        "--use_cpu",
        "true",
        "--report_to",
        "none",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: --model_name_or_path nobody/no-such-model: not a local folder"
    )
