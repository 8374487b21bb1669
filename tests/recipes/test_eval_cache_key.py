"""The evaluation cache's key (recipes/eval_cache.py): a wrong one reports another model's "before" figures.

The key must change with anything the untrained evaluation depends on (the weights, to a single element; the
data; the evaluated users; the reasoning and ranking settings) and stay the same for the same set-up, wherever
its run writes. Keys are computed as `recipes.recpo.evaluate_untrained` does: from the trainer, the evaluated
splits and the `datasets` fingerprints of the data read from disk.
"""

from __future__ import annotations

import pytest
import torch
from datasets import DatasetDict, load_from_disk

from recipes.eval_cache import evaluation_key
from recipes.loading import redraw_lora, weights_fingerprint
from recipes.trainer import _subset
from tests.recipes.conftest import build_tiny_model, build_trainer


def key_of(trainer, data_dir) -> str:
    data = load_from_disk(str(data_dir))
    fingerprints = {name: data[name]._fingerprint for name in ("items", "valid", "test")}
    return evaluation_key(trainer, {"valid": trainer.eval_rows, "test": trainer.test_rows}, fingerprints)


@pytest.fixture
def base(tokenizer, synthetic_data, tmp_path):
    """(trainer, its key) of the reference set-up."""
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "base")
    return trainer, key_of(trainer, synthetic_data)


# ----------------------------------------------------------------------------- the same set-up


@pytest.mark.parametrize(
    "change",
    [
        {},  # another trainer, another output folder
        {"learning_rate": 0.5},  # training settings do not change the untrained evaluation
        {"temperature": 0.7},  # rollouts' sampling; evaluation reasons greedily
        {"eval_max_completion_length": 8},  # = max_completion_length: the same limit, spelt out
    ],
)
def test_the_same_evaluation_gets_the_same_key(tokenizer, synthetic_data, tmp_path, base, change):
    trainer, key = base
    assert key_of(trainer, synthetic_data) == key  # computing it changes nothing
    other = build_trainer(tokenizer, synthetic_data, tmp_path / "other", **change)
    assert key_of(other, synthetic_data) == key


# ----------------------------------------------------------------------------- other weights


def nudged(trainer, name_part: str, position: int) -> str:
    """Move one element of the first parameter whose name contains `name_part` by one float32 step; its name."""
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if name_part in n)
    with torch.no_grad():
        flat = param.view(-1)
        flat[position] = torch.nextafter(flat[position], torch.tensor(float("inf")))
    return name


@pytest.mark.parametrize(
    "name_part, position",
    [
        ("mlp.up_proj.lora_B", 1),  # 128 x 4 elements
        ("embed_tokens", 0),
        ("embed_tokens", 1),  # one token's embedding among 49k
        ("layers.1.mlp.down_proj.base_layer", 777),
        ("model.norm", 5),
    ],
)
def test_one_weight_element_moved_by_one_float_step_changes_the_key(
    synthetic_data, base, name_part, position
):
    trainer, key = base
    name = nudged(trainer, name_part, position)
    assert key_of(trainer, synthetic_data) != key, f"{name}[{position}] changed, the key did not"


def assert_base_key_until_b_moves(tokenizer, data_dir, trainer, other, key) -> None:
    """`other`, whose adapter has B at zero, computes what `trainer` does and has its key; once one element of a B
    factor moves, A matters and the key moves too."""
    ids = torch.tensor([tokenizer.encode("a user who likes jazz <answer>")])
    with torch.no_grad():
        assert torch.equal(trainer.model(ids).logits, other.model(ids).logits)  # the same function
    assert key_of(other, data_dir) == key
    nudged(other, "mlp.up_proj.lora_B", 1)
    assert key_of(other, data_dir) != key


def test_lora_a_counts_once_its_b_is_not_zero(tokenizer, synthetic_data, tmp_path):
    trainer = build_trainer(tokenizer, synthetic_data, tmp_path / "trained", random_lora_b=True)
    key = key_of(trainer, synthetic_data)
    name = nudged(trainer, "lora_A", 0)
    assert key_of(trainer, synthetic_data) != key, f"{name}[0] changed, the key did not"


def test_another_lora_initialisation_with_b_at_zero_keeps_the_key(tokenizer, synthetic_data, tmp_path, base):
    # peft starts B at zero: B A = 0 for any A, so every seed's untrained model is the base model and shares
    # the cached evaluation (and item index); a nudged A with B still zero computes the same, too.
    trainer, key = base
    other = build_trainer(  # another seed initialises LoRA; the evaluated users stay the base's
        tokenizer, synthetic_data, tmp_path / "other-seed", seed=7, users_seed=trainer.args.seed
    )
    a_base, a_other = (
        next(p for n, p in t.model.named_parameters() if "lora_A" in n) for t in (trainer, other)
    )
    assert not torch.equal(a_base, a_other)  # really another initialisation
    assert key_of(other, synthetic_data) == key
    nudged(other, "lora_A", 0)  # A with B still zero computes the same, too
    assert_base_key_until_b_moves(tokenizer, synthetic_data, trainer, other, key)


@pytest.mark.parametrize(
    "adapter",
    [{"lora_layers": [1]}, {"lora_rank": 8}],  # the last layer only (`--lora_top_layers 1`); another rank
)
def test_another_untrained_adapter_layout_keeps_the_key(tokenizer, synthetic_data, tmp_path, base, adapter):
    # An adapter with B at zero is the base model wherever it sits and whatever its rank, so the run finds the
    # untrained evaluation another layout cached; once B moves, the key does.
    trainer, key = base
    other = build_trainer(tokenizer, synthetic_data, tmp_path / "other-layout", **adapter)

    def layout(t) -> set:
        return {(n, tuple(p.shape)) for n, p in t.model.named_parameters()}

    assert layout(other) != layout(trainer)  # really another layout
    assert_base_key_until_b_moves(tokenizer, synthetic_data, trainer, other, key)


def test_another_random_model_changes_the_key(tokenizer, synthetic_data, tmp_path, base):
    _, key = base
    other = build_trainer(
        tokenizer, synthetic_data, tmp_path / "other", model=build_tiny_model(tokenizer, seed=1)
    )
    assert key_of(other, synthetic_data) != key


def test_a_different_rope_base_with_the_same_weights_changes_the_key(
    tokenizer, synthetic_data, tmp_path, base
):
    # The same parameters, but the rotary frequencies (a buffer, from the config) differ: other hidden states.
    _, key = base
    model = build_tiny_model(tokenizer)
    config = model.config.to_dict()
    if "rope_parameters" in config:  # transformers 5
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 500.0}
    else:
        config["rope_theta"] = 500.0
    other_model = type(model)(type(model.config)(**config))
    other_model.load_state_dict(model.state_dict())
    other_model.generation_config = model.generation_config
    ids = torch.tensor([tokenizer.encode("a user who likes jazz <answer>")])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, other_model.eval()(ids).logits)  # really another model
    other = build_trainer(tokenizer, synthetic_data, tmp_path / "other", model=other_model)
    assert weights_fingerprint(other.model.get_base_model()) != weights_fingerprint(
        build_trainer(tokenizer, synthetic_data, tmp_path / "same").model.get_base_model()
    )
    assert key_of(other, synthetic_data) != key


# ----------------------------------------------------------------------------- other data


def changed_copy(data_dir, out, split: str) -> str:
    """The dataset with one split's content changed (saved and read back as a run would); its folder.

    `datasets` fingerprints follow lineage, not content: a transform gives a new one, and so does a plain copy
    (`save_to_disk` of a loaded dataset) or a fresh `python -m data_prep` of the same data, each a harmless miss.
    """
    data = load_from_disk(str(data_dir))
    if split == "items":

        def change(row, i):
            prompt = [dict(turn) for turn in row["prompt"]]
            if i == 0:
                prompt[1]["content"] += " Remastered."
            return {"prompt": prompt}

        data["items"] = data["items"].map(change, with_indices=True)
    else:
        num_items = len(data["items"])
        data[split] = data[split].map(lambda row: {"target": (row["target"] + 1) % num_items})
    DatasetDict(data).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("split", ["items", "valid", "test"])
def test_changed_data_changes_the_key(tokenizer, synthetic_data, tmp_path, base, split):
    _, key = base
    changed = changed_copy(synthetic_data, tmp_path / "data", split)
    before = load_from_disk(str(synthetic_data))[split]._fingerprint
    assert load_from_disk(str(changed))[split]._fingerprint != before
    assert key_of(build_trainer(tokenizer, changed, tmp_path / "out"), changed) != key


# ----------------------------------------------------------------------------- other users


def test_fewer_users_change_the_key(tokenizer, synthetic_data, tmp_path, base):
    _, key = base
    fewer = build_trainer(tokenizer, synthetic_data, tmp_path / "other", max_eval_users=3)
    assert key_of(fewer, synthetic_data) != key


@pytest.mark.parametrize("split", ["eval_rows", "test_rows"])
def test_other_seeded_users_change_the_key(synthetic_data, base, split):
    trainer, key = base
    rows = getattr(trainer, split)
    dataset = trainer.eval_dataset if split == "eval_rows" else trainer.test_dataset
    others = _subset(dataset, len(rows), seed=7)  # what seed 7 evaluates
    assert [r["sample_index"] for r in others] != [r["sample_index"] for r in rows]
    setattr(trainer, split, others)
    assert key_of(trainer, synthetic_data) != key


# ----------------------------------------------------------------------------- other settings


@pytest.mark.parametrize(
    "change",
    [
        {"reasoning": False},
        {"max_completion_length": 9},
        {"eval_max_completion_length": 5},
        {"answer_marker": "<ans>"},
        {"similarity_temperature": 0.05},
        {"eval_batch_users": 3},
        {"item_batch_size": 7},
    ],
)
def test_other_evaluation_settings_change_the_key(tokenizer, synthetic_data, tmp_path, base, change):
    _, key = base
    other = build_trainer(tokenizer, synthetic_data, tmp_path / "other", **change)
    assert key_of(other, synthetic_data) != key


def test_redraw_lora_starts_every_adapter_afresh_from_its_seed_alone(tokenizer, synthetic_data, tmp_path):
    # What a warm-up restart does on every process: the same seed gives the same factors whatever the weights
    # and the global random state were, B is zero again (the base model's function), and the global state stays.
    first = build_trainer(tokenizer, synthetic_data, tmp_path / "a", random_lora_b=True)
    second = build_trainer(tokenizer, synthetic_data, tmp_path / "b", random_lora_b=True, seed=7)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    layers = [redraw_lora(t.model, seed=5) for t in (first, second)]
    assert layers[0] == layers[1] > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    params = [dict(t.model.named_parameters()) for t in (first, second)]
    factors = [n for n in params[0] if "lora_" in n]
    assert factors and all(torch.equal(params[0][n], params[1][n]) for n in factors)
    assert all(not params[0][n].any() for n in factors if "lora_B" in n)
    assert all(params[0][n].any() for n in factors if "lora_A" in n)
    redraw_lora(second.model, seed=6)
    a = next(n for n in factors if "lora_A" in n)
    assert not torch.equal(dict(second.model.named_parameters())[a], params[0][a])  # another seed, other A
