"""Publish a run folder to the Hugging Face Hub: what makes it usable elsewhere, nothing local.

    python -m recipes.publish outputs/smollm2-135m-movielens-recpo --repo-id me/smollm2-recpo --dry-run
    python -m recipes.publish outputs/smollm2-135m-movielens-recpo --repo-id me/smollm2-recpo [--private]

`recipes/recpo.py --push_to_hub true` (with TRL's hub options `--hub_model_id`, `--hub_token`,
`--hub_private_repo`) calls the same `publish` once the run is finished.

Uploaded: the model card (rendered for the repository), the adapter (or full weights) and tokenizer, the
item index, catalog, prior and scoring settings, the data's stats, run_config.json, the results, the trainer
state, the evaluation traces, and `evaluations/` and `baselines/` when present. Left out: checkpoints
(optimizer state), wandb logs, the rollout tables, training_args.bin (a pickle that holds local paths) and
anything else. `--dry-run` lists both, with sizes.

No local path is uploaded: in the JSON files every absolute path is reduced to its last component, and
adapter_config.json names the base model by its Hub id (`recipes.model_card.public_base_model`); the run
folder itself is left as it is. A text file that still holds a local path (the home, working, temporary or
cache folders, the run's own folder) stops the upload, naming the file. Vocabulary files (tokenizer.json, ...)
are written by the tokenizer library, hold no paths, and are not searched: a token may look like one.

Failures (no token, offline, the Hub unreachable or refusing) end in one line saying what is missing and
where the run is saved (`PublishError`); nothing is uploaded then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from recipes.model_card import ABSOLUTE_PATH, CARD_FILE, public_base_model, public_name, render_card
from recipes.run_folder import RUN_CONFIG_FILE, read_json

ROOT_FILES = (
    CARD_FILE,
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "item_index.pt",
    "score_prior.pt",
    "catalog.parquet",
    "scoring.json",
    "data_stats.json",
    RUN_CONFIG_FILE,
    "results.json",
    "results_before.json",
    "trainer_state.json",
)
FOLDERS = {"traces": ("*.jsonl",), "evaluations": ("*.json", "*.jsonl"), "baselines": ("*.json",)}
LEFT_OUT = (  # (pattern, why), first match wins; anything else: "not part of a published run"
    ("checkpoint-*", "checkpoint: optimizer and scheduler state, rng state, training_args.bin"),
    ("wandb", "wandb logs (`wandb sync` uploads them to wandb)"),
    ("completions", "rollout tables of training (logs)"),
    ("training_args.bin", "a pickle of the training arguments, local paths included"),
    ("optimizer.pt", "optimizer state"),
    ("scheduler.pt", "scheduler state"),
    ("rng_state*", "random number generator state"),
)
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".jinja", ".txt")
HUB_ERRORS_HINT = (
    "log in with `hf auth login`, set HF_TOKEN, or pass the token (--token; recpo.py: --hub_token)"
)


class PublishError(RuntimeError):
    """The run could not be published; the message is one line: what is missing, and where the run is."""


@dataclass
class Upload:
    """One file to upload: where it is, its name in the repository, and its bytes when rewritten."""

    path: Path
    path_in_repo: str
    content: bytes | None = None  # None: the file as it is

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.path.stat().st_size


# ------------------------------------------------------------------ selection


def files_to_publish(run_dir: Path) -> list[Path]:
    """The run folder's files that a published run holds, in upload order."""
    run_dir = Path(run_dir)
    found = [
        p for p in sorted(run_dir.iterdir()) if p.is_file() and any(fnmatch(p.name, n) for n in ROOT_FILES)
    ]
    for folder, patterns in FOLDERS.items():
        found += [
            p
            for p in sorted((run_dir / folder).glob("*"))
            if p.is_file() and any(fnmatch(p.name, pattern) for pattern in patterns)
        ]
    return found


def left_out(run_dir: Path) -> list[tuple[str, str]]:
    """(name, why) of every top-level entry of the run folder that is not uploaded, and of unlisted sub-files."""
    run_dir = Path(run_dir)
    chosen = set(files_to_publish(run_dir))
    out = []
    for entry in sorted(run_dir.iterdir()):
        if entry in chosen or (entry.is_dir() and entry.name in FOLDERS):
            continue
        why = next(
            (why for pattern, why in LEFT_OUT if fnmatch(entry.name, pattern)), "not part of a published run"
        )
        out.append((entry.name + ("/" if entry.is_dir() else ""), why))
    for folder in FOLDERS:
        for entry in sorted((run_dir / folder).glob("*")):
            if entry not in chosen:
                out.append((f"{folder}/{entry.name}", "not part of a published run"))
    return out


# ------------------------------------------------------------------ contents, without local paths


def public_json(value):
    """`value` with every absolute local path reduced to its last component."""
    if isinstance(value, dict):
        return {k: public_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_json(v) for v in value]
    if isinstance(value, str) and ABSOLUTE_PATH.match(value) and "\n" not in value:
        return public_name(value)
    return value


def upload_content(path: Path, run_dir: Path, run_config: dict, repo_id: str) -> bytes | None:
    """The bytes to upload instead of the file (None: upload it as it is)."""
    if path.parent == run_dir and path.name == CARD_FILE and (run_dir / RUN_CONFIG_FILE).is_file():
        return render_card(run_dir, repo_id).encode()
    if path.suffix != ".json" or path.name in VOCABULARY_FILES:
        return None
    document = json.loads(path.read_text(encoding="utf-8"))
    public = public_json(document)
    if path.name == "adapter_config.json" and path.parent == run_dir:
        base = document.get("base_model_name_or_path")
        public["base_model_name_or_path"] = public_base_model(run_config) or public_name(str(base or ""))
    if public == document:
        return None
    return (json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode()


def local_markers(run_dir: Path, run_config: dict) -> list[str]:
    """Text that only a local path holds: this machine's home, working, temporary and cache folders, the run's."""
    from huggingface_hub import constants

    from recipes.modeling import cache_root

    candidates = [
        Path.home(),
        Path.cwd(),
        Path(tempfile.gettempdir()),
        Path(run_dir).resolve(),
        cache_root(),
        Path(constants.HF_HOME),
        Path(sys.prefix),
    ]
    for named in (
        (run_config.get("script") or {}).get("data_dir"),
        (run_config.get("model") or {}).get("model_name_or_path"),
    ):
        if named and Path(named).expanduser().exists():
            candidates.append(Path(named).expanduser().resolve())
    markers = {str(p.expanduser()) for p in candidates if len(p.expanduser().parts) > 1}
    return sorted(markers | {m + os.sep for m in markers}, key=len, reverse=True)


def check_no_local_paths(upload: Upload, markers: Sequence[str]) -> None:
    if upload.path.suffix not in TEXT_SUFFIXES or upload.path.name in VOCABULARY_FILES:
        return
    text = (upload.content or upload.path.read_bytes()).decode("utf-8", errors="replace")
    found = next((m for m in markers if m in text), None)
    if found is not None:
        raise PublishError(
            f"{upload.path}: holds the local path {found!r}; not uploading a file that names this machine"
        )


def prepare(run_dir: Path, repo_id: str) -> list[Upload]:
    """What `publish` uploads, rewritten where needed and checked for local paths."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise PublishError(f"{run_dir}: no {RUN_CONFIG_FILE}; not a recipes/recpo.py output folder")
    run_config = read_json(run_dir / RUN_CONFIG_FILE)
    paths = files_to_publish(run_dir)
    if not (run_dir / CARD_FILE).is_file():  # the card is rendered for the repository either way
        paths.insert(0, run_dir / CARD_FILE)
    uploads = [
        Upload(p, p.relative_to(run_dir).as_posix(), upload_content(p, run_dir, run_config, repo_id))
        for p in paths
    ]
    markers = local_markers(run_dir, run_config)
    for upload in uploads:
        check_no_local_paths(upload, markers)
    return uploads


# ------------------------------------------------------------------ upload


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached or refuses: HTTP, connection and OS errors."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, HFValidationError, OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def human_size(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def total_size(uploads: Sequence[Upload]) -> str:
    return human_size(sum(u.size for u in uploads))


def not_published(repo_id: str, run_dir: Path, uploads: Sequence[Upload], reason: str) -> PublishError:
    saved = f"{len(uploads)} files, {total_size(uploads)} to upload" if uploads else "nothing uploaded"
    return PublishError(
        f"not published to {repo_id}: {reason}. The run is saved locally in {run_dir} ({saved}); "
        f"`python -m recipes.publish {run_dir} --repo-id {repo_id}` uploads it later"
    )


def publish(
    run_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "RecPO run",
    revision: str | None = None,
) -> list[Upload] | str:
    """Upload the run folder to the Hub model repository `repo_id` (created if needed); returns the commit's URL.

    With `dry_run`, returns what would be uploaded and touches no network. Raises PublishError (one line)."""
    run_dir = Path(run_dir)
    uploads = prepare(run_dir, repo_id)
    if dry_run:
        return uploads
    if hub_offline():
        raise not_published(repo_id, run_dir, uploads, "HF_HUB_OFFLINE is set, so the Hub cannot be reached")
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = token or get_token()
    if not token:
        raise not_published(repo_id, run_dir, uploads, f"no Hugging Face token ({HUB_ERRORS_HINT})")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(u.path_in_repo, u.content if u.content is not None else str(u.path))
        for u in uploads
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except _hub_errors() as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise not_published(
            repo_id, run_dir, uploads, f"the Hub could not be reached or refused ({reason})"
        ) from err
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def listing(uploads: Sequence[Upload], run_dir: Path, repo_id: str) -> str:
    """The dry run's report: every file with its size, then what is left out and why."""
    lines = [f"Would upload {len(uploads)} files ({total_size(uploads)}) from {run_dir} to {repo_id}:"]
    for u in uploads:
        note = (
            "  (rewritten: no local paths)" if u.content is not None and u.path_in_repo != CARD_FILE else ""
        )
        note = "  (rendered for the repository)" if u.path_in_repo == CARD_FILE else note
        lines.append(f"  {human_size(u.size):>9}  {u.path_in_repo}{note}")
    left = left_out(run_dir)
    if left:
        lines.append("Left out:")
        width = max(len(name) for name, _ in left)
        lines += [f"  {name:<{width}}  {why}" for name, why in left]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.publish",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="A recipes/recpo.py output folder.")
    parser.add_argument("--repo-id", required=True, help="The Hub model repository, e.g. me/smollm2-recpo.")
    parser.add_argument(
        "--dry-run", action="store_true", help="List what would be uploaded, with sizes; upload nothing."
    )
    parser.add_argument(
        "--private", action="store_true", help="Create the repository private (default: public)."
    )
    parser.add_argument(
        "--token",
        default=None,
        help="A Hugging Face write token (default: HF_TOKEN or the `hf auth login` one).",
    )
    parser.add_argument("--message", default="RecPO run", help="The commit message (default: RecPO run).")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Upload] | str:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise SystemExit(f"error: {run_dir}: no such folder")
    try:
        result = publish(run_dir, args.repo_id, args.token, args.private, args.dry_run, args.message)
    except PublishError as err:
        raise SystemExit(f"error: {err}") from None
    print(listing(result, run_dir, args.repo_id) if args.dry_run else f"published: {result}")
    return result


if __name__ == "__main__":
    main()
