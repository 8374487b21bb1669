"""Load a model to evaluate or recommend with, and the item index that goes with it.

`--model M` of `recipes.evaluate` and `recipes.recommend` is one of:
- a training output folder (`recipes/recpo.py --output_dir`): the PEFT adapter (or full weights), the
  tokenizer, `run_config.json`, the trainer's `item_index.pt`, and what the run scores with (its catalog,
  scoring settings and prior: recipes/run_folder.py);
- a checkpoint folder inside it (`checkpoint-N/`): adapter and tokenizer, no item index (its run's catalog,
  scoring settings and prior apply);
- a local model folder or a Hub id (anything `from_pretrained` reads);
- the embedded default `embedded/SmolLM2-135M-Instruct`.

A PEFT adapter is loaded onto its base model (`base_model_name_or_path` of `adapter_config.json`; when
that folder is gone, e.g. the converted embedded model of another machine's cache, the run's
`run_config.json` names the model it was trained from) and merged into it, which makes inference
faster and gives the same vectors up to float rounding.

Item index reuse. The catalog's item vectors cost one forward pass per item, so they are reused when
they provably belong to the model being evaluated:
- an index in the cache (`$RECPO_CACHE/item_index/<fingerprint>.pt`) is keyed by a fingerprint of the
  loaded weights (every byte of every parameter and buffer, with its name, shape and dtype: any
  change to the weights, LoRA merged in included, changes it) and of the item prompts' token ids
  (catalog, prompt text and tokenizer); it is used only when both match;
- the trainer's `item_index.pt` in an output folder is used when its `num_items` matches the catalog, it
  belongs to the weights beside it (it records the sha256 of the adapter file the trainer saved just before
  it; an index without that record must be written no earlier than the weights: an adapter saved later
  means other weights), and the run's own catalog (`catalog.parquet` in the run folder, or else the run's
  dataset when it can still be found) has the same item ids in the same order as the catalog ranked.
Anything else rebuilds the index (and stores it in the cache unless told not to).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from recipes.evaluation import build_item_index
from recipes.modeling import EMBEDDED_HUB_ID, EMBEDDED_MODEL, cache_root, load_model, load_tokenizer
from recipes.precision import DTYPES, resolve_precision
from recipes.run_folder import (
    CATALOG_FILE,
    ITEM_INDEX_FILE,
    PRIOR_FILE,
    RUN_CONFIG_FILE,
    RunFolderError,
    catalog_item_ids,
    file_sha256,
    read_scoring,
    run_file,
)
from rewards.prior import ScorePrior

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ModelLoadError(RuntimeError):
    """`--model` names something that cannot be loaded; the message says what is missing where."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what --model said
    description: str  # what was loaded, for the log and the printed table
    folder: Path | None  # the local folder --model named, if any
    weights_file: Path | None  # the adapter or model weights in `folder`
    trainer_index: Path | None  # the trainer's item_index.pt beside the weights, if any
    run_config: dict | None  # the run's run_config.json (the folder's, or its parent's for a checkpoint)
    prior: ScorePrior | None = None  # the run's popularity prior: the run ranks with it
    scoring: dict | None = None  # the run's scoring.json: marker, reasoning, tau, reasoning length
    catalog: Path | None = None  # the run's catalog.parquet: the items its index and prior are rows of


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return torch.device(name)


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err


def _run_config(folder: Path) -> dict | None:
    """run_config.json of the run: in the folder itself, or its parent when the folder is a checkpoint."""
    for candidate in (folder / RUN_CONFIG_FILE, folder.parent / RUN_CONFIG_FILE):
        if candidate.is_file():
            return _read_json(candidate)
    return None


def read_prior(path: Path) -> ScorePrior:
    """A run's popularity prior: `score_prior.pt`, or a run (or checkpoint) folder holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = next((c for c in (path / PRIOR_FILE, path.parent / PRIOR_FILE) if c.is_file()), None)
        if found is None:
            raise ModelLoadError(
                f"{path}: no {PRIOR_FILE} here (the run was trained without a popularity prior)"
            )
        path = found
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return ScorePrior.from_dict(data, str(path))
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{path}: not a readable popularity prior ({err})") from err


def _run_prior(folder: Path) -> ScorePrior | None:
    if (folder / PRIOR_FILE).is_file() or (folder.parent / PRIOR_FILE).is_file():
        return read_prior(folder)
    return None


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else that is not on disk was meant as a local path."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name).parent.is_dir()  # `outputs/run` while `outputs/` is here


def _base_model(adapter_dir: Path, run_config: dict | None) -> str:
    """The model an adapter was trained on, as a name `load_model` accepts.

    A run of the embedded default loads the embedded model whatever its adapter_config.json says: a published
    run names the Hub's HuggingFaceTB/SmolLM2-135M-Instruct there (recipes/publish.py), but the adapter was
    trained on the embedded, de-quantised Q4_1 copy, which is also here offline."""
    base = _read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    trained_from = ((run_config or {}).get("model") or {}).get("model_name_or_path")
    if base and Path(base).is_dir():
        return base
    if trained_from == EMBEDDED_MODEL and base in (EMBEDDED_HUB_ID, EMBEDDED_MODEL, None, ""):
        return EMBEDDED_MODEL
    if base and not _looks_like_path(base):
        return base
    if trained_from:  # the base folder is gone (e.g. another machine's cache): use what the run started from
        logger.info("Adapter base %s is not here; loading the run's model %s", base, trained_from)
        return trained_from
    if base and Path(base).parts[-2:] == ("models", "SmolLM2-135M-Instruct"):
        return EMBEDDED_MODEL  # the converted embedded model, in some other cache
    raise ModelLoadError(
        f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a folder here, and no "
        f"{RUN_CONFIG_FILE} names the model the run was trained from; set that field to the base model's "
        "folder or Hub id"
    )


def _tokenizer_source(folder: Path, fallback: str) -> str:
    for candidate in (folder, folder.parent):
        if (candidate / "tokenizer_config.json").is_file():
            return str(candidate)
    return fallback


def inference_dtype(dtype: str, run_config: dict | None, device: torch.device) -> str:
    """`--dtype`: as given, or for `auto` the run's own precision (run_config.json) and otherwise the machine's
    (`recipes.precision`: bfloat16 on a CPU with bf16 matrix units, float32 on other CPUs and on GPUs)."""
    if dtype != "auto":
        return dtype
    recorded = ((run_config or {}).get("precision") or {}).get("dtype")
    if recorded in DTYPES:
        return recorded
    if device.type != "cpu":
        return "float32"
    return resolve_precision("auto", None, on_cpu=True).dtype


def load_for_inference(source: str, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Resolve `--model` into a ready-to-run model (eval mode, on `device`) and its tokenizer.

    `dtype` is the base weights' dtype, or `auto` (`inference_dtype`)."""
    if dtype not in (*DTYPES, "auto"):
        raise ModelLoadError(f"--dtype {dtype}: expected auto or one of {sorted(DTYPES)}")
    target = pick_device(device)
    folder = Path(source).expanduser()
    if source == EMBEDDED_MODEL or not folder.exists():
        dtype = inference_dtype(dtype, None, target)
        if source != EMBEDDED_MODEL and _looks_like_path(source):
            raise ModelLoadError(
                f"--model {source}: no such folder (expected a training output folder, a checkpoint-N folder, "
                f"a model folder, a Hub id or {EMBEDDED_MODEL})"
            )
        model, tokenizer = _load_plain(source, dtype)
        return LoadedModel(model.to(target).eval(), tokenizer, source, source, None, None, None, None)
    if not folder.is_dir():
        raise ModelLoadError(
            f"--model {source}: a file, expected a folder (training output, checkpoint or model)"
        )
    run_config = _run_config(folder)
    dtype = inference_dtype(dtype, run_config, target)
    adapter = _first_file(folder, ADAPTER_WEIGHTS)
    if (folder / ADAPTER_CONFIG).is_file():
        if adapter is None:
            raise ModelLoadError(
                f"{folder}: has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})"
            )
        base = _base_model(folder, run_config)
        tokenizer = load_tokenizer(_tokenizer_source(folder, base))
        model = _load_adapter(folder, base, dtype)
        description = f"adapter {folder} on {base}"
        weights = adapter
    elif (folder / "config.json").is_file():
        weights = _first_file(folder, FULL_WEIGHTS)
        if weights is None:
            raise ModelLoadError(f"{folder}: has config.json but no weights ({' or '.join(FULL_WEIGHTS)})")
        model, tokenizer = _load_plain(str(folder), dtype, weights)
        description = f"model {folder}"
    else:
        checkpoints = _checkpoints(folder)
        hint = (
            f"; it holds {', '.join(p.name for p in checkpoints)}: pass one of them, e.g. {checkpoints[-1]}"
            if checkpoints
            else ""
        )
        raise ModelLoadError(
            f"--model {folder}: neither {ADAPTER_CONFIG} (a PEFT adapter) nor config.json (a model) is in this "
            f"folder{hint}"
        )
    index = folder / ITEM_INDEX_FILE
    try:
        scoring = read_scoring(folder)
    except RunFolderError as err:
        raise ModelLoadError(str(err)) from err
    return LoadedModel(
        model.to(target).eval(),
        tokenizer,
        source,
        description,
        folder,
        weights,
        index if index.is_file() else None,
        run_config,
        _run_prior(folder),
        scoring,
        run_file(folder, CATALOG_FILE),
    )


def _load_plain(name: str, dtype: str, weights: Path | None = None):
    """A model folder (`weights` its weights file) or a Hub id."""
    try:
        tokenizer = load_tokenizer(name)
        model = load_model(name, dtype=DTYPES[dtype])
    except SafetensorError as err:
        raise unreadable_weights(weights or Path(name), err) from err
    except (OSError, ValueError) as err:
        if weights is not None:
            raise ModelLoadError(f"{weights}: cannot load the model in {name} ({one_line(err)})") from err
        raise ModelLoadError(  # not a local folder, and no such (reachable) Hub id
            f"--model {name}: not a local folder, and loading it as a Hub id failed ({one_line(err)})"
        ) from err
    return model, tokenizer


def one_line(err: BaseException) -> str:
    """An exception's message on one line (transformers' load errors span several)."""
    return " ".join(str(err).split())


def unreadable_weights(path: Path, err: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a readable safetensors file ({one_line(err)}): it is truncated or corrupt; copy it again "
        "from the run (or re-download it)"
    )


@contextlib.contextmanager
def quiet_checkpointing_rename() -> Iterator[None]:
    """Silence transformers 5's notice that `is_gradient_checkpointing` was renamed: peft and TRL 1.16 read the old
    name when they wrap a model and at every batch TRL generates, which would print it on every RecPO step. Not
    ours to fix, and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_adapter(folder: Path, base: str, dtype: str) -> nn.Module:
    try:
        from peft import PeftModel
    except ImportError as err:  # pragma: no cover - peft is pinned in requirements.txt
        raise ModelLoadError(f"{folder} holds a PEFT adapter; loading it needs `pip install peft`") from err
    try:
        model = load_model(base, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{folder / ADAPTER_CONFIG}: cannot load the base model {base!r} ({err})"
        ) from err
    weights = _first_file(folder, ADAPTER_WEIGHTS)
    with quiet_checkpointing_rename():
        try:
            return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except SafetensorError as err:
            raise unreadable_weights(weights, err) from err
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # adapter_model.bin, or shapes
            raise ModelLoadError(
                f"{weights}: cannot load this adapter onto {base!r} ({one_line(err)[:300]}); a truncated file, or "
                "an adapter of another base model"
            ) from err


# ---------------------------------------------------------------------------------------------- item index


LORA_FACTOR_PAIRS = {"lora_B": "lora_A", "lora_embedding_B": "lora_embedding_A"}  # peft's names: B -> its A


def inert_lora_factors(model: nn.Module) -> set[str]:
    """Names of the LoRA factor pairs (A and B) whose B factor is all zeros. The update is B A, zero whatever A
    holds, so such an adapter computes nothing: peft starts every adapter so (B at zero, A random from the seed),
    and an untrained model of any seed, rank or choice of adapted layers is the base model."""
    params = dict(model.named_parameters())
    inert = set()
    with torch.no_grad():
        for name, tensor in params.items():
            parts = name.split(".")
            for i, part in enumerate(parts):
                partner = LORA_FACTOR_PAIRS.get(part)
                if partner is None:
                    continue
                a_name = ".".join([*parts[:i], partner, *parts[i + 1 :]])
                if a_name in params and not bool(tensor.detach().any()):
                    inert.update((a_name, name))
    return inert


def _computed_name(name: str) -> str:
    """A parameter's name as the computation sees it: peft's wrapper adds `.base_layer` only where it adapts a
    layer, so without it an adapted layer whose adapter is inert and an unadapted one read the same."""
    return name.replace(".base_layer.", ".")


def redraw_lora(model: nn.Module, seed: int) -> int:
    """Start every LoRA adapter afresh, as peft initialises one (A random, B zero), drawing from `seed` alone, so
    that every process draws the same factors; the global random state is left as it was. Returns how many
    adapted layers were reset."""
    layers = [m for m in model.modules() if hasattr(m, "reset_lora_parameters") and hasattr(m, "lora_A")]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for layer in layers:
            for adapter in list(layer.lora_A.keys()):
                layer.reset_lora_parameters(adapter, True)
    return len(layers)


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of what the weights compute: name, shape, dtype and every byte of each parameter and buffer, leaving
    out the LoRA adapters whose B is zero (`inert_lora_factors`: they change no output), and `.base_layer` from
    the names of the layers they wrap.

    Every byte: a sample of each tensor misses a change outside it (one token's embedding row, a LoRA update of a
    few elements), and the evaluation cache would report another model's figures. It costs about 0.5 s for
    SmolLM2-135M in float32 on one CPU core (sha256 at ~1 GB/s), against the minutes of the evaluation it keys.
    Buffers too: the rotary frequencies come from the config (rope_theta, rope_scaling), not from the weights.
    Without the inert adapters, the untrained model of every `--seed` (and of every LoRA rank or
    `--lora_top_layers`) has the base model's fingerprint, so such a run finds the untrained evaluation and item
    index another one cached.
    """
    inert = inert_lora_factors(model)
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in inert:
                continue
            digest.update(f"{_computed_name(name)}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
    return digest.hexdigest()


def prompts_fingerprint(item_prompt_ids: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for ids in item_prompt_ids:
        digest.update(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def index_fingerprint(model: nn.Module, item_prompt_ids: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(
        (weights_fingerprint(model) + prompts_fingerprint(item_prompt_ids)).encode()
    ).hexdigest()[:32]


def index_cache_path(fingerprint: str) -> Path:
    return cache_root() / "item_index" / f"{fingerprint}.pt"


def _load_index(path: Path) -> dict | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        logger.warning("Ignoring the unreadable item index %s (%s)", path, err)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("vectors"), torch.Tensor):
        logger.warning("Ignoring %s: not an item index (expected a dict with 'vectors')", path)
        return None
    return data


def _same_catalog(loaded: LoadedModel, item_ids: Sequence[str]) -> tuple[bool, str]:
    """Whether the run's own catalog has these item ids in this order: its catalog.parquet, or else its dataset
    (unknown when neither is here)."""
    if loaded.catalog is not None:
        try:
            theirs = catalog_item_ids(loaded.catalog)
        except RunFolderError as err:
            return False, str(err)
        if theirs != [str(i) for i in item_ids]:
            return False, f"the run was trained on another catalog ({loaded.catalog})"
        return True, f"same catalog as the run's {loaded.catalog.name}"
    run_config = loaded.run_config
    script = (run_config or {}).get("script") or {}
    data_dir = script.get("data_dir") or (run_config or {}).get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        return True, "the run's dataset is not here to compare catalogs; trusting num_items"
    try:
        from datasets import load_from_disk

        theirs = load_from_disk(data_dir)["items"]["item_id"]
    except (OSError, KeyError, ValueError) as err:
        return True, f"could not read the run's dataset {data_dir} ({err}); trusting num_items"
    if list(theirs) != list(item_ids):
        return False, f"the run was trained on another catalog ({data_dir})"
    return True, f"same catalog as the run's dataset {data_dir}"


def trainer_index_matches(loaded: LoadedModel, num_items: int, item_ids: Sequence[str]) -> tuple[bool, str]:
    """Whether the trainer's item_index.pt in an output folder belongs to these weights and this catalog."""
    path = loaded.trainer_index
    if path is None:
        return False, "no trainer item index"
    data = _load_index(path)
    if data is None:
        return False, f"{path} is unreadable"
    rows = int(data["vectors"].shape[0])
    if data.get("num_items", rows) != num_items or rows != num_items:
        return False, f"{path} has {rows} items, the catalog {num_items}"
    recorded = data.get("weights_sha256")
    if recorded and loaded.weights_file is not None:
        if file_sha256(loaded.weights_file) != recorded:
            return False, f"{path} was computed with other weights than {loaded.weights_file.name} (sha256)"
    elif loaded.weights_file is not None and path.stat().st_mtime < loaded.weights_file.stat().st_mtime:
        return False, f"{path} is older than {loaded.weights_file.name} (other weights)"
    return _same_catalog(loaded, item_ids)


def item_index_for(
    loaded: LoadedModel,
    item_prompt_ids: Sequence[Sequence[int]],
    item_ids: Sequence[str],
    batch_size: int = 32,
    rebuild: bool = False,
    use_cache: bool = True,
) -> tuple[torch.Tensor, str]:
    """The catalog's item vectors for this model (items, d), and a line saying where they came from."""
    num_items = len(item_prompt_ids)
    if not rebuild and loaded.trainer_index is not None:
        ok, why = trainer_index_matches(loaded, num_items, item_ids)
        if ok:
            vectors = _load_index(loaded.trainer_index)["vectors"].float()
            return vectors, f"reused {loaded.trainer_index} ({why})"
        logger.info("Not reusing the trainer's item index: %s", why)
    fingerprint = index_fingerprint(loaded.model, item_prompt_ids)
    cached = index_cache_path(fingerprint)
    if not rebuild and use_cache and cached.is_file():
        data = _load_index(cached)
        if (
            data is not None
            and data.get("fingerprint") == fingerprint
            and data["vectors"].shape[0] == num_items
        ):
            return data["vectors"].float(), f"reused {cached} (fingerprint {fingerprint[:12]})"
    vectors = build_item_index(
        loaded.model, item_prompt_ids, loaded.tokenizer.pad_token_id, batch_size, progress="item index"
    ).cpu()
    how = f"built for {num_items} items"
    if use_cache:
        save_index(cached, vectors, fingerprint, loaded.description)
        how += f", cached as {cached}"
    return vectors, how


def save_index(path: Path, vectors: torch.Tensor, fingerprint: str, model: str) -> None:
    """Write atomically: a crash or a concurrent writer never leaves half a file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".index-", suffix=".pt", dir=path.parent)
    os.close(handle)
    try:
        torch.save(
            {"vectors": vectors, "num_items": vectors.shape[0], "fingerprint": fingerprint, "model": model},
            tmp,
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "index_fingerprint",
    "item_index_for",
    "load_for_inference",
    "pick_device",
    "weights_fingerprint",
]
