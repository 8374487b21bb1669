"""Train a reasoning recommender with RecPO.

    accelerate launch recipes/recpo.py --config recipes/configs/smollm2-135m/movielens/recpo.yaml
    python recipes/recpo.py --help        # every option, from the same dataclasses as the YAML recipes

Reads a dataset written by `python -m data_prep`, trains the model with RecPO (TRL GRPO plus the item
loss), evaluates Hit@K/NDCG@K on valid before, during and after training, and writes
`<output_dir>/results.json` ({"valid": {...}, "test": {...}}), the adapter, and what makes the folder usable on
its own (recipes/run_folder.py: item index, catalog, prior, scoring settings, the data's stats) with its model
card (README.md, recipes/model_card.py). With `--push_to_hub true` (TRL's hub options) the folder is then
published as `python -m recipes.publish` does it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by accelerate: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import EarlyStoppingCallback, set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from recipes import eval_cache, modeling
from recipes.config import RecPOConfig, ScriptArguments, recipe_settings
from recipes.memory import peak_memory_metrics, release_freed_memory
from recipes.model_card import write_card
from recipes.onednn import bound_kernel_caches
from recipes.precision import Precision, resolve_precision
from recipes.publish import PublishError, hub_offline, publish
from recipes.results import format_table, write_results
from recipes.run_folder import RUN_CONFIG_FILE, copy_data_stats, write_json
from recipes.trainer import RecPOTrainer, TimeBudgetCallback, steps_per_epoch

logger = logging.getLogger("recpo")


def setup_logging(training_args: RecPOConfig) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()


def setup_wandb(training_args: RecPOConfig) -> None:
    """wandb works without an account: offline unless the user configured it (`wandb sync` uploads later)."""
    if "wandb" not in (training_args.report_to or []):
        return
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_DIR", training_args.output_dir)
    os.environ.setdefault("WANDB_PROJECT", "recpo")
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)


def load_data(script_args: ScriptArguments) -> datasets.DatasetDict:
    path = Path(script_args.data_dir)
    if not path.exists() and script_args.prepare_data:
        logger.info("Preparing the embedded MovieLens-100K data into %s", path)
        subprocess.run([sys.executable, "-m", "data_prep", "movielens", "--out", str(path)], check=True)
    if not path.exists():
        raise SystemExit(f"No dataset at {path}: run `make prepare-data` (or pass --prepare_data true).")
    data = datasets.load_from_disk(str(path))
    missing = {"train", "valid", "test", "items"} - set(data)
    if missing:
        raise SystemExit(
            f"{path} lacks the split(s) {sorted(missing)}; rebuild it with `python -m data_prep`."
        )
    return data


def run_precision(
    script_args: ScriptArguments, model_args: ModelConfig, training_args: RecPOConfig
) -> Precision:
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    return resolve_precision(script_args.precision, model_args.dtype, on_cpu)


def load_model_and_tokenizer(model_args: ModelConfig, training_args: RecPOConfig, precision: Precision):
    """The model and tokenizer, or one line saying why not (an unreachable Hub id, a missing package)."""
    name = model_args.model_name_or_path
    try:
        return _load_model_and_tokenizer(model_args, training_args, precision)
    except modeling.MissingDependencyError as err:
        raise SystemExit(f"error: {err}") from None
    except (OSError, ValueError) as err:
        local = Path(name).expanduser().is_dir()
        what = (
            "cannot load the model folder"
            if local
            else "not a local folder, and loading it as a Hub id failed"
        )
        message = " ".join(str(err).split())
        raise SystemExit(f"error: --model_name_or_path {name}: {what} ({message})") from None


def _load_model_and_tokenizer(model_args: ModelConfig, training_args: RecPOConfig, precision: Precision):
    modeling.check_quantisation_available(model_args.load_in_4bit, model_args.load_in_8bit)
    modeling.check_optimizer_available(training_args.optim)
    modeling.check_precision_available(training_args.bf16, training_args.fp16)
    tokenizer = modeling.load_tokenizer(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    quantization_config = get_quantization_config(model_args)
    model = modeling.load_model(
        model_args.model_name_or_path,
        dtype=precision.torch_dtype,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
        device_map={"": PartialState().local_process_index} if quantization_config is not None else None,
    )
    return model, tokenizer


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """{"valid/hit@5": x} -> {"<prefix>/valid/hit@5": x}: the names evaluations before and after training log."""
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def evaluate_untrained(
    trainer: RecPOTrainer, splits: dict, data: datasets.DatasetDict, use_cache: bool
) -> tuple[dict[str, float], dict]:
    """The untrained model's metrics and per-user ranks: from the evaluation cache when the same weights, data,
    users and settings were evaluated before (the first training step then reuses the cached item index)."""
    key = None
    if use_cache:
        fingerprints = {name: data[name]._fingerprint for name in ("items", "valid", "test")}
        key = eval_cache.evaluation_key(trainer, splits, fingerprints)
        cached = eval_cache.load(key)
        if cached is not None:
            metrics, per_user, index = cached
            trainer.item_index, trainer.index_step = (
                index.to(trainer.accelerator.device),
                trainer.state.global_step,
            )
            logger.info("Untrained model's evaluation read from %s", eval_cache.cache_path(key))
            return metrics, per_user
    metrics = trainer.ranking_evaluation(splits)
    per_user = dict(trainer.last_per_user)
    if key is not None and trainer.accelerator.is_main_process:
        eval_cache.save(key, metrics, per_user, trainer.item_index)
    return metrics, per_user


def main(script_args: ScriptArguments, training_args: RecPOConfig, model_args: ModelConfig) -> dict:
    bound_kernel_caches()  # before the first matrix product: the kernel caches otherwise grow all run
    set_seed(training_args.seed)
    setup_logging(training_args)
    setup_wandb(training_args)
    warn_if_push_cannot_work(training_args)
    modeling.cpu_attention_settings()

    data = load_data(script_args)
    train = data["train"]
    if script_args.max_train_samples is not None and script_args.max_train_samples < len(train):
        train = train.shuffle(seed=training_args.seed).select(range(script_args.max_train_samples))

    precision = run_precision(script_args, model_args, training_args)
    logger.info(
        "Base weights in %s (precision %s: %s)", precision.dtype, precision.requested, precision.reason
    )
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, precision)
    if training_args.release_freed_memory:
        release_freed_memory()  # loading peaks at twice the bf16 model (its float32 copy): give that back

    if training_args.evals_per_epoch:
        per_epoch = steps_per_epoch(len(train), training_args, training_args.world_size)
        every = max(1, round(per_epoch / training_args.evals_per_epoch))
        training_args.eval_steps = training_args.save_steps = every
    callbacks = []
    budget = None
    if script_args.time_budget_minutes:
        budget = TimeBudgetCallback(
            script_args.time_budget_minutes, recpo_share=script_args.time_budget_recpo_share
        )
        callbacks.append(budget)
    if training_args.early_stopping_patience and training_args.eval_strategy != "no":
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))

    trainer = RecPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        items=data["items"],
        eval_dataset=data["valid"],
        test_dataset=data["test"],
        processing_class=tokenizer,
        peft_config=modeling.restrict_lora_to_top_layers(
            get_peft_config(model_args), model, script_args.lora_top_layers
        ),
        callbacks=callbacks,
        max_eval_users=script_args.max_eval_users,
        max_test_users=script_args.max_test_users,
        users_seed=script_args.eval_users_seed,
        prior_split=data["train"],
    )
    if budget is not None:
        budget.end_warmup = trainer.end_item_warmup  # the trainer did not exist when the callback was made
        budget.show_last_step = trainer.show_last_step

    splits = {"valid": trainer.eval_rows}
    if script_args.evaluate_test:
        splits["test"] = trainer.test_rows
    before, per_user_before = {}, {}
    if script_args.evaluate_before and training_args.resume_from_checkpoint is None:
        before, per_user_before = evaluate_untrained(
            trainer, splits, data, script_args.cache_untrained_evaluation
        )
        trainer.log_metrics_only(prefixed("before", before))

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if before:
        # train() starts a new state: put the untrained model's figures back, as step 0, for the report.
        trainer.state.log_history.insert(0, {**prefixed("before", before), "step": 0})

    after = trainer.ranking_evaluation(splits)
    per_user_after = dict(trainer.last_per_user)
    # The peak of the whole run, the final evaluation included (the training steps log theirs as they go).
    trainer.log_metrics_only({**prefixed("final", after), **peak_memory_metrics()})
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json beside results.json: the report draws its curves from it
    trainer.save_item_index(training_args.output_dir)
    results = {}
    if trainer.accelerator.is_main_process:
        results = write_results(training_args.output_dir, after, before, per_user_after, per_user_before)
        print(format_table(after, before, per_user_after, per_user_before))
        write_run_config(script_args, training_args, model_args, precision)
        copy_data_stats(script_args.data_dir, Path(training_args.output_dir))
        card = write_card(Path(training_args.output_dir), hub_repo_id(trainer))
        logger.info("Model card: %s", card)
    trainer.accelerator.wait_for_everyone()
    if trainer.push_requested and trainer.accelerator.is_main_process:
        push(trainer)
    return results


def write_run_config(
    script_args: ScriptArguments, training_args: RecPOConfig, model_args: ModelConfig, precision: Precision
) -> None:
    """The run's options (and the settings changed from the defaults, for the model card) beside its results."""
    document = {
        "script": vars(script_args),
        "model": dataclasses.asdict(model_args),
        "precision": dataclasses.asdict(precision),
        "data_dir": script_args.data_dir,
        "training": recipe_settings(training_args),
    }
    write_json(Path(training_args.output_dir) / RUN_CONFIG_FILE, document)


def hub_repo_id(trainer: RecPOTrainer) -> str | None:
    """The repository `--push_to_hub` publishes to (TRL's default: the output folder's name), or None."""
    if not trainer.push_requested:
        return None
    return trainer.args.hub_model_id or Path(trainer.args.output_dir).name


def warn_if_push_cannot_work(training_args: RecPOConfig) -> None:
    """Say at the start, not only after training, that the push at the end will fail."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import get_token

    if hub_offline() or not (training_args.hub_token or get_token()):
        logger.warning(
            "--push_to_hub: %s; the run will be saved locally and the push at the end will fail",
            "HF_HUB_OFFLINE is set" if hub_offline() else "no Hugging Face token",
        )


def push(trainer: RecPOTrainer) -> None:
    """Publish the finished run folder (recipes.publish), or stop with one line saying why not."""
    args = trainer.args
    try:
        url = publish(
            args.output_dir,
            hub_repo_id(trainer),
            token=args.hub_token,
            private=bool(args.hub_private_repo),
            revision=args.hub_revision,
        )
    except PublishError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"published: {url}")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, RecPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
