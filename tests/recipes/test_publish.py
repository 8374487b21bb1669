"""Publishing a run (recipes/publish.py): what is uploaded and what is left out, the dry run's listing, no local
path in any uploaded file, and one-line failures without a token or a network. No test touches the network:
huggingface_hub's HfApi is replaced by a recorder, or by one that raises what the Hub raises offline."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import OfflineModeIsEnabled

from recipes import publish
from recipes.modeling import EMBEDDED_HUB_ID, EMBEDDED_MODEL

REPO = "someone/tiny-recpo"
PUBLISHED = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "item_index.pt",
    "score_prior.pt",
    "catalog.parquet",
    "scoring.json",
    "data_stats.json",
    "run_config.json",
    "results.json",
    "results_before.json",
    "trainer_state.json",
}


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run, with what a long run leaves besides: a checkpoint, wandb logs, rollout tables."""
    run = tmp_path / "runs" / tiny_run.name
    shutil.copytree(tiny_run, run)
    for name in (
        "checkpoint-1/optimizer.pt",
        "checkpoint-1/adapter_model.safetensors",
        "wandb/run-1/logs.txt",
    ):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"x")
    (run / "completions").mkdir()
    (run / "completions" / "completions_00001.parquet").write_bytes(b"x")
    (run / "notes.log").write_text("mine")
    return run


class NoNetwork:
    """An HfApi that fails the test if anything would be sent."""

    def __init__(self, *args, **kwargs):
        pytest.fail("HfApi was used: this would have touched the network")


class RecordingApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls = [("init", {"token": token})]

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        RecordingApi.calls.append(
            ("create_commit", {"repo_id": repo_id, "operations": list(operations), **kwargs})
        )
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def raising_api(error: BaseException):
    class Api(RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise error

    return Api


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def names(paths, run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in paths}


# ------------------------------------------------------------------ selection


def test_the_selection_keeps_what_the_run_needs_and_leaves_out_state_and_logs(run):
    chosen = names(publish.files_to_publish(run), run)
    traces = {f"traces/{p.name}" for p in (run / "traces").glob("*.jsonl")}
    assert traces and chosen == PUBLISHED | traces
    left = dict(publish.left_out(run))
    assert set(left) == {"checkpoint-1/", "wandb/", "completions/", "training_args.bin", "notes.log"}
    assert "optimizer" in left["checkpoint-1/"] and "pickle" in left["training_args.bin"]


def test_the_dry_run_lists_every_upload_with_its_size_and_what_is_left_out(run, capsys):
    uploads = publish.main([str(run), "--repo-id", REPO, "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith(f"Would upload {len(uploads)} files (")
    for upload in uploads:
        line = next(
            line for line in out.splitlines() if line.rstrip().split("  (")[0].endswith(upload.path_in_repo)
        )
        assert publish.human_size(upload.size) in line
    left = out.split("Left out:\n", 1)[1]
    assert "checkpoint-1/" in left and "wandb/" in left and "training_args.bin" in left


def test_no_uploaded_file_holds_a_local_path(run, tiny_model_dir, synthetic_data):
    uploads = publish.prepare(run, REPO)
    local = [
        str(p) for p in (run.resolve(), tiny_model_dir, synthetic_data, Path.home(), tempfile.gettempdir())
    ]
    for upload in uploads:
        if upload.path.suffix in (".json", ".jsonl", ".md", ".jinja"):
            text = (upload.content or upload.path.read_bytes()).decode()
            assert not [p for p in local if p in text], upload.path_in_repo
    by_name = {u.path_in_repo: u for u in uploads}
    adapter = json.loads(by_name["adapter_config.json"].content)
    assert adapter["base_model_name_or_path"] == tiny_model_dir.name  # a local model: its name only
    stats = json.loads(by_name["data_stats.json"].content)
    assert stats["source"]["reviews"] == "Synthetic.jsonl.gz"
    # The run folder itself keeps its local paths: it loads its base model from there.
    assert str(tiny_model_dir) in (run / "adapter_config.json").read_text()


def test_an_embedded_run_names_its_base_by_the_hub_id(run):
    config = json.loads((run / "run_config.json").read_text())
    config["model"]["model_name_or_path"] = EMBEDDED_MODEL
    (run / "run_config.json").write_text(json.dumps(config))
    by_name = {u.path_in_repo: u for u in publish.prepare(run, REPO)}
    assert json.loads(by_name["adapter_config.json"].content)["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert f"hf download {REPO} --local-dir tiny-recpo" in by_name["README.md"].content.decode()


def test_a_text_file_holding_a_local_path_stops_the_upload(run):
    (run / "traces" / "valid_step000009.jsonl").write_text(
        json.dumps({"note": f"see {run.resolve()}/x"}) + "\n"
    )
    with pytest.raises(publish.PublishError, match="valid_step000009.jsonl: holds the local path"):
        publish.prepare(run, REPO)


# ------------------------------------------------------------------ failures in one line


def one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as stop:
        publish.main(argv)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("error: not published to")
    return message


def test_offline_publishing_fails_in_one_line_saying_where_the_run_is(run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_exit([str(run), "--repo-id", REPO])
    assert "HF_HUB_OFFLINE" in message and f"saved locally in {run}" in message


def test_publishing_without_a_token_fails_in_one_line(run, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    message = one_line_exit([str(run), "--repo-id", REPO])
    assert "no Hugging Face token" in message and "hf auth login" in message


@pytest.mark.parametrize(
    "error",
    [
        OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled."
        ),
        httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        OSError("Network is unreachable"),
    ],
    ids=["offline", "no-dns", "no-route"],
)
def test_a_hub_that_cannot_be_reached_fails_in_one_line(run, monkeypatch, error):
    monkeypatch.setattr(huggingface_hub, "HfApi", raising_api(error))
    message = one_line_exit([str(run), "--repo-id", REPO, "--token", "hf_fake"])
    assert "the Hub could not be reached" in message and f"saved locally in {run}" in message


def test_publishing_commits_the_selection_to_the_repository(run, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = publish.publish(run, REPO, token="hf_fake", private=True)
    assert url.startswith(f"https://huggingface.co/{REPO}")
    (_, init), (_, repo), (_, commit) = RecordingApi.calls
    assert init["token"] == "hf_fake" and repo == {"repo_id": REPO, "private": True, "exist_ok": True}
    uploaded = {op.path_in_repo for op in commit["operations"]}
    assert uploaded == names(publish.files_to_publish(run), run)


# ------------------------------------------------------------------ recipes/recpo.py --push_to_hub


def test_recpo_push_to_hub_offline_saves_the_run_and_stops_in_one_line(
    tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    from transformers import Trainer

    from recipes import recpo
    from tests.recipes.conftest import recpo_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda *a, **k: pytest.fail("TRL's hub push ran"))
    out = tmp_path / "pushed-run"
    args = recpo_args(out, tiny_model_dir, synthetic_data, max_steps=1, push_to_hub=True, hub_model_id=REPO)
    with pytest.raises(SystemExit) as stop:
        recpo.main(*args)
    message = str(stop.value)
    assert "\n" not in message and "not published to someone/tiny-recpo: HF_HUB_OFFLINE" in message
    assert f"saved locally in {out}" in message
    assert (out / "results.json").is_file() and (out / "catalog.parquet").is_file()
    assert f"hf download {REPO}" in (out / "README.md").read_text()  # the card is for the repository


def test_the_trainers_push_to_hub_publishes_the_run_folder(tokenizer, synthetic_data, tmp_path, monkeypatch):
    from tests.recipes.conftest import build_trainer

    calls = []
    monkeypatch.setattr(publish, "publish", lambda *a, **k: calls.append((a, k)) or "url")
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", push_to_hub=True, hub_token="hf_x")
    assert trainer.push_requested and not trainer.args.push_to_hub  # TRL never pushes by itself
    assert trainer.push_to_hub() == "url"
    ((args, kwargs),) = calls
    assert args == (str(tmp_path / "out"), "out") and kwargs["token"] == "hf_x"
