"""LLaVA's transformers-5 shape: `model.base_model` is `ThinkRecModel`, which injects the CF vectors and
routes rows to their experts itself, so a trainer that runs `model.base_model(...)` and projects its
`last_hidden_state` with `get_output_embeddings()` (trl's fused LM head) gets the full forward's logits;
and checkpoints written before the backbone was its own module still load to the same scores."""

import pytest
import torch
from _tiny_model import make_model, make_records
from safetensors.torch import load_file, save_file

from data_collator import ThinkRecCollator
from modeling_thinkrec import ThinkRecForCausalLM, ThinkRecModel


def backbone_inputs(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids",
                                        "history_item_ids", "user_ids")}


def model_of(kind):
    if kind.startswith("experts"):
        from test_experts_model import with_experts

        return with_experts(kind.split("_")[1], routing_rule="soft")
    return make_model(kind)


@pytest.mark.parametrize("kind", ["mf", "sasrec", "experts_mf", "experts_sasrec"])
def test_base_model_hidden_states_through_the_head_are_the_forwards_logits(kind):
    model, tokenizer = model_of(kind)
    assert isinstance(model.base_model, ThinkRecModel) and model.base_model is model.model
    # Prompt + answer, right-padded answers: what a GRPO step feeds (prompt and completion concatenated).
    batch = ThinkRecCollator(tokenizer)(make_records(4, seed=21))
    inputs = backbone_inputs(batch)
    with torch.no_grad():
        expected = model(**batch, return_logits=True).logits  # with labels: every position
        hidden = model.base_model(**inputs).last_hidden_state
        logits = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mf", "sasrec"])
def test_the_cf_vector_of_a_row_changes_that_rows_hidden_states_only(kind):
    model, tokenizer = make_model(kind)
    batch = ThinkRecCollator(tokenizer, include_answers=False)(make_records(3, seed=22))
    inputs = backbone_inputs(batch)
    changed = {key: value.clone() for key, value in inputs.items()}
    if kind == "sasrec":  # the user slot holds the history's encoding
        history = changed["history_item_ids"][1]
        history[history != 0] = (history[history != 0] % (model.config.num_items - 1)) + 1
        assert not torch.equal(history, inputs["history_item_ids"][1])
    else:
        slots = changed["user_slot_ids"][1]
        slots[slots != 0] = slots[slots != 0] % (model.config.num_users - 1) + 1
        assert not torch.equal(slots, inputs["user_slot_ids"][1])
    with torch.no_grad():
        before = model.base_model(**inputs).last_hidden_state
        after = model.base_model(**changed).last_hidden_state
    assert (after[1] - before[1]).abs().max() > 1e-4
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=0)


def test_base_model_checks_its_inputs():
    model, tokenizer = make_model("mf")
    batch = ThinkRecCollator(tokenizer, include_answers=False)(make_records(2, seed=23))
    inputs = backbone_inputs(batch)
    inputs["user_slot_ids"] = torch.zeros_like(inputs["user_slot_ids"])
    with pytest.raises(ValueError, match="row 0: .* user slots but 0 user ids"):
        model.base_model(**inputs)


def test_a_full_checkpoint_with_the_keys_before_the_backbone_module_loads_to_the_same_scores(tmp_path):
    """Folders saved before `ThinkRecModel` existed name the weights `language_model.*`, `projector.*`, ...
    (no `model.` prefix); transformers adds the base-model prefix a key lacks."""
    model, tokenizer = make_model("mf")
    model.save_pretrained(tmp_path, full_weights=True)
    weights = load_file(tmp_path / "model.safetensors")
    assert all(name.startswith("model.") for name in weights)
    save_file({name.removeprefix("model."): tensor for name, tensor in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    batch = ThinkRecCollator(tokenizer)(make_records(3, seed=24))
    loaded = ThinkRecForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.score(**batch), model.score(**batch), rtol=0, atol=1e-6)


def test_a_small_checkpoint_keeps_the_names_it_always_had(tmp_path):
    """`thinkrec_weights.safetensors` names the trained parts as in `ThinkRecModel` (`projector.*`,
    `user_table.weight`, `language_model.*lora_*`): the layout of every folder written before."""
    model, tokenizer = make_model("mf")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.config.base_vocab_size = model.get_input_embeddings().num_embeddings - 2
    saved = model.trained_state_dict()
    assert "user_table.weight" in saved and any(name.startswith("projector.") for name in saved)
    assert not any(name.startswith("model.") for name in saved)
    assert all(name.startswith("language_model.") for name in saved if "lora_" in name)
