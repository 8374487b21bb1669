"""RecPOTrainer: TRL's GRPOTrainer taught to recommend.

What RecPO changes, and where (DESIGN.md sections 2-4):
- rollouts stop at the answer marker and are closed with it (`_generate_single_turn`);
- the rollouts' prompts fold the system turn into the user turn where the chat template rejects one
  (Gemma-2's), as every other rendering of a stored prompt does (`_tokenize_prompts`);
- each rollout's user vector is scored against the full catalog index before the rewards are computed,
  and the scores reach the reward functions of `rewards/` as a column (`_calculate_rewards`);
- advantages and the relabel mask are RecPO's (`_generate_and_score_completions`);
- the loss is TRL's token surrogate plus the in-batch item surrogate, the user vector taken from the
  same forward pass as the token log-probs through a hook on the final norm (`_compute_loss`);
- evaluation is full-catalog ranking with greedy reasoning (`evaluate`).
Everything else (reward weighting, logging, checkpoints, accumulation, loss types) stays TRL's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed.nn
import torch.nn.functional as F
from accelerate.utils import gather_object
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, LogitsProcessorList, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from recipes.config import RecPOConfig
from recipes.decoding import UnsupportedSampling, reason_and_encode, sampling_warpers, unsupported_head
from recipes.evaluation import (
    COLLAPSED_SPREAD,
    RankingResult,
    batch_score_spread,
    build_item_index,
    collapse_warning,
    cosine_scores,
    evaluate_users,
    mean_pairwise_cosine,
    messages_for,
    rank_targets,
    render_item_prompt,
    render_user_prompt,
    sample_indices,
    score_spread,
    stop_at_marker,
    unwrap_for_generate,
)
from recipes.intervals import per_user_record
from recipes.loading import quiet_checkpointing_rename, redraw_lora
from recipes.logprobs import shared_prompt_logps
from recipes.memory import peak_memory_metrics, release_freed_memory
from recipes.precision import lean_lora
from recipes.run_folder import (
    ITEM_INDEX_FILE,
    PRIOR_FILE,
    SCORING_FILE,
    file_sha256,
    scoring_settings,
    write_catalog,
    write_json,
)
from recipes.saved_activations import keep_fewer_activations
from recipes.vectors import (
    MarkerCloser,
    capture_final_hidden,
    gradient_checkpointing_active,
    inference,
    last_token_hidden,
    left_pad,
    prefill,
)
from recipes.weight_average import WeightAverage
from rewards import get_reward_funcs
from rewards.advantages import group_advantages, relabel_mask
from rewards.prior import ScorePrior, train_prior
from rewards.ranking import ranking_metrics
from rewards.surrogate import in_batch_logits, item_surrogate_loss, mixed_log_frequency, target_log_frequency

logger = logging.getLogger(__name__)

RESTARTS_FILE = "warmup_restarts.json"  # in a checkpoint: the warm-up restarts so far, for a resumed run
AVERAGE_FILE = "warmup_average.pt"  # in a checkpoint: the warm-up's weight average so far, for a resumed run
RESTART_WINDOW = 10  # warm-up steps whose in-batch score spreads the restart check averages
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")
# TRL's metrics of completions that end in EOS: none does in RecPO (each is closed by the answer marker).
TRL_EOS_METRICS = (
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
)


class RecPOTrainer(GRPOTrainer):
    _tag_names = ["trl", "grpo", "recpo"]

    def __init__(
        self,
        model,
        args: RecPOConfig,
        train_dataset: Dataset,
        items: Dataset,
        eval_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        max_eval_users: int | None = None,
        max_test_users: int | None = None,
        prior_split: Dataset | None = None,
        users_seed: int | None = None,
    ):
        """`prior_split`: the split whose targets the popularity prior counts (default: `train_dataset`; the entry
        point passes the whole train split, which `train_dataset` may be a sample of). `users_seed` draws the
        max_eval_users / max_test_users subsets (default: args.seed; the entry point passes eval_users_seed).

        `push_to_hub` is taken out of TRL's hands: TRL would create the repository here, push every checkpoint
        (training_args.bin, a pickle of local paths, included) and its generic card. `push_requested` keeps the
        wish; the finished run folder is published once by `push_to_hub` (`recipes.publish`)."""
        self.push_requested = bool(args.push_to_hub)
        args.push_to_hub = False
        with quiet_checkpointing_rename():
            super().__init__(
                model=model,
                reward_funcs=get_reward_funcs(["ndcg", "softmax"]),
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                peft_config=peft_config,
                callbacks=callbacks,
            )
        if self._dist.is_zero3 or self._dist.is_fsdp:
            raise ValueError(
                "DeepSpeed ZeRO-3 and FSDP are not supported: they shard the parameters, so every process must run "
                "the same number of forwards, but the item index and the evaluation's greedy reasoning run as many as "
                "each process's own items and users need (they would deadlock), and the item and user vectors are "
                "read from the unwrapped model. Use DDP (recipes/accelerate/multi_gpu.yaml) or ZeRO-2 "
                "(recipes/accelerate/zero2.yaml)."
            )
        if not args.reasoning:
            self.log_completions = False  # no rollouts to show: TRL would print an empty table every log
        if lean_lora(self.model):  # the scaling folded into B, the sum fused, on a bf16 base computed in bf16
            logger.info("LoRA adapters computed in the base weights' dtype, their weights kept in float32")
        if args.keep_fewer_activations and (switched := keep_fewer_activations(self.model)):
            logger.info("%d norms and MLPs keep fewer activations for the backward pass", switched)
        if args.release_freed_memory:
            self.add_callback(ReleaseFreedMemoryCallback())
        tokenizer = self.processing_class
        self.closer = MarkerCloser(tokenizer, args.answer_marker)
        self.items = items
        self.item_titles: list[str] = list(items["title"])
        self.item_prompt_ids = [render_item_prompt(tokenizer, p) for p in items["prompt"]]
        self.item_index: torch.Tensor | None = None  # (items, d), float32
        self.index_step: int | None = None
        self.test_dataset = test_dataset
        users_seed = args.seed if users_seed is None else users_seed  # which users the evaluations score
        self.eval_rows = (
            _subset(eval_dataset, max_eval_users, users_seed) if eval_dataset is not None else None
        )
        self.test_rows = (
            _subset(test_dataset, max_test_users, users_seed) if test_dataset is not None else None
        )
        self.item_log_q = (
            target_log_frequency(train_dataset["target"], len(items)) if args.item_logq_correction else None
        )
        # The score's popularity prior, lambda log q (rewards/prior.py): added by every ranking and the item loss.
        self.score_prior: ScorePrior | None = train_prior(
            prior_split if prior_split is not None else train_dataset,
            len(items),
            args.popularity_prior_weight,
            args.popularity_prior_half_life_days,
        )
        self.prior_bias = self.score_prior.bias if self.score_prior is not None else None  # (items,)
        self.last_eval: dict[str, RankingResult] = {}
        self.last_per_user: dict[str, dict[str, list[int]]] = {}  # split -> recipes.intervals per-user record
        self._last_rewards_per_func: torch.Tensor | None = None
        self._last_targets: list[int] = []
        self._rollout_vectors: torch.Tensor | None = None  # user vectors read by the fast rollout loop
        self._want_marker_hidden = False  # ask the next log-prob forward for the hidden state at the marker
        self._marker_hidden: torch.Tensor | None = None
        self._reasons_logged: set[str] = set()
        self._bypassed_ddp = False  # this micro-batch's loss came from forwards DDP did not see
        # warmup_restarts: restarts so far, and the last warm-up steps' in-batch score spreads
        self.warmup_restarts_done = 0
        # steps added to the warm-up by the restarts (+) and by an early end for the time budget (-), for a resume
        self.warmup_steps_added = 0
        self._batch_spreads: deque[float] = deque(maxlen=RESTART_WINDOW)
        self._restart_checked_at: int | None = None
        # item_warmup_average_steps: the running mean, whether it has taken the weights' place, the step last added
        self.warmup_average: WeightAverage | None = None
        self.warmup_average_applied = False
        self._averaged_at: int | None = None

    # ------------------------------------------------------------------ item index
    def refresh_item_index(self) -> torch.Tensor:
        # A phase boundary (RecPO's start, an evaluation): glibc still holds what the training steps freed, in
        # blocks sized for them, and the index and the greedy reasoning after it allocate other sizes on top.
        # Handing the free pages back first (one call a phase, not a step): the final evaluation of a short CPU
        # run added 213 MB to the run's peak without it and nothing with it (reports/README.md).
        release_freed_memory()
        with inference(self.model), self._adapters_merged("The item index is built"):
            self.item_index = build_item_index(
                self.model,
                self.item_prompt_ids,
                self.processing_class.pad_token_id,
                self.args.item_batch_size,
                progress="item index" if self.accelerator.is_main_process else None,
                accelerator=self.accelerator,
            )
        self.index_step = self.state.global_step
        self._release_freed_memory()
        return self.item_index

    def _release_freed_memory(self) -> None:
        if self.args.release_freed_memory:
            release_freed_memory()

    def _ensure_index(self) -> torch.Tensor:
        step, built, warmup = self.state.global_step, self.index_step, self.args.item_warmup_steps
        # The item warm-up moved every item vector without using the index: rebuild it once RecPO starts.
        warmup_ended = 0 < warmup <= step and (built is None or built < warmup)
        stale = built is not None and (
            (self.args.index_refresh_steps > 0 and step - built >= self.args.index_refresh_steps)
            or warmup_ended
        )
        if self.item_index is None or stale:
            self.refresh_item_index()
            if warmup_ended:
                spread = self.check_spread(f"after the {warmup} item warm-up steps")
                self._metrics["train"]["index/score_spread"].append(spread)
        return self.item_index

    def check_spread(self, when: str) -> float:
        """The item index's score_spread; warns (on the main process) when the vectors have collapsed."""
        spread = score_spread(self.item_index, self.args.similarity_temperature)
        message = collapse_warning(spread, self.prior_bias)
        if message is not None and self.accelerator.is_main_process:
            logger.warning("%s (%s)", message, when)
        return spread

    def _refresh_rows(self, items: list[int]) -> None:
        """Give the batch's target items fresh vectors from the current policy, on every process alike."""
        with inference(self.model):
            vectors = self._item_vectors(self.model, items).float()
        if self.accelerator.num_processes > 1:
            vectors, _ = gather_with_grad(vectors, self.accelerator)
            items = [item for part in gather_object([items]) for item in part]
        self.item_index[items] = vectors.to(self.item_index.device)

    def _item_vectors(self, model, item_columns: Sequence[int]) -> torch.Tensor:
        """Vectors of the given items, with gradient if enabled; their shared instruction runs once. (len, d)"""
        prompts = [self.item_prompt_ids[i] for i in item_columns]
        return prefill(model, prompts, self.processing_class.pad_token_id).last_hidden

    # ------------------------------------------------------------------ warm-up restarts
    @property
    def warmup_started_at(self) -> int:
        """Global step of the current warm-up start: every restart happens warmup_restart_check_steps after the
        previous start, and adds as many steps to the warm-up."""
        return self.warmup_restarts_done * self.args.warmup_restart_check_steps

    def restart_warmup_if_collapsed(self) -> bool:
        """`warmup_restarts`: at the check step of the current warm-up start, start over if the batches' score
        spread says the item vectors collapsed (see the field's help). A collective at that step: every process
        reaches it at the same global step and they decide on the mean spread, so they restart together with the
        same new factors. Returns whether it restarted."""
        args, step = self.args, self.state.global_step
        if (
            self.warmup_restarts_done >= args.warmup_restarts
            or not self.in_item_warmup()
            or step - self.warmup_started_at != args.warmup_restart_check_steps
            or self._restart_checked_at == step  # the window's other micro-batches
        ):
            return False
        self._restart_checked_at = step
        recent = self._batch_spreads  # the last RESTART_WINDOW steps' spreads (the deque's maxlen)
        local = torch.tensor(
            [sum(recent) / len(recent) if recent else float("nan")], device=self.accelerator.device
        )
        spread = self.accelerator.gather(local).mean().item()
        self._metrics["train"]["warmup/check_spread"].append(spread)
        if not spread < COLLAPSED_SPREAD:
            return False
        spent = args.warmup_restart_check_steps
        self.warmup_restarts_done += 1
        layers = redraw_lora(self.model, args.seed + self.warmup_restarts_done)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        optimizer.state.clear()  # Adam's moments and step count: the new factors start from a fresh optimiser
        self._extend_warmup(spent)
        self._batch_spreads.clear()
        self.warmup_average = None  # it held the collapsed start's weights
        if self.accelerator.is_main_process:
            logger.warning(
                "The item vectors collapsed in the first %d warm-up steps (in-batch score spread %.3f < %.1f over "
                "the last %d steps): %d LoRA layers drawn afresh, Adam's state cleared, the warm-up continues on the "
                "next batches (restart %d of at most %d); item_warmup_steps is now %d and max_steps %d.",
                spent,
                spread,
                COLLAPSED_SPREAD,
                RESTART_WINDOW,
                layers,
                self.warmup_restarts_done,
                args.warmup_restarts,
                args.item_warmup_steps,
                self.state.max_steps,
            )
        return True

    def end_item_warmup(self, whole_warmup_minutes: float | None = None) -> None:
        """End the item warm-up after the current step; the run keeps its RecPO steps (`time_budget_recpo_share`).
        Every process calls it at the same step (TimeBudgetCallback decides together, and passes the budget
        that would have run every planned warm-up step at this machine's pace, for the message)."""
        step, planned = self.state.global_step, self.args.item_warmup_steps
        if step >= planned:
            return
        self._extend_warmup(step - planned)
        self._metrics["train"]["warmup/ended_early_at"].append(float(step))
        if self.accelerator.is_main_process:
            advice = (
                f" At this pace the whole warm-up needs --time_budget_minutes {math.ceil(whole_warmup_minutes)}."
                if whole_warmup_minutes is not None
                else ""
            )
            logger.warning(
                "The item warm-up has spent its share of the time budget: it ends at step %d of %d, and the %d RecPO "
                "steps follow (item_warmup_steps is now %d and max_steps %d).%s",
                step,
                planned,
                self.args.max_steps - step,
                self.args.item_warmup_steps,
                self.state.max_steps,
                advice,
            )

    def _extend_warmup(self, steps: int) -> None:
        """Lengthen (or, with `steps` < 0, shorten) the item warm-up and the run by `steps` (the progress bar too)."""
        self.warmup_steps_added += steps
        self.args.item_warmup_steps += steps
        self.args.max_steps += steps
        self.state.max_steps += steps
        self._respan_lr_schedule()
        self.show_last_step(self.state.max_steps)

    def show_last_step(self, step: int) -> None:
        """Make `step` the end of the progress bar, whose time left tqdm counts from it: the run's last step, or
        the step at which TimeBudgetCallback expects the budget to stop the run."""
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None and bar.total != step:
                bar.total = step
                bar.refresh()

    def _respan_lr_schedule(self) -> None:
        """Rebuild the learning-rate schedule over the run's new length, at the step it has reached.

        A step-based schedule is built for the length the run had at its start: after a restart lengthened the run,
        a linear decay would sit at zero for the added steps and a cosine one would climb back. A resumed run builds
        its schedule over the lengthened run too (`train`), so both follow the same rates. Constant schedules (the
        CPU recipe's) give the same rates either way.
        """
        old = self.lr_scheduler
        if not isinstance(old, torch.optim.lr_scheduler.LambdaLR):  # none yet, or not step-based (plateau)
            return
        self.lr_scheduler = None
        new = self.create_scheduler(num_training_steps=self.state.max_steps, optimizer=old.optimizer)
        new.last_epoch = old.last_epoch - 1
        new.step()  # LambdaLR's rate is closed-form in the step: base rate x lambda(last_epoch)
        self.callback_handler.lr_scheduler = new  # what callbacks are handed

    # ------------------------------------------------------------------ warm-up weight average
    def average_warmup_weights(self, final: bool = False) -> None:
        """`item_warmup_average_steps`: called before every training step and once after the last (`final`). Adds
        the weights the last optimizer step left when it was one of the warm-up's last N steps; once the warm-up
        is over (or the run ends), puts their mean in the weights' place, before anything reads them."""
        args, step = self.args, self.state.global_step
        window = args.item_warmup_average_steps
        if not window or self.warmup_average_applied:
            return
        end = args.item_warmup_steps
        if self._averaged_at != step and 0 < step <= end and step > end - window:
            self._averaged_at = step  # the micro-batches of one accumulation window share the step
            if self.warmup_average is None:
                self.warmup_average = WeightAverage()
            self.warmup_average.add(self.model, step)
        average = self.warmup_average
        if average is None or not (step >= end or final):
            return
        average.copy_to(self.model)
        self.warmup_average, self.warmup_average_applied = None, True  # its float32 copy is no longer needed
        self._metrics["train"]["warmup/averaged_steps"].append(float(average.count))
        if self.accelerator.is_main_process:
            logger.info(
                "item_warmup_average_steps: the trainable weights are now their mean over warm-up steps %d-%d (%d "
                "steps)",
                average.first_step,
                average.last_step,
                average.count,
            )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if not self.args.should_save or not folder.is_dir():
            return
        if self.warmup_restarts_done or self.warmup_steps_added:
            record = {
                "restarts": self.warmup_restarts_done,
                "started_at": self.warmup_started_at,  # for a reader: a resume derives it from restarts
                "extra_steps": self.warmup_steps_added,  # restarts add the steps they spent; an early end cuts
            }
            (folder / RESTARTS_FILE).write_text(json.dumps(record) + "\n")
        if self.warmup_average is not None:  # still being gathered (it is let go once used)
            torch.save(self.warmup_average.state_dict(), folder / AVERAGE_FILE)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """A resumed run takes back its warm-up restarts (and the steps they added) and its warm-up weight average
        from the checkpoint."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        folder = Path(folder) if isinstance(folder, (str, os.PathLike)) else None
        record_file = folder / RESTARTS_FILE if folder is not None else None
        if record_file is not None and record_file.is_file():
            record = json.loads(record_file.read_text())
            self.warmup_restarts_done = int(record["restarts"])
            self.warmup_steps_added = int(record["extra_steps"])
            self.args.item_warmup_steps += self.warmup_steps_added
            self.args.max_steps += self.warmup_steps_added
        average_file = folder / AVERAGE_FILE if folder is not None else None
        if average_file is not None and average_file.is_file():
            self.warmup_average = WeightAverage()
            self.warmup_average.load_state_dict(
                torch.load(average_file, map_location="cpu", weights_only=True)
            )
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        self.average_warmup_weights(final=True)  # a run that ends in (or with) its warm-up
        return output

    def _log_once(self, message: str, *args) -> None:
        text = message % args if args else message
        if text not in self._reasons_logged:
            self._reasons_logged.add(text)
            logger.info(text)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._bypassed_ddp = False
        self.average_warmup_weights()
        self.restart_warmup_if_collapsed()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bypassed_ddp and self.accelerator.sync_gradients:
            # The loss's forward ran on the unwrapped model, so DDP's reducer never armed: its all-reduce is done
            # here, at the window's last micro-batch as DDP would (earlier ones accumulated locally, as under no_sync).
            average_gradients(model)
        # Peak memory so far, logged with every step: what a run needs of the machine.
        for key, value in peak_memory_metrics().items():
            self._metrics["train"][key].append(value)
        return loss

    # ------------------------------------------------------------------ rollouts
    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, shuffled by `data_seed` when it is set (TRL always uses `seed`; transformers' Trainer
        documents `data_seed` as the seed of the data order alone, independent of the model's seed)."""
        sampler = super()._get_train_sampler(dataset)
        if self.args.data_seed is not None and getattr(sampler, "generator", None) is not None:
            sampler.seed = self.args.data_seed
            sampler.generator.manual_seed(self.args.data_seed)
        return sampler

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        started = time.perf_counter()
        self._rollout_vectors = None
        fast, warpers = self._fast_rollout_sampling(images, multimodal_fields)
        with self._adapters_merged("Rollouts are generated"):
            if fast:
                with inference(self.model):  # no dropout is active (checked), so eval mode samples the same
                    vectors, closed, found = reason_and_encode(
                        unwrap_for_generate(self.model_wrapped),
                        self.processing_class,
                        prompt_ids,
                        self.closer,
                        self.max_completion_length,
                        batch_size=len(prompt_ids),
                        warpers=warpers,
                        eos_ids=self.eos_token_ids,
                    )
                self._rollout_vectors, logprobs = vectors.float(), None
            else:
                with stop_at_marker(self.model_wrapped, self.processing_class, self.args.answer_marker):
                    completion_ids, logprobs = super()._generate_single_turn(
                        prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                    )
        if not fast:
            closed, found = [], []
            for i, ids in enumerate(completion_ids):
                new_ids, wrote_marker = self.closer.close(ids)
                closed.append(new_ids)
                found.append(wrote_marker)
                if logprobs is not None:  # appended marker tokens were not sampled: no importance correction
                    # The sampled tokens kept are a prefix of `ids`; a closed rollout lost its trailing EOS, whose
                    # log-prob must not stand for the first appended marker token.
                    sampled = len(new_ids) if wrote_marker else len(new_ids) - len(self.closer.marker_ids)
                    logprobs[i] = logprobs[i][:sampled] + [None] * (len(new_ids) - sampled)
        mode = "train" if self.model.training else "eval"
        found_all = self.accelerator.gather(
            torch.tensor(found, dtype=torch.float32, device=self.accelerator.device)
        )
        self._metrics[mode]["completions/marker_written_ratio"].append(found_all.mean().item())
        self._metrics[mode]["timing/generation_s"].append(time.perf_counter() - started)
        return closed, logprobs

    def _fast_rollout_sampling(self, images, multimodal_fields) -> tuple[bool, LogitsProcessorList | None]:
        """Whether RecPO's own loop samples the rollouts, and its warpers (None: greedy, as `do_sample=False`).

        Where it cannot sample exactly as transformers' generate would, TRL's path runs (logged once, why).
        """
        if not self.args.fast_rollouts:
            return False, None
        model = unwrap_for_generate(self.model_wrapped)
        reason = None
        if self.use_vllm or self.use_transformers_continuous_batching:
            reason = "vLLM or continuous batching generates them"
        elif self._dist.is_zero3 or self._dist.is_fsdp:
            reason = "ZeRO-3/FSDP shard the parameters"
        elif images is not None or multimodal_fields:
            reason = "the prompts carry images"
        elif unsupported_head(model) is not None:
            reason = unsupported_head(model)
        elif any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
            reason = (
                "dropout is active and TRL samples rollouts in train mode; set `disable_dropout: true` (the "
                "reference implementation's setting) to sample them with the faster loop"
            )
        else:  # what generate would use: the model's defaults overridden by TRL's settings
            config = GenerationConfig(
                **{**model.generation_config.to_dict(), **self.generation_config.to_dict()}
            )
            try:
                return True, sampling_warpers(config) if config.do_sample else None
            except UnsupportedSampling as err:
                reason = str(err)
        self._log_once("Rollouts are sampled with transformers' generate (slower): %s.", reason)
        return False, None

    @contextlib.contextmanager
    def _adapters_merged(self, what: str) -> Iterator[None]:
        """Run the block (forwards without gradient: rollouts, the item index, evaluation) with the LoRA adapter
        folded into the base weights: one matmul per layer instead of three, and no casts around the adapter.

        float32 base weights are merged in place and unmerged after (float32 rounding: ~1e-7 relative after 1,000
        steps); other dtypes (bf16) are merged into copies that replace the base weights for the block, the
        originals put back bit for bit (merge then unmerge in bf16 would leave rounding error in them every step).
        Where merging would change the result (see `_peft_model_to_merge`), the block runs unmerged.
        """
        peft_model = self._peft_model_to_merge(what)
        with contextlib.nullcontext() if peft_model is None else adapters_merged(peft_model):
            yield

    def _peft_model_to_merge(self, what: str = "Rollouts are generated") -> torch.nn.Module | None:
        """The peft model whose LoRA adapter to merge for this block, or None (then logged once, why).

        Merging must change nothing but speed: neither the samples nor, afterwards, the frozen weights.
        """
        if not self.args.merge_adapters_for_generation or self.use_vllm:
            return None  # vLLM generates from its own copy of the weights and syncs (merges) them itself
        model = unwrap_for_generate(self.model_wrapped)
        if not hasattr(model, "peft_config") or not hasattr(model, "merge_adapter"):
            return None
        layers = lora_layers(model)
        if not layers:
            return None
        if self.use_transformers_continuous_batching:
            reason = "TRL's continuous batching casts the weights to bf16/fp16 in the call: the unmerge would round"
        elif self._dist.is_zero3 or self._dist.is_fsdp:
            reason = "ZeRO-3/FSDP shard the parameters: a process holds only a slice of each base weight"
        else:
            reason = self._lora_merge_blocker(model, layers)
        if reason is None:
            return model
        logged = self.__dict__.setdefault("_merge_skips_logged", set())
        if (what, reason) not in logged:
            logged.add((what, reason))
            logger.info("%s with the LoRA adapter unmerged (slower): %s.", what, reason)
        return None

    @staticmethod
    def _lora_merge_blocker(model: torch.nn.Module, layers: list) -> str | None:
        """Why merging the LoRA `layers` of `model` would change the samples or the weights; None if it would not."""
        if any(layer.merged for layer in layers):
            return "the adapter is already merged; unmerging it after generation would undo a merge made on purpose"
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for layer in layers:
            weight = getattr(layer.get_base_layer(), "weight", None)
            if type(weight) not in (torch.Tensor, torch.nn.Parameter):
                # bitsandbytes' Params4bit/Int8Params, torchao and DTensor weights are tensor subclasses
                return "the base layers are quantised or wrapped: merging would requantise them at every step"
            if weight.device.type == "meta":
                return "the base weights are offloaded"
            if uses[id(weight)] > 1:
                return "a LoRA base weight is tied to another layer (the embeddings?): the merge would change both"
            # TRL generates in the model's current mode, train mode during training: there an unmerged adapter applies
            # dropout to its input, which a merged one cannot, so merging would change which rollouts are sampled.
            for name in set(layer.active_adapters) & set(layer.lora_dropout.keys()):
                dropout = layer.lora_dropout[name]
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
                    return (
                        "LoRA dropout is active (TRL samples rollouts in train mode); set `disable_dropout: true` or "
                        "`lora_dropout: 0` to generate them with merged weights"
                    )
        return None

    def _tokenize_prompts(self, prompts: list):
        """TRL renders the rollouts' prompts from the stored messages: fold the system turn as our renderers do."""
        if is_conversational({"prompt": prompts[0]}):
            prompts = [messages_for(self.processing_class, prompt) for prompt in prompts]
        return super()._tokenize_prompts(prompts)

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        self._last_prompt_ids, self._last_completion_ids = out[0], out[1]
        return out

    # ------------------------------------------------------------------ rewards
    def _user_vectors_no_grad(self) -> torch.Tensor:
        sequences = [p + c for p, c in zip(self._last_prompt_ids, self._last_completion_ids, strict=True)]
        with inference(self.model):
            ids, mask = left_pad(sequences, self.processing_class.pad_token_id, self.accelerator.device)
            vectors = last_token_hidden(self.model, ids, mask)
        return vectors.float()  # (n, d)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        started = time.perf_counter()
        index = self._ensure_index()
        targets = [int(x["target"]) for x in inputs]
        if self.args.score_with_fresh_targets:
            self._refresh_rows(sorted(set(targets)))
        user_vecs = self._rollout_vectors  # read by the fast rollout loop, or computed here
        self._rollout_vectors = None
        if user_vecs is None:
            user_vecs = self._user_vectors_no_grad()
        scores = cosine_scores(
            user_vecs, index, self.args.similarity_temperature, self.prior_bias
        )  # (n, items)
        if not self.args.score_with_fresh_targets:  # see the option's help: scored first, refreshed after
            self._refresh_rows(sorted(set(targets)))
        ranks, top_items, _ = rank_targets(scores, targets, [x["history"] for x in inputs], top_k=5)
        # The scores reach the reward functions as a column (rewards/__init__.py documents the contract);
        # copies keep them out of the dataset rows, which a group's rollouts may share.
        scored = [
            {**x, "scores": scores[row], "ndcg_cutoff": self.args.ndcg_cutoff} for row, x in enumerate(inputs)
        ]
        self._log_completion_extra("target_title", [self.item_titles[t] for t in targets])
        self._log_completion_extra("target_rank", ranks.tolist())
        self._log_completion_extra(
            "top5_titles", [" | ".join(self.item_titles[i] for i in row) for row in top_items.tolist()]
        )
        mode = "train" if self.model.training else "eval"
        all_ranks = self.accelerator.gather(ranks.to(self.accelerator.device)).float()
        for name, value in ranking_metrics(all_ranks).items():
            self._metrics[mode][f"rollouts/{name}"].append(value)
        self._metrics[mode]["rollouts/mean_rank"].append(all_ranks.mean().item())
        rewards_per_func = super()._calculate_rewards(scored, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        self._last_targets = targets
        self._metrics[mode]["timing/scoring_s"].append(time.perf_counter() - started)
        return rewards_per_func

    # ------------------------------------------------------------------ advantages
    def _generate_and_score_completions(self, inputs):
        if not self.args.reasoning or self.in_item_warmup():
            return self._prompt_only_batch(inputs)
        with quiet_checkpointing_rename():
            output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        # TRL counts a completion as clipped when it does not end in EOS, and every closed rollout ends with the
        # marker: its clipped ratio would always read 1. `completions/marker_written_ratio` is RecPO's measure.
        for key in TRL_EOS_METRICS:
            self._metrics[mode].pop(key, None)
        group = self.num_generations if mode == "train" else self.num_generations_eval
        device = self.accelerator.device
        rewards = (self._last_rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        advantages = group_advantages(rewards, group, kind=self.args.advantage_kind)  # (all processes' n,)
        relabel = relabel_mask(advantages, group, topk=self.args.relabel_topk)
        n = output["completion_ids"].size(0)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        output["advantages"] = advantages[local]
        output["relabel_mask"] = relabel[local]
        output["target_index"] = torch.tensor(self._last_targets, dtype=torch.long, device=device)
        logged = self._logs["advantages"]
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The item warm-up has no rollouts yet: TRL would print and write an empty completions table each log.
        keep = self.log_completions
        self.log_completions = keep and len(self._logs["prompt"]) > 0
        try:
            super().log(logs, start_time)
        finally:
            self.log_completions = keep

    def in_item_warmup(self) -> bool:
        """Whether this training step is one of the no-reasoning item-loss steps that start the run (cold start)."""
        return self.model.training and self.state.global_step < self.args.item_warmup_steps

    def _prompt_only_batch(self, inputs):
        """No-reasoning ablation: the prompt (marker pre-filled) is all the model sees; no rollouts, no rewards."""
        device = self.accelerator.device
        tokenizer = self.processing_class
        prompt_ids = [
            render_user_prompt(tokenizer, x["prompt"], False, self.args.answer_marker) for x in inputs
        ]
        ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
        group = self.num_generations
        first_of_group = torch.tensor([i % group == 0 for i in range(len(inputs))], device=device)
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "target_index": torch.tensor([int(x["target"]) for x in inputs], dtype=torch.long, device=device),
            "relabel_mask": first_of_group,  # one copy per user, before TRL's shuffle; the loss uses every row
            "advantages": torch.ones(len(inputs), device=device),
        }

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        if "completion_ids" not in inputs:  # no-reasoning ablation, or the item warm-up steps
            # Every row counts: TRL shuffles the G copies of a prompt into different micro-batches (with gradient
            # accumulation), so a micro-batch holds any number of them, and the mean over its rows weights each user
            # by its copies there, which sums to the same weight for every user over the step. Prefill runs each
            # distinct prompt once.
            prompts = [
                row[m.bool()].tolist()
                for row, m in zip(inputs["prompt_ids"], inputs["prompt_mask"], strict=True)
            ]
            user_vecs = self._prompt_vectors(model, prompts)
            item_loss = self._item_loss(model, user_vecs, inputs["target_index"], None, None)
            # prefill runs the unwrapped model: DDP's reducer sees no forward (see training_step)
            self._bypassed_ddp = isinstance(model, DistributedDataParallel)
            self._metrics[mode]["item_loss"].append(self.accelerator.gather(item_loss.detach()).mean().item())
            return self.args.item_loss_weight * item_loss / self._accumulation(mode)
        self._want_marker_hidden = True  # the token log-prob forward also reads the user vectors
        try:
            token_loss = super()._compute_loss(model, inputs)
            user_vecs = self._marker_hidden  # (B, d)
        finally:
            self._want_marker_hidden, self._marker_hidden = False, None
        item_loss = self._item_loss(
            model, user_vecs, inputs["target_index"], inputs["advantages"], inputs["relabel_mask"]
        )
        self._metrics[mode]["item_loss"].append(self.accelerator.gather(item_loss.detach()).mean().item())
        return token_loss + self.args.item_loss_weight * item_loss / self._accumulation(mode)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """TRL's log-prob forward, run once per distinct prompt (`shared_prompt_forward`); when `_compute_loss` asks,
        it also keeps the final hidden state at each completion's last token, the marker (`_marker_hidden`)."""
        want_hidden, self._want_marker_hidden = self._want_marker_hidden, False
        reason = self._shared_forward_blocker(
            model, attention_mask, logits_to_keep, compute_aux_loss, multimodal
        )
        if reason is None:
            logps, entropies, hidden = shared_prompt_logps(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                self.processing_class.pad_token_id,
                autocast=self.accelerator.autocast,
                recompute_prompts=self.args.recompute_prompts,
            )
            if want_hidden:
                self._marker_hidden = hidden
            return logps, entropies if compute_entropy else None, None
        with capture_final_hidden(model) as capture:
            out = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        if want_hidden:
            hidden = capture.hidden  # (B, P + C, d)
            lengths = attention_mask[:, -logits_to_keep:].sum(dim=1)
            positions = input_ids.size(1) - logits_to_keep + lengths - 1  # the marker's last token
            self._marker_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), positions]
        return out

    def _shared_forward_blocker(
        self, model, attention_mask, logits_to_keep, aux_loss, multimodal
    ) -> str | None:
        """Why the log-prob forward must run every rollout's whole sequence (logged once), or None."""
        if not self.args.shared_prompt_forward:
            return "off"
        reason = None
        if aux_loss:
            reason = "the MoE auxiliary loss needs every token's router logits"
        elif any(value is not None for value in multimodal.values()):
            reason = "the inputs are multimodal"
        elif torch.is_grad_enabled() and gradient_checkpointing_active(model):
            reason = "gradient checkpointing drops the key/value cache the prompts would share"
        elif int(attention_mask[:, : attention_mask.size(1) - logits_to_keep].sum(dim=1).min()) < 2:
            reason = "a prompt has fewer than two tokens"
        if reason is not None:
            self._log_once("Log-probs are computed over every rollout's whole prompt (slower): %s.", reason)
        return reason

    def _prompt_vectors(self, model, prompts: list[list[int]]) -> torch.Tensor:
        """Vectors at the prompts' last token, with gradient; with `recompute_prompts`, the forward is recomputed
        in the backward pass instead of keeping its activations. (n, d)"""

        def encode() -> torch.Tensor:
            return prefill(model, prompts, self.processing_class.pad_token_id).last_hidden

        if self.args.recompute_prompts and torch.is_grad_enabled():
            return checkpoint(encode, use_reentrant=False)
        return encode()

    def _accumulation(self, mode: str) -> float:
        return float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0

    def _item_loss(self, model, user_vecs, targets, advantages, mask) -> torch.Tensor:
        """In-batch item surrogate (or cross-entropy in the no-reasoning ablation and the item warm-up)."""
        # No early return when this process relabelled no rollout (a group split across processes): the
        # gather of negatives is collective, and item_surrogate_loss then gives 0 with a graph through it.
        columns, inverse = torch.unique(targets, return_inverse=True)
        sampled = self._uniform_negatives(columns)
        item_ids = torch.cat([columns, sampled])  # targets first: `inverse` indexes them
        item_vecs = self._item_vectors(model, item_ids.tolist())  # (T + M, d), with gradient
        item_vecs, offset = self._gather_negatives(item_vecs)
        target_cols = inverse + offset
        # Another process may hold the same item: every item counts once, as in one process (duplicate_columns).
        if self.args.gather_negatives and self.accelerator.num_processes > 1:
            gathered = [item for part in gather_object([item_ids.tolist()]) for item in part]
            item_ids = torch.tensor(gathered, dtype=torch.long, device=columns.device)
        bias = self._column_bias(item_ids, len(columns), len(sampled))
        if advantages is None:
            if self.model.training:  # the warm-up's (or the no-reasoning run's) collapse gauge
                spread = batch_score_spread(user_vecs, item_vecs, self.args.similarity_temperature)
                self._batch_spreads.append(spread)
                self._metrics["train"]["item/batch_spread"].append(spread)
            logits = in_batch_logits(
                user_vecs,
                item_vecs,
                target_cols,
                self.args.similarity_temperature,
                item_ids=item_ids,
                column_bias=bias,
            )
            return F.cross_entropy(logits, target_cols)
        return item_surrogate_loss(
            user_vecs,
            item_vecs,
            target_cols,
            advantages,
            mask,
            tau=self.args.similarity_temperature,
            eps_low=self.args.epsilon,
            eps_high=self.args.epsilon_high if self.args.epsilon_high is not None else self.args.epsilon,
            item_ids=item_ids,
            column_bias=bias,
        )

    def _column_bias(self, item_ids: torch.Tensor, targets: int, uniform: int) -> torch.Tensor | None:
        """`(columns,)` what each in-batch column's logit adds to cos / tau, or None (the paper's loss).

        The loss trains the score that ranks: + lambda log q(i), the popularity prior. With item_logq_correction
        the in-batch softmax, whose columns are drawn by popularity (and uniformly, with item_negatives), is turned
        into an estimate of the full-catalog one by subtracting the log of that drawing rate (sampled-softmax
        correction). At lambda 1 and no uniform columns the two cancel exactly: the paper's in-batch softmax.
        """
        bias = None
        if self.prior_bias is not None:
            bias = self.prior_bias.to(item_ids.device)[item_ids]
        if self.item_log_q is not None:
            drawn = mixed_log_frequency(self.item_log_q, targets, uniform).to(item_ids.device)[item_ids]
            bias = -drawn if bias is None else bias - drawn
        return bias

    def _uniform_negatives(self, columns: torch.Tensor) -> torch.Tensor:
        """`item_negatives` catalog items drawn uniformly without replacement among the non-target items. (M,)"""
        count = min(self.args.item_negatives, len(self.item_prompt_ids) - len(columns))
        if count <= 0:
            return columns.new_empty(0)
        weights = torch.ones(len(self.item_prompt_ids))
        weights[columns.cpu()] = 0.0
        return torch.multinomial(weights, count, replacement=False).to(columns.device)

    def _gather_negatives(self, item_vecs: torch.Tensor) -> tuple[torch.Tensor, int]:
        return gather_with_grad(item_vecs, self.accelerator) if self.args.gather_negatives else (item_vecs, 0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        splits = {"valid": self.eval_rows}
        if metric_key_prefix == "test":
            splits = {"test": self.test_rows}
        metrics = self.ranking_evaluation(splits)
        self.log_metrics_only(metrics)
        prefixed = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        # Trainer.evaluate's contract: without on_evaluate, early stopping never runs and should_evaluate
        # stays set, so the epoch-end check evaluates the last step a second time.
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, prefixed)
        return prefixed

    def log_metrics_only(self, metrics: dict[str, float]) -> None:
        """Log evaluation figures as they are; GRPOTrainer.log would also flush pending training metrics."""
        Trainer.log(self, dict(metrics))

    def ranking_evaluation(self, splits: dict[str, list[dict] | None]) -> dict[str, float]:
        """Full-catalog ranking on each split (rows split across processes), with a fresh item index."""
        self._place_model_for_evaluation()
        self.refresh_item_index()
        # How crowded the catalog is: a small LM's hidden states share one large direction (the untrained
        # SmolLM2's items have a mean pairwise cosine of ~0.99), which training must spread to rank well.
        metrics: dict[str, float] = {
            "index/mean_cosine": mean_pairwise_cosine(self.item_index),
            "index/score_spread": self.check_spread(f"evaluation at step {self.state.global_step}"),
        }
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for name, rows in splits.items():
            if not rows:
                continue
            mine = rows[rank::world]
            result = self._evaluate_rows(mine, name)
            ranks = torch.tensor([r for part in gather_object([result.ranks.tolist()]) for r in part])
            indices = [i for part in gather_object([[row["sample_index"] for row in mine]]) for i in part]
            self.last_per_user[name] = per_user_record(indices, ranks)
            for key, value in ranking_metrics(ranks).items():
                metrics[f"{name}/{key}"] = value
            metrics[f"{name}/mean_rank"] = ranks.float().mean().item()  # moves before Hit@K does
            metrics[f"{name}/marker_written_ratio"] = float(
                sum(gather_object([sum(result.marker_found)])) / max(len(rows), 1)
            )
            self.last_eval[name] = result
            # Every process's users, back in the split's order (process r holds rows r, r + world, ...).
            records = gather_object(
                [(rank + world * i, record) for i, record in enumerate(self._trace_records(mine, result))]
            )
            if self.accelerator.is_main_process:
                self._write_traces(name, [record for _, record in sorted(records, key=lambda pair: pair[0])])
        return metrics

    def _evaluate_rows(self, rows: list[dict], split: str) -> RankingResult:
        """This process's share of a split, ranked; a process with no rows (fewer rows than processes) ranks none."""
        if not rows:
            return RankingResult(
                torch.empty(0, dtype=torch.long), torch.empty((0, 0), dtype=torch.long), torch.empty(0, 0)
            )
        with inference(self.model), self._adapters_merged("The evaluation runs"):
            result = evaluate_users(
                self.model,
                self.processing_class,
                rows,
                self.item_index,
                self.closer,
                reasoning=self.args.reasoning,
                tau=self.args.similarity_temperature,
                max_new_tokens=self.args.eval_max_completion_length or self.args.max_completion_length,
                batch_size=self.args.eval_batch_users,
                progress=f"eval {split}" if self.accelerator.is_main_process else None,
                prior=self.prior_bias,
            )
        self._release_freed_memory()
        return result

    def _trace_records(self, rows: list[dict], result: RankingResult) -> list[dict]:
        return [
            {
                "user_id": row.get("user_id"),
                "history": [self.item_titles[h] for h in row["history"]],
                "reasoning": result.completions[i],
                "target": self.item_titles[row["target"]],
                "rank": int(result.ranks[i]),
                "top10": [
                    {"title": self.item_titles[int(item)], "score": round(float(score), 4)}
                    for item, score in zip(result.top_items[i], result.top_scores[i], strict=True)
                ],
            }
            for i, row in enumerate(rows)
        ]

    def _place_model_for_evaluation(self) -> None:
        """Put the model on the accelerator's device if it is not there yet: transformers leaves a DeepSpeed model where
        it was loaded (the CPU) until `train()` hands it to DeepSpeed, so the untrained model's evaluation would run
        on the CPU and send CPU tensors to NCCL's gathers. DeepSpeed moves it to the same device later; other
        setups are placed by transformers (or by their device_map) and left alone."""
        device = self.accelerator.device
        if self.is_deepspeed_enabled and next(self.model.parameters()).device != device:
            self.model.to(device)

    def _write_traces(self, split: str, records: list[dict]) -> None:
        path = os.path.join(self.args.output_dir, "traces", f"{split}_step{self.state.global_step:06d}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def save_item_index(self, output_dir: str) -> None:
        """Write what the run ranks with beside its weights (recipes/run_folder.py): the item index, the prior,
        the catalog and the scoring settings, so the folder recommends on its own.

        The index records a hash of the weights file saved before it: a copy of the folder (a Hub download
        included, whose file times are arbitrary) can then prove the index belongs to these weights."""
        if self.item_index is None or not self.accelerator.is_main_process:
            return
        folder = Path(output_dir)
        weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
        torch.save(
            {
                "vectors": self.item_index.cpu(),
                "num_items": len(self.item_prompt_ids),
                "step": self.index_step,
                "weights_file": weights.name if weights is not None else None,
                "weights_sha256": file_sha256(weights) if weights is not None else None,
            },
            folder / ITEM_INDEX_FILE,
        )
        if self.score_prior is not None:  # the run ranks with it: recipes.evaluate/recommend read it back
            torch.save(self.score_prior.to_dict(), folder / PRIOR_FILE)
        write_catalog(self.items, folder)
        write_json(folder / SCORING_FILE, scoring_settings(self.args, self.score_prior is not None))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """Write no card here. TRL's is a generic GRPO card (a text-generation quick start, the local base path
        as base_model, no data, no metrics); the RecPO card is rendered from the finished run folder by
        `recipes.model_card`, which recipes/recpo.py calls after results.json. TRL calls this at every
        checkpoint and push."""

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the run folder as `recipes.publish` selects it (adapter, card, index, catalog, prior, scoring,
        results, traces; no optimizer state, checkpoints, logs or training_args.bin), to `hub_model_id` (default:
        the output folder's name). Raises `recipes.publish.PublishError` in one line when it cannot."""
        from recipes.publish import publish

        self.save_model(self.args.output_dir, _internal_call=True)
        self.save_item_index(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        return publish(
            self.args.output_dir,
            self.args.hub_model_id or Path(self.args.output_dir).name,
            token=token if token is not None else self.args.hub_token,
            private=self.args.hub_private_repo if private is None else private,
            commit_message=commit_message or "RecPO run",
            revision=revision if revision is not None else self.args.hub_revision,
        )


class TimeBudgetCallback(TrainerCallback):
    """Ends training after the step during which the wall-clock budget ran out, on every process at that step.

    Each process reads its own clock; if one stopped alone, it would start the final evaluation while the others
    wait for it in the next step's collectives. So the processes stop together once any one's budget is spent
    (`on_any_process`, a collective at every step end; a stand-in in tests).

    With `recpo_share` > 0 and an `end_warmup` hook (the trainer's `end_item_warmup`), the item warm-up also ends
    early, after the step at which it has spent `1 - recpo_share` of the budget, so that the RecPO steps after it
    keep their share; the processes decide that together too. The hook is told the budget that the whole warm-up
    would have needed at the pace so far, so that the run can say what to ask for on a machine this slow.

    With a `show_last_step` hook (the trainer's), the progress bar ends at the step where the run is expected to
    stop, so that its time left is the budget's where the budget stops the run before max_steps."""

    def __init__(
        self,
        minutes: float,
        on_any_process: Callable[[bool], bool] | None = None,
        recpo_share: float = 0.0,
        end_warmup: Callable[[float | None], None] | None = None,
        show_last_step: Callable[[int], None] | None = None,
    ) -> None:
        self.seconds = minutes * 60.0
        self.warmup_seconds = self.seconds * (1.0 - recpo_share) if recpo_share > 0 else None
        self.end_warmup = end_warmup
        self.show_last_step = show_last_step
        self.started: float | None = None
        self.started_at_step = 0
        # (in the warm-up, seconds, step) where the current phase began: the progress bar's pace is that phase's
        self.phase: tuple[bool, float, int] | None = None
        self.on_any_process = on_any_process or true_on_any_process

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.started_at_step = state.global_step  # a resumed run counts its pace from here
        self.phase = None

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = None if self.started is None else time.perf_counter() - self.started
        if self._warmup_may_end(args, state):
            warmup_spent = elapsed is not None and elapsed >= self.warmup_seconds
            if self.on_any_process(warmup_spent):
                self.end_warmup(
                    self.budget_for_whole_warmup(elapsed, state.global_step, args.item_warmup_steps)
                )
        spent = elapsed is not None and elapsed >= self.seconds
        if self.show_last_step is not None and elapsed is not None:
            self.show_last_step(self.expected_last_step(elapsed, args, state))
        if self.on_any_process(spent):
            logger.info(
                "Time budget of %.1f min reached at step %d: stopping", self.seconds / 60, state.global_step
            )
            control.should_training_stop = True
            control.should_save = True
        return control

    def budget_for_whole_warmup(self, elapsed: float | None, step: int, planned: int) -> float | None:
        """Minutes of budget that would run all `planned` warm-up steps at the pace of the steps run so far and
        keep the RecPO share after them; None before any step was timed."""
        done = step - self.started_at_step
        if elapsed is None or done <= 0:
            return None
        warmup_seconds = elapsed + (planned - step) * elapsed / done
        return warmup_seconds / (self.warmup_seconds / self.seconds) / 60.0

    def expected_last_step(self, elapsed: float, args, state) -> int:
        """The step at which the run should stop: max_steps, or earlier where the budget (or the warm-up's share of
        it) runs out first at the pace of this phase's steps (warm-up or RecPO; the whole run's before the phase has
        a step of its own). An estimate for the progress bar: the clock alone decides when the run stops."""
        step = state.global_step
        in_warmup = step < args.item_warmup_steps
        if self.phase is None or self.phase[0] != in_warmup:
            self.phase = (in_warmup, elapsed, step)
        _, phase_seconds, phase_step = self.phase
        if step > phase_step:
            pace = (elapsed - phase_seconds) / (step - phase_step)
        elif step > self.started_at_step:
            pace = elapsed / (step - self.started_at_step)
        else:
            return args.max_steps
        if pace <= 0:
            return args.max_steps

        def steps_until(seconds: float) -> int:  # the step that spends `seconds` is the last one
            return step + max(math.ceil((seconds - elapsed) / pace), 0)

        if self._warmup_may_end(args, state):
            last_warmup = min(args.item_warmup_steps, steps_until(self.warmup_seconds))
            return last_warmup + args.max_steps - args.item_warmup_steps
        return min(args.max_steps, steps_until(self.seconds))

    def _warmup_may_end(self, args, state) -> bool:
        """Whether the next step is an item warm-up step with RecPO steps after the warm-up (the same on every
        process: the step and the arguments are)."""
        if self.warmup_seconds is None or self.end_warmup is None:
            return False
        return state.global_step < args.item_warmup_steps < args.max_steps


class ReleaseFreedMemoryCallback(TrainerCallback):
    """`release_freed_memory`: the heap's free pages back to the system after every optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):
        release_freed_memory()


def true_on_any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process. A collective: every process must call it."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    return any(gather_object([flag]))


def average_gradients(model: torch.nn.Module) -> None:
    """Average every trainable parameter's gradient over the processes, in place: DDP's all-reduce, for a backward
    whose forward DDP did not run. The same parameters hold a gradient on every process (one graph), in one order."""
    world = torch.distributed.get_world_size()
    grads: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for group in grads.values():  # one all-reduce per device and dtype
        flat = torch.cat([g.reshape(-1) for g in group])
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, averaged in zip(group, flat.split([g.numel() for g in group]), strict=True):
            g.copy_(averaged.view_as(g))


def gather_with_grad(local: torch.Tensor, accelerator) -> tuple[torch.Tensor, int]:
    """Concatenate every process's rows (their counts may differ), differentiably.

    The gather's backward sums, into each process's own rows, the gradient every process's loss sends to
    them: the other processes' rollouts score this process's items too, as they would in one process.
    Returns the rows and the offset of this process's block in them.
    """
    world = accelerator.num_processes
    if world == 1:
        return local, 0
    counts = accelerator.gather(torch.tensor([local.size(0)], device=local.device)).tolist()
    width = max(counts)
    padded = torch.cat([local, local.new_zeros((width - local.size(0), local.size(1)))])  # (width, d)
    gathered = torch.distributed.nn.functional.all_gather(padded)  # world x (width, d)
    rank = accelerator.process_index
    blocks = [local if r == rank else gathered[r][: counts[r]] for r in range(world)]
    return torch.cat(blocks, dim=0), sum(counts[:rank])


def _subset(dataset: Dataset | None, limit: int | None, seed: int) -> list[dict] | None:
    """The evaluation users: the seeded subset's rows, each with its row index in the split (`sample_index`)."""
    if dataset is None:
        return None
    return [{**dataset[i], "sample_index": i} for i in sample_indices(len(dataset), limit, seed)]


def steps_per_epoch(num_samples: int, args: RecPOConfig, num_processes: int) -> int:
    """Optimizer steps in an epoch, as the trainer counts them: TRL's sampler drops the last, incomplete generation
    batch (`generation_batch_size / num_generations` users), and each generation batch feeds
    `steps_per_generation x num_iterations` micro-steps."""
    per_generation = args.steps_per_generation or args.gradient_accumulation_steps
    rollouts = args.per_device_train_batch_size * num_processes * per_generation
    users = rollouts // max(args.num_generations or 1, 1)
    micro_steps = num_samples // max(users, 1) * per_generation * args.num_iterations
    return max(1, math.ceil(micro_steps / args.gradient_accumulation_steps))


def lora_layers(model: torch.nn.Module) -> list:
    """The peft LoRA layers of `model` (none without peft)."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@contextlib.contextmanager
def adapters_merged(peft_model) -> Iterator[None]:
    """The LoRA adapter folded into the base weights for the block (see `RecPOTrainer._adapters_merged`)."""
    if next(layer.get_base_layer().weight.dtype for layer in lora_layers(peft_model)) != torch.float32:
        with merged_copies(peft_model):
            yield
        return
    try:  # merge inside the try: a merge that fails half-way still unmerges the layers it merged
        with torch.no_grad():  # peft computes B @ A from trainable weights: no graph for that
            peft_model.merge_adapter()
        yield
    finally:  # the loss and the user vectors must see the unmerged model, whatever happened above
        with torch.no_grad():
            peft_model.unmerge_adapter()


@contextlib.contextmanager
def merged_copies(peft_model) -> Iterator[None]:
    """The active LoRA adapters folded into copies of their base weights, and disabled, for the block; the
    original base weights (the same Parameter objects, the same storage) are put back afterwards, bit for bit.

    Costs one copy of the adapted weights while the block runs (SmolLM2-135M in bf16: ~0.2 GB). The merged weight
    is rounded once to the base dtype, like the base weight itself; the adapter's delta B A is formed in float32.
    """
    saved = []
    try:
        with torch.no_grad():
            for layer in lora_layers(peft_model):
                weight = layer.get_base_layer().weight
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                if not active:
                    continue
                delta = sum(layer.get_delta_weight(name).float() for name in active)
                saved.append((weight, weight.data))
                weight.data = (weight.data.float() + delta).to(weight.dtype)
        with peft_model.disable_adapter():
            yield
    finally:
        for weight, original in saved:
            weight.data = original
