"""RecPO's loss: TRL's clipped token surrogate plus the in-batch item surrogate (DESIGN.md section 3, step 6).

The trainer's `_compute_loss` runs on a hand-made batch (2 users x 2 rollouts, old log-probs shifted so
the ratio is not 1) and is checked against the same loss written out from a plain forward pass; the
gradient is followed into the LoRA weights through the user vectors and through the item vectors.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipes.evaluation import render_user_prompt
from recipes.vectors import left_pad
from rewards.surrogate import clipped_surrogate, item_surrogate_loss
from tests.numerics import assert_close_at_scale, assert_dicts_close_at_scale
from tests.recipes.conftest import build_trainer

MARKER = "<answer>"
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]  # two groups of two rollouts
RELABEL = [True, False, True, False]  # the best rollout of each group


# ----------------------------------------------------------------------------- token surrogate by hand


def test_token_surrogate_from_log_probs_matches_hand_values():
    # Two rollouts of three tokens; the second one's last token is padding.
    logps = torch.tensor([[math.log(0.3), math.log(0.6), math.log(0.2)], [math.log(0.5), math.log(0.1), 0.0]])
    old = torch.tensor([[math.log(0.2), math.log(0.6), math.log(0.4)], [math.log(0.25), math.log(0.2), -9.0]])
    advantages = torch.tensor([[2.0], [-1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    per_token = clipped_surrogate(torch.exp(logps - old), advantages, eps_low=0.2, eps_high=0.28)
    # ratios 1.5, 1, 0.5 with A = 2: -min(3, 2.56), -2, -min(1, 1.6); ratios 2, 0.5 with A = -1: -min(-2, -1.28), ...
    expected = torch.tensor([[-2.56, -2.0, -1.0], [2.0, 0.8, per_token[1, 2].item()]])
    torch.testing.assert_close(per_token, expected)
    # TRL's token normalisation `dapo` (RecPO's default): masked sum over the batch's completion tokens.
    loss = (per_token * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx((-2.56 - 2.0 - 1.0 + 2.0 + 0.8) / 5)


# ----------------------------------------------------------------------------- the trainer's loss


def loss_ready_trainer(tokenizer, data_dir, output_dir, **overrides):
    """A trainer whose LoRA B is random (so every LoRA weight gets a gradient), in train mode, as the loop leaves it."""
    trainer = build_trainer(tokenizer, data_dir, output_dir, random_lora_b=True, **overrides)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


@pytest.fixture
def trainer(tokenizer, synthetic_data, tmp_path):
    return loss_ready_trainer(tokenizer, synthetic_data, tmp_path / "out")


def hand_made_batch(trainer) -> dict[str, torch.Tensor]:
    tokenizer = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in (0, 1)]
    prompts = [render_user_prompt(tokenizer, row["prompt"], True, MARKER) for row in rows for _ in range(2)]
    texts = [
        "Dramas. <answer>",
        "I think the user likes games.\n<answer>",
        "Hmm <answer>",
        "Sci-fi fan <answer>",
    ]
    completions = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((4, width), tokenizer.pad_token_id)
    completion_mask = torch.zeros((4, width), dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(ADVANTAGES),
        "relabel_mask": torch.tensor(RELABEL),
        "target_index": torch.tensor([rows[0]["target"]] * 2 + [rows[1]["target"]] * 2),
        "num_items_in_batch": completion_mask.sum(),
    }


def final_hidden_and_logps(model, batch, temperature: float):
    """A plain forward: every layer's hidden states and full logits, what the trainer must avoid but match."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    prompt_len, completion_len = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    logits = out.logits[:, prompt_len - 1 : -1] / temperature  # (B, C, vocab)
    logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(2, batch["completion_ids"].unsqueeze(2)).squeeze(2)
    )
    assert logps.shape == (input_ids.size(0), completion_len)
    return out.hidden_states[-1], logps


def plain_item_vectors(model, trainer, items: list[int]) -> torch.Tensor:
    ids, mask = left_pad([trainer.item_prompt_ids[i] for i in items], trainer.processing_class.pad_token_id)
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, -1]


def manual_loss(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, item loss) written out from the specification with the model's own plain forward."""
    model, args = trainer.model, trainer.args
    hidden, logps = final_hidden_and_logps(model, batch, args.temperature)
    mask = batch["completion_mask"].float()
    ratio = torch.exp(logps - batch["old_per_token_logps"])
    per_token = clipped_surrogate(ratio, batch["advantages"].unsqueeze(1), args.epsilon, args.epsilon_high)
    token = (per_token * mask).sum() / mask.sum()
    marker_pos = batch["prompt_ids"].size(1) + batch["completion_mask"].sum(1) - 1
    user_vecs = hidden[torch.arange(hidden.size(0)), marker_pos]  # (B, d)
    columns, inverse = torch.unique(batch["target_index"], return_inverse=True)
    item_vecs = plain_item_vectors(model, trainer, columns.tolist())
    item = item_surrogate_loss(
        user_vecs,
        item_vecs,
        inverse,
        batch["advantages"],
        batch["relabel_mask"],
        tau=args.similarity_temperature,
        eps_low=args.epsilon,
        eps_high=args.epsilon_high,
    )
    return token, item


def with_shifted_old_logps(trainer, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, logps = final_hidden_and_logps(trainer.model, batch, trainer.args.temperature)
    shift = torch.linspace(-0.6, 0.6, logps.numel()).view_as(logps)  # ratios from 0.55 to 1.8
    return {**batch, "old_per_token_logps": logps + shift}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None
    }


def test_compute_loss_is_token_surrogate_plus_item_surrogate(trainer):
    batch = with_shifted_old_logps(trainer, hand_made_batch(trainer))
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    got_grads = lora_grads(trainer.model)

    trainer.model.zero_grad()
    token, item = manual_loss(trainer, batch)
    (token + item).backward()
    want_grads = lora_grads(trainer.model)

    # The item surrogate's ratio is p / p.detach() = 1: its value is minus the relabelled rollouts' mean A.
    assert item.item() == pytest.approx(-(1.0 + 0.5) / 2)
    mask = batch["completion_mask"].float()
    at_ratio_one = -(batch["advantages"].unsqueeze(1) * mask).sum() / mask.sum()
    assert token.item() != pytest.approx(at_ratio_one.item(), abs=1e-3)  # the old log-probs were used
    assert loss.item() == pytest.approx((token + item).item(), rel=1e-4, abs=1e-5)
    assert trainer._metrics["train"]["item_loss"][-1] == pytest.approx(item.item(), abs=1e-5)
    assert_dicts_close_at_scale(got_grads, want_grads)


def test_compute_loss_divides_both_terms_by_gradient_accumulation(trainer):
    batch = with_shifted_old_logps(trainer, hand_made_batch(trainer))
    with torch.no_grad():
        once = trainer._compute_loss(trainer.model, batch)
        trainer.current_gradient_accumulation_steps = 2
        trainer.args.steps_per_generation = (
            1  # `dapo` rescales num_items_in_batch by GA / steps_per_generation
        )
        twice = trainer._compute_loss(trainer.model, batch)
    assert twice.item() == pytest.approx(once.item() / 2, rel=1e-5)


def test_item_loss_weight_scales_only_the_item_term(trainer):
    batch = with_shifted_old_logps(trainer, hand_made_batch(trainer))
    with torch.no_grad():
        token, item = manual_loss(trainer, batch)
        trainer.args.item_loss_weight = 3.0
        loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx((token + 3.0 * item).item(), rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- gradient paths


def item_loss_grads(trainer, batch, detach_users: bool, detach_items: bool) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.zero_grad()
    hidden, _ = final_hidden_and_logps(model, batch, trainer.args.temperature)
    marker_pos = batch["prompt_ids"].size(1) + batch["completion_mask"].sum(1) - 1
    user_vecs = hidden[torch.arange(hidden.size(0)), marker_pos]
    if detach_users:
        user_vecs = user_vecs.detach()
    item_vectors = trainer._item_vectors
    if detach_items:
        trainer._item_vectors = lambda m, cols: item_vectors(m, cols).detach()
    try:
        loss = trainer._item_loss(
            model, user_vecs, batch["target_index"], batch["advantages"], batch["relabel_mask"]
        )
    finally:
        trainer._item_vectors = item_vectors
    loss.backward()
    return lora_grads(model)


def nonzero(grads: dict[str, torch.Tensor], kind: str) -> bool:
    picked = [g for n, g in grads.items() if f"{kind}." in n]
    return bool(picked) and any(g.abs().max() > 0 for g in picked)


def test_item_loss_gradient_reaches_lora_through_user_and_item_vectors(trainer):
    batch = hand_made_batch(trainer)
    both = item_loss_grads(trainer, batch, detach_users=False, detach_items=False)
    via_users = item_loss_grads(trainer, batch, detach_users=False, detach_items=True)
    via_items = item_loss_grads(trainer, batch, detach_users=True, detach_items=False)
    for grads in (both, via_users, via_items):
        assert nonzero(grads, "lora_A") and nonzero(grads, "lora_B")
    # Two distinct paths that add up to the whole gradient.
    name = next(n for n in both if "lora_B" in n)
    assert not torch.allclose(via_users[name], via_items[name])
    assert_dicts_close_at_scale({n: via_users[n] + via_items[n] for n in both}, both)


def test_zero_advantages_give_zero_gradient_to_both_loss_terms(trainer):
    batch = with_shifted_old_logps(trainer, hand_made_batch(trainer))
    batch["advantages"] = torch.zeros(4)
    trainer.model.zero_grad()
    trainer._compute_loss(trainer.model, batch).backward()
    grads = lora_grads(trainer.model)
    assert grads and all(g.abs().max() == 0 for g in grads.values())


# ----------------------------------------------------------------------------- no-reasoning ablation


def test_no_reasoning_loss_is_cross_entropy_over_in_batch_targets(tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "out", reasoning=False)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prompt_only_batch([row for row in rows for _ in range(2)])  # G = 2 copies per user
    assert batch["relabel_mask"].tolist() == [True, False] * 4
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch)
        prompts = [render_user_prompt(tokenizer, row["prompt"], False, MARKER) for row in rows]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        model = trainer.model
        users = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][:, -1]
        columns, inverse = torch.unique(torch.tensor([row["target"] for row in rows]), return_inverse=True)
        items = plain_item_vectors(model, trainer, columns.tolist())
        scores = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(items, dim=-1).T
        expected = (
            torch.nn.functional.cross_entropy(scores / trainer.args.similarity_temperature, inverse) / 2
        )
    assert tokenizer.decode(prompts[0]).endswith(MARKER)
    # The item prompt: the first item's messages in SmolLM2's ChatML, written out, the marker left open.
    system, user, answer = (m["content"] for m in trainer.items[0]["prompt"])
    assert answer == MARKER and f"Title: {trainer.items[0]['title']}\n" in user
    text = (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{MARKER}"
    )
    assert tokenizer.decode(trainer.item_prompt_ids[0]) == text
    assert trainer.item_prompt_ids[0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_logq_correction_subtracts_log_target_frequency_from_both_item_losses(
    tokenizer, synthetic_data, tmp_path
):
    plain = build_trainer(tokenizer, synthetic_data, tmp_path / "a", random_lora_b=True)
    corrected = build_trainer(
        tokenizer, synthetic_data, tmp_path / "b", random_lora_b=True, item_logq_correction=True
    )
    assert plain.item_log_q is None
    # Add-one smoothed target frequency, counted by hand: log((count + 1) / (samples + items)).
    targets, catalog = list(corrected.train_dataset["target"]), len(corrected.items)
    by_hand = [math.log((targets.count(i) + 1) / (len(targets) + catalog)) for i in range(catalog)]
    assert_close_at_scale(corrected.item_log_q, torch.tensor(by_hand), rel=1e-6)
    log_q = corrected.item_log_q
    assert log_q.exp().sum().item() == pytest.approx(1.0)

    # RecPO: the loss value is -mean(A) either way (ratio 1); the gradient is that of the corrected logits.
    model = corrected.model
    model.train()
    torch.manual_seed(0)
    users = torch.randn(4, model.config.hidden_size, requires_grad=True)
    common, rare = log_q.argmax().item(), log_q.argmin().item()  # columns whose corrections differ
    assert log_q[common] > log_q[rare]
    targets = torch.tensor([common, common, rare, rare])
    advantages, mask = torch.tensor(ADVANTAGES), torch.tensor(RELABEL)
    with torch.no_grad():
        columns, inverse = torch.unique(targets, return_inverse=True)
        items = plain_item_vectors(model, corrected, columns.tolist())
    corrected._item_vectors = lambda m, cols: plain_item_vectors(m, corrected, cols).detach()
    corrected._item_loss(model, users, targets, advantages, mask).backward()
    args = corrected.args

    def user_grad(bias: torch.Tensor | None) -> torch.Tensor:
        fresh = users.detach().clone().requires_grad_(True)
        item_surrogate_loss(
            fresh,
            items,
            inverse,
            advantages,
            mask,
            tau=args.similarity_temperature,
            eps_low=args.epsilon,
            eps_high=args.epsilon_high,
            column_bias=bias,
        ).backward()
        return fresh.grad

    assert_close_at_scale(users.grad, user_grad(-log_q[columns]))
    with pytest.raises(AssertionError):  # the correction changes the update
        assert_close_at_scale(users.grad, user_grad(None))

    # No-reasoning (no advantages): cross-entropy of the corrected logits.
    with torch.no_grad():
        loss = corrected._item_loss(model, users.detach()[::2], targets[::2], None, None)
        scores = (
            torch.nn.functional.normalize(users[::2], dim=-1) @ torch.nn.functional.normalize(items, dim=-1).T
        )
        expected = torch.nn.functional.cross_entropy(
            scores / args.similarity_temperature - log_q[columns], inverse[::2]
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- shared-prompt forward


def test_shared_prompt_forward_gives_trls_loss_and_gradients_from_fewer_tokens(
    tokenizer, synthetic_data, tmp_path
):
    results = {}
    for shared in (True, False):
        trainer = loss_ready_trainer(
            tokenizer, synthetic_data, tmp_path / str(shared), shared_prompt_forward=shared
        )
        batch = with_shifted_old_logps(trainer, hand_made_batch(trainer))
        seen = []  # tokens the final norm processes: what the forward pays for
        handle = trainer.model.get_base_model().model.norm.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.append(out.shape[0] * out.shape[1])
        )
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        handle.remove()
        loss.backward()
        results[shared] = (loss.item(), lora_grads(trainer.model), sum(seen), trainer._metrics["train"])
    (loss, grads, tokens, metrics), (trl_loss, trl_grads, trl_tokens, trl_metrics) = (
        results[True],
        results[False],
    )
    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert_dicts_close_at_scale(grads, trl_grads)
    assert metrics["entropy"][-1] == pytest.approx(trl_metrics["entropy"][-1], rel=1e-5)
    assert metrics["item_loss"][-1] == pytest.approx(trl_metrics["item_loss"][-1], abs=1e-6)
    # 2 users x 2 rollouts: the prompts (about 140 tokens each here) ran twice, not four times.
    assert tokens < 0.65 * trl_tokens


# ----------------------------------------------------------------------------- uniform negatives, warm-up


@pytest.mark.parametrize("logq", [False, True])
def test_uniform_negatives_are_extra_columns_of_the_item_softmax(tokenizer, synthetic_data, tmp_path, logq):
    trainer = build_trainer(
        tokenizer,
        synthetic_data,
        tmp_path / "out",
        random_lora_b=True,
        item_negatives=5,
        item_logq_correction=logq,
    )
    model = trainer.model
    torch.manual_seed(0)
    users = torch.randn(4, model.config.hidden_size)
    targets = torch.tensor([3, 3, 7, 7])
    torch.manual_seed(11)
    with torch.no_grad():
        loss = trainer._item_loss(model, users, targets, None, None)
    torch.manual_seed(11)
    negatives = trainer._uniform_negatives(torch.tensor([3, 7]))
    assert len(set(negatives.tolist())) == 5 and not {3, 7} & set(negatives.tolist())
    columns = [3, 7, *negatives.tolist()]
    with torch.no_grad():
        items = plain_item_vectors(model, trainer, columns)
        logits = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(items, dim=-1).T
        logits = logits / trainer.args.similarity_temperature
        if logq:
            q = trainer.item_log_q.exp()
            logits = logits - ((2 * q + 5 / len(q)) / 7).log()[columns]
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_recomputed_prompts_give_the_same_no_reasoning_gradients(tokenizer, synthetic_data, tmp_path):
    grads = {}
    for recompute in (False, True):
        trainer = loss_ready_trainer(
            tokenizer, synthetic_data, tmp_path / str(recompute), reasoning=False, recompute_prompts=recompute
        )
        rows = [trainer.train_dataset[i] for i in range(4)]
        batch = trainer._prompt_only_batch([row for row in rows for _ in range(2)])
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, batch).backward()
        grads[recompute] = lora_grads(trainer.model)
    assert_dicts_close_at_scale(grads[True], grads[False])
