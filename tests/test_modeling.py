"""ThinkRecForCausalLM on a tiny random Llama: losses, injection, scoring, Trainer accumulation,
LoRA stages, dtype, checkpointing, generation and save/load (native and trust_remote_code)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _tiny_model import REPO_ROOT, make_model, make_records
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from configuration_thinkrec import ThinkRecConfig
from data_collator import ThinkRecCollator
from modeling_thinkrec import ThinkRecForCausalLM


def collate(tokenizer, records, **kwargs):
    return ThinkRecCollator(tokenizer, **kwargs)(records)


@pytest.fixture(scope="module")
def mf_model():
    return make_model("mf")


def hand_computed_loss(model, batch, logits):
    """Per-row mixture computed row by row from full vocabulary logits."""
    config = model.config
    total = 0.0
    for row in range(batch["input_ids"].shape[0]):
        answer_columns = (batch["labels"][row] != -100).nonzero().flatten()
        score_column = answer_columns[0] - 1
        row_logits = logits[row, score_column].float()
        score = row_logits[config.yes_token_id]
        if config.score_type == "yes_no_log_odds":
            score = score - row_logits[config.no_token_id]
        bce = F.binary_cross_entropy_with_logits(score, batch["target_labels"][row])
        lm = F.cross_entropy(logits[row, answer_columns - 1].float(), batch["labels"][row, answer_columns])
        if batch["mode"][row] == 1:
            total = total + config.reason_bce_weight * bce + config.reason_lm_weight * lm
        else:
            total = total + config.rec_bce_weight * bce + config.rec_lm_weight * lm
    return total / batch["input_ids"].shape[0]


@pytest.mark.parametrize("score_type", ["yes_logit", "yes_no_log_odds"])
def test_mixed_batch_loss_equals_hand_computed_mixture(score_type):
    model, tokenizer = make_model("mf", score_type=score_type)
    batch = collate(tokenizer, make_records(4, seed=1))
    assert batch["mode"].tolist() == [0, 1, 0, 1]
    output = model(**batch, return_logits=True)
    expected = hand_computed_loss(model, batch, output.logits)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    # The default output keeps no vocabulary logits but the same loss and scores.
    lean = model(**batch)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, output.loss)
    torch.testing.assert_close(lean.scores, output.scores)
    assert lean.bce_loss.shape == lean.lm_loss.shape == (4,)


def test_loss_weights_follow_the_mode_flag(mf_model):
    model, tokenizer = mf_model
    records = make_records(2, seed=2, modes=("reason",))
    batch = collate(tokenizer, records)
    output = model(**batch)
    as_reason = (0.1 * output.bce_loss + 0.9 * output.lm_loss).mean()
    torch.testing.assert_close(output.loss, as_reason)
    batch["mode"] = torch.zeros_like(batch["mode"])
    output = model(**batch)
    torch.testing.assert_close(output.loss, (0.9 * output.bce_loss + 0.1 * output.lm_loss).mean())


def test_labels_need_mode_and_target_labels(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(2))
    del batch["mode"]
    with pytest.raises(ValueError, match="mode"):
        model(**batch)


def test_unaligned_prompts_are_rejected(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(2))
    batch["labels"][1] = torch.roll(batch["labels"][1], 1)
    with pytest.raises(ValueError, match="row 1: answer starts at column"):
        model(**batch)


class GradientRecorder(TrainerCallback):
    """Keeps the accumulated gradients right before the optimizer step."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {
            name: parameter.grad.detach().clone()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }


def trainer_gradients(tmp_path, batch_size, accumulation_steps, records):
    model, tokenizer = make_model("mf", seed=3)
    model.set_training_stage("joint")
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}_ga{accumulation_steps}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation_steps,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=records,
        data_collator=ThinkRecCollator(tokenizer),
        callbacks=[recorder],
    )
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()
    return recorder.gradients


def test_gradient_accumulation_through_trainer_equals_one_big_batch(tmp_path):
    # Rows of different prompt and answer lengths, so every micro-batch pads differently.
    records = make_records(4, seed=4)
    big = trainer_gradients(tmp_path, 4, 1, records)
    accumulated = trainer_gradients(tmp_path, 2, 2, records)
    assert big and set(big) == set(accumulated)
    assert any(name.startswith("model.projector.") for name in big)
    assert any("lora_A" in name for name in big)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_slot_and_vector_count_mismatch_names_the_row(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(4, seed=5), history_item_slots=True)
    item_slot_ids = batch["item_slot_ids"].clone()
    count = int((item_slot_ids[2] != 0).sum())
    item_slot_ids[2, count - 1] = 0
    with pytest.raises(ValueError, match=f"row 2: {count} item slots but {count - 1} item ids"):
        model(**{**batch, "item_slot_ids": item_slot_ids})
    with pytest.raises(ValueError, match="row 0: 1 user slots but 0 user ids"):
        model(**{**batch, "user_slot_ids": None})
    with pytest.raises(ValueError, match="outside the CF table"):
        model(**{**batch, "item_slot_ids": batch["item_slot_ids"] + 100 * (batch["item_slot_ids"] != 0)})


def test_slots_are_replaced_by_projected_vectors(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(3, seed=6), history_item_slots=True)
    embeds = model.embed_prompt(batch["input_ids"], batch["user_slot_ids"], batch["item_slot_ids"])
    plain = model.get_input_embeddings()(batch["input_ids"])
    user_mask = batch["input_ids"] == model.config.user_slot_token_id
    item_mask = batch["input_ids"] == model.config.item_slot_token_id
    with torch.no_grad():
        expected_users = model.projector(model.user_table.weight[batch["user_slot_ids"][batch["user_slot_ids"] != 0]])
        expected_items = model.projector(model.item_table.weight[batch["item_slot_ids"][batch["item_slot_ids"] != 0]])
    torch.testing.assert_close(embeds[user_mask], expected_users)
    torch.testing.assert_close(embeds[item_mask], expected_items)
    torch.testing.assert_close(embeds[~(user_mask | item_mask)], plain[~(user_mask | item_mask)])


def test_several_tokens_per_id():
    model, tokenizer = make_model("mf", tokens_per_id=2)
    assert model.config.proj_token_num == 2
    batch = collate(tokenizer, make_records(2, seed=7), tokens_per_id=2)
    assert int((batch["input_ids"] == model.config.item_slot_token_id).sum()) == 4
    assert torch.isfinite(model(**batch).loss)
    single = collate(tokenizer, make_records(2, seed=7))
    with pytest.raises(ValueError, match="row 0: 1 user slots but 1 user ids x 2 tokens per id"):
        model(**single)


def test_score_does_not_depend_on_other_rows_padding(mf_model):
    model, tokenizer = mf_model
    records = make_records(3, seed=8)
    records[0]["HisItemIDs"], records[0]["HisItemTitles"] = [], []
    long_history = list(range(1, 11))
    records[1]["HisItemIDs"] = long_history
    records[1]["HisItemTitles"] = [f"A much longer movie title number {i}" for i in long_history]
    records[1]["mode"], records[1]["reason"] = "reason", "Yes. " + "It is a long explanation. " * 10
    together = model.score(**collate(tokenizer, records))
    alone = torch.cat([model.score(**collate(tokenizer, [record])) for record in records])
    prompts_only = model.score(**collate(tokenizer, records, include_answers=False))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prompts_only, alone, rtol=1e-5, atol=1e-6)
    assert ((together > 0) & (together < 1)).all()


def test_score_reads_the_last_prompt_position_of_forward(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(3, seed=9))
    output = model(**batch)
    torch.testing.assert_close(model.score(**batch), torch.sigmoid(output.scores))


def test_training_stages_freeze_the_right_parameters():
    model, _ = make_model("mf")
    groups = {
        "lora": lambda name: "lora_" in name,
        "projector": lambda name: name.startswith("model.projector."),
    }
    for stage, expected in (("lora", {"lora"}), ("projector", {"projector"}), ("joint", {"lora", "projector"})):
        trainable = set(model.set_training_stage(stage))
        assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}
        for group, matches in groups.items():
            names = {name for name, _ in model.named_parameters() if matches(name)}
            assert names, group
            assert (names <= trainable) == (group in expected), (stage, group)
        frozen = {name for name, _ in model.named_parameters() if not any(m(name) for m in groups.values())}
        assert not frozen & trainable
        assert any("base_layer" in name for name in frozen) and "model.user_table.weight" in frozen
    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_training_stage("all")
    no_lora, _ = make_model("mf", lora=False)
    with pytest.raises(ValueError, match="add_lora"):
        no_lora.set_training_stage("lora")
    text_only, _ = make_model("none")
    with pytest.raises(ValueError, match="no projector"):
        text_only.set_training_stage("projector")


def test_lora_stage_updates_only_lora(mf_model):
    model, tokenizer = make_model("mf", seed=10)
    model.set_training_stage("lora")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**collate(tokenizer, make_records(2, seed=10))).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed)


def test_text_only_model_rejects_slots_and_runs_text_prompts():
    model, tokenizer = make_model("none")
    assert model.projector is None and model.user_table is None
    records = make_records(2, seed=11)
    assert torch.isfinite(model(**collate(tokenizer, records, template="text_only")).loss)
    with pytest.raises(ValueError, match="text-only model"):
        model(**collate(tokenizer, records, template="collaborative"))


def test_sasrec_user_slot_encodes_the_history():
    model, tokenizer = make_model("sasrec")
    assert model.user_table is None and model.sequence_encoder is not None
    batch = collate(tokenizer, make_records(3, seed=12))
    model.train()
    assert not model.sequence_encoder.training
    embeds = model.embed_prompt(batch["input_ids"], batch["user_slot_ids"], batch["item_slot_ids"], batch["history_item_ids"])
    with torch.no_grad():
        expected = model.projector(model.sequence_encoder.encode(batch["history_item_ids"]))
    torch.testing.assert_close(embeds[batch["input_ids"] == model.config.user_slot_token_id], expected)
    model.eval()
    with pytest.raises(ValueError, match="history_item_ids"):
        model(**{**batch, "history_item_ids": None})
    assert torch.isfinite(model(**batch).loss)


def test_bf16_backbone_keeps_projector_and_lora_in_float32(tmp_path, mf_model):
    model, tokenizer = mf_model
    model.save_pretrained(tmp_path)
    loaded = ThinkRecForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert dtypes["model.language_model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    for name, dtype in dtypes.items():
        if name.startswith(("model.projector.", "model.user_table", "model.item_table")) or "lora_" in name:
            assert dtype == torch.float32, name
    loaded.set_training_stage("joint")
    loaded.train()
    output = loaded(**collate(tokenizer, make_records(2, seed=13)))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert loaded.projector.linear_1.weight.grad.dtype == torch.float32
    scores = loaded.score(**collate(tokenizer, make_records(2, seed=13)))
    torch.testing.assert_close(scores, model.score(**collate(tokenizer, make_records(2, seed=13))), atol=0.05, rtol=0)


@pytest.mark.parametrize("stage", ["lora", "projector"])
def test_gradient_checkpointing_gives_the_same_gradients(stage):
    model, tokenizer = make_model("mf", seed=14)
    model.set_training_stage(stage)
    batch = collate(tokenizer, make_records(2, seed=14))
    model.train()

    def gradients():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.language_model.model.gradient_checkpointing or any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )
    checkpointed = gradients()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_generate_uses_the_injected_vectors(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(2, seed=15), include_answers=False)
    prompt_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids")}
    generated = model.generate(
        **prompt_inputs, max_new_tokens=3, output_scores=True, output_logits=True, return_dict_in_generate=True
    )
    # GenerationMixin returns the prompt followed by the new tokens.
    assert generated.sequences.shape == (2, prompt_inputs["input_ids"].shape[1] + 3)
    assert torch.equal(generated.sequences[:, : prompt_inputs["input_ids"].shape[1]], prompt_inputs["input_ids"])
    assert model.generation_config.max_new_tokens == 400  # per-call override did not touch the saved config
    # The first generated token comes from the same injected prompt that forward() reads.
    logits = model(**prompt_inputs, return_logits=True).logits[:, -1]
    torch.testing.assert_close(generated.logits[0], logits, rtol=1e-4, atol=1e-4)
    # Slot tokens are never generated.
    slot_ids = [model.config.user_slot_token_id, model.config.item_slot_token_id]
    assert torch.isinf(generated.scores[0][:, slot_ids]).all()
    # Another user's vector changes the first step.
    other = model.generate(
        **{**prompt_inputs, "user_slot_ids": prompt_inputs["user_slot_ids"] % 10 + 1},
        max_new_tokens=1, output_logits=True, return_dict_in_generate=True,
    )
    assert not torch.allclose(other.logits[0], generated.logits[0])


def test_config_validation_messages():
    with pytest.raises(ValueError, match="cf_model_type must be one of"):
        ThinkRecConfig(cf_model_type="bpr")
    with pytest.raises(ValueError, match="num_users"):
        ThinkRecConfig(cf_model_type="mf", cf_embedding_dim=8, num_users=0, num_items=5)
    with pytest.raises(ValueError, match="outside the LM vocabulary"):
        ThinkRecConfig(text_config={"model_type": "llama", "vocab_size": 100}, yes_token_id=100)
    with pytest.raises(ValueError, match="score_type"):
        ThinkRecConfig(score_type="probability")
    with pytest.raises(ValueError, match="lora_config lacks"):
        ThinkRecConfig(lora_config={"r": 8})
    assert ThinkRecConfig(cf_model_type="sasrec", cf_embedding_dim=8, num_items=5).num_users == 0


def test_slot_tokens_are_dedicated_special_tokens(mf_model):
    model, tokenizer = mf_model
    slot_ids = {model.config.user_slot_token_id, model.config.item_slot_token_id}
    assert not slot_ids & {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
    assert min(slot_ids) >= 49152  # appended after the original vocabulary
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert tokenizer.convert_ids_to_tokens(model.config.yes_token_id) == "Yes"


# The repository is installed (editable) in the test environment, so a fresh interpreter could import
# its modules from anywhere: the script first makes every repository module unimportable, so the
# checkpoint folder's own files are all that can serve `trust_remote_code`.
BLOCK_REPOSITORY_IMPORTS = """
import importlib.abc, sys
REPOSITORY_MODULES = {"thinkrec", "configuration_thinkrec", "modeling_thinkrec", "sasrec_thinkrec", "experts_thinkrec",
                      "processing_thinkrec", "data_collator", "run_thinkrec"}
class BlockRepository(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REPOSITORY_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (repository blocked)")
        return None
sys.meta_path.insert(0, BlockRepository())
"""

REMOTE_SCORE_SCRIPT = BLOCK_REPOSITORY_IMPORTS + """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
checkpoint, batch_path = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
batch = torch.load(batch_path)
print(json.dumps({
    "module": type(model).__module__,
    "scores": model.score(**batch).tolist(),
    "slot_ids": tokenizer.convert_tokens_to_ids(["<|user_slot|>", "<|item_slot|>"]),
}))
"""


def test_save_and_load_native_and_remote_code_give_identical_scores(tmp_path, mf_model):
    model, tokenizer = mf_model
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    files = set(os.listdir(checkpoint))
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_thinkrec.py",
            "modeling_thinkrec.py", "sasrec_thinkrec.py", "tokenizer.json"} <= files
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_thinkrec.ThinkRecForCausalLM"
    )
    batch = collate(tokenizer, make_records(3, seed=16), history_item_slots=True)
    expected = model.score(**batch)

    native = ThinkRecForCausalLM.from_pretrained(checkpoint)
    torch.testing.assert_close(native.score(**batch), expected, rtol=0, atol=1e-6)
    assert native.config.lora_config == model.config.lora_config
    assert native.generation_config.max_new_tokens == model.generation_config.max_new_tokens
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(native.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    auto = AutoModelForCausalLM.from_pretrained(checkpoint)  # in-process registration
    torch.testing.assert_close(auto.score(**batch), expected, rtol=0, atol=1e-6)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert reloaded_tokenizer("<|user_slot|><|item_slot|>", add_special_tokens=False)["input_ids"] == [
        model.config.user_slot_token_id, model.config.item_slot_token_id,
    ]

    # trust_remote_code in a fresh interpreter that cannot import the repository's modules, from a copy
    # of the saved folder alone.
    copied = tmp_path / "elsewhere" / "copied-checkpoint"
    shutil.copytree(checkpoint, copied)
    batch_path = tmp_path / "batch.pt"
    torch.save(dict(batch), batch_path)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCORE_SCRIPT, str(copied), str(batch_path)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules"), remote["module"]
    torch.testing.assert_close(torch.tensor(remote["scores"]), expected, rtol=0, atol=1e-6)
    assert remote["slot_ids"] == [model.config.user_slot_token_id, model.config.item_slot_token_id]
    assert REPO_ROOT not in result.stdout


def test_trainer_predict_returns_per_row_scores_not_vocabulary_logits(tmp_path, mf_model):
    model, tokenizer = mf_model
    records = make_records(5, seed=17)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, remove_unused_columns=False, report_to=[],
        use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, data_collator=ThinkRecCollator(tokenizer))
    assert trainer.label_names == ["labels", "target_labels"]
    prediction = trainer.predict(records)
    scores, bce_loss, lm_loss = prediction.predictions
    assert scores.shape == bce_loss.shape == lm_loss.shape == (5,)
    expected = torch.cat([model.score(**collate(tokenizer, records[i : i + 2])) for i in range(0, 5, 2)])
    torch.testing.assert_close(torch.sigmoid(torch.from_numpy(scores)), expected, rtol=1e-5, atol=1e-6)
    assert prediction.label_ids[1].tolist() == [float(r["label"]) for r in records]


def test_a_real_import_error_in_the_payload_surfaces_as_itself(tmp_path, mf_model):
    """A sibling file of the remote code that fails to import must show its own error, not a second,
    confusing "No module named 'sasrec_thinkrec'" from the top-level fallback."""
    model, tokenizer = mf_model
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    sibling = checkpoint / "sasrec_thinkrec.py"
    sibling.write_text('raise ImportError("sasrec_thinkrec is broken on purpose")\n' + sibling.read_text())
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    script = BLOCK_REPOSITORY_IMPORTS + (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "sasrec_thinkrec is broken on purpose" in result.stderr
    assert "repository blocked" not in result.stderr, result.stderr[-2000:]


def _model_from_a_backbone_folder(tmp_path, cf_model_type="mf"):
    """A ThinkRec model around a backbone loaded from a folder (so it has a base reference)."""
    from _tiny_model import make_cf_checkpoint, make_tokenizer

    from thinkrec.training.backbones import tiny_llama

    tokenizer = make_tokenizer(with_slots=False)
    backbone_dir = tmp_path / "backbone"
    tiny_llama(len(tokenizer), hidden_size=32, num_attention_heads=2, tie_word_embeddings=False, seed=3).save_pretrained(backbone_dir)
    language_model = AutoModelForCausalLM.from_pretrained(backbone_dir)
    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, make_cf_checkpoint(cf_model_type, 0))
    model.add_lora()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    return model.eval(), tokenizer, backbone_dir


def test_checkpoints_hold_what_was_trained_and_a_reference_to_the_base(tmp_path):
    model, tokenizer, backbone_dir = _model_from_a_backbone_folder(tmp_path)
    batch = collate(tokenizer, make_records(4, seed=21), history_item_slots=True)
    expected = model.score(**batch)
    small, full = tmp_path / "small", tmp_path / "full"
    model.save_pretrained(small)
    model.save_pretrained(full, full_weights=True)
    tokenizer.save_pretrained(small)
    assert json.loads((small / "config.json").read_text())["base_model_name_or_path"] == str(backbone_dir)
    assert not (small / "model.safetensors").exists() and (full / "model.safetensors").is_file()
    saved = load_file(small / "thinkrec_weights.safetensors")
    # Untied embeddings: the two added slot rows of the input and of the output matrix, nothing else of the base.
    assert saved["added_rows.input_embeddings"].shape == (2, 32) and saved["added_rows.output_embeddings"].shape == (2, 32)
    assert not any(name.startswith("language_model.") and "lora_" not in name for name in saved)
    small_bytes = (small / "thinkrec_weights.safetensors").stat().st_size
    trained_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert small_bytes <= 1.1 * trained_bytes and small_bytes < (full / "model.safetensors").stat().st_size / 3
    for loaded in (ThinkRecForCausalLM.from_pretrained(small), ThinkRecForCausalLM.from_pretrained(full)):
        torch.testing.assert_close(loaded.score(**batch), expected, rtol=0, atol=1e-6)

    # trust_remote_code, repository blocked, from a copy of the small folder: the base is rebuilt from its reference.
    copied = tmp_path / "elsewhere" / "small"
    shutil.copytree(small, copied)
    batch_path = tmp_path / "batch.pt"
    torch.save(dict(batch), batch_path)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", REMOTE_SCORE_SCRIPT, str(copied), str(batch_path)], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])["scores"]), expected,
                               rtol=0, atol=1e-6)


def test_a_small_checkpoint_refuses_another_base(tmp_path):
    model, tokenizer, _ = _model_from_a_backbone_folder(tmp_path)
    model.save_pretrained(tmp_path / "small")
    from thinkrec.training.backbones import tiny_llama

    tiny_llama(len(tokenizer) + 7, hidden_size=32, num_attention_heads=2, seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not the same backbone"):
        ThinkRecForCausalLM.from_pretrained(tmp_path / "small", base_model_name_or_path=str(tmp_path / "other"))


def _wrapped(architecture: str):
    """A tiny ThinkRec model (MF vectors, LoRA) around a random LM of `architecture`."""
    from _tiny_model import make_cf_checkpoint, make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from thinkrec.training.backbones import tiny_llama

    tokenizer = make_tokenizer(with_slots=False)
    torch.manual_seed(5)
    if architecture == "llama":
        language_model, targets = tiny_llama(len(tokenizer), hidden_size=32, num_attention_heads=2, seed=5), ["q_proj", "v_proj"]
    elif architecture == "qwen2":
        language_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        targets = ["q_proj", "v_proj"]
    else:
        language_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512))
        targets = ["c_attn"]
    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, make_cf_checkpoint("mf", 0))
    model.add_lora(target_modules=targets)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    return model.eval(), tokenizer


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("rows", [3, 1])
def test_generation_goes_through_generation_mixin_with_a_cache(architecture, rows):
    """Cached decoding gives the uncached tokens, for a padded batch and for one row with no padding
    (GenerationMixin then drops the all-ones mask; forward used to make a mask of the new token alone,
    which hid the cache from it, so every reason generated for an unpadded batch was decoded wrongly)."""
    model, tokenizer = _wrapped(architecture)
    batch = collate(tokenizer, make_records(3, seed=31)[:rows], include_answers=False, history_item_slots=True)
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids")}
    cached = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, use_cache=False)
    # The slot vectors go in on the first step only; every later step reuses the cache built from them.
    assert torch.equal(cached, uncached)
    first_token = model(**prompt).logits[:, -1].argmax(-1)
    assert torch.equal(cached[:, prompt["input_ids"].shape[1]], first_token)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_answer_logits_are_the_language_models_own(architecture):
    """The head applied to the backbone's hidden states gives the wrapped causal LM's own logits."""
    model, tokenizer = _wrapped(architecture)
    batch = collate(tokenizer, make_records(4, seed=32), history_item_slots=True)
    full = model(**batch, return_logits=True)
    with torch.no_grad():
        embeds = model.embed_prompt(batch["input_ids"], batch["user_slot_ids"], batch["item_slot_ids"])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        own = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=positions).logits
    torch.testing.assert_close(full.logits, own, rtol=1e-5, atol=1e-5)
    sliced = model(**batch)
    torch.testing.assert_close(full.loss, sliced.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.scores, sliced.scores, rtol=1e-5, atol=1e-6)


def test_a_right_padded_prompt_batch_is_refused(mf_model):
    model, tokenizer = mf_model
    batch = collate(tokenizer, make_records(2, seed=33), include_answers=False)
    right_padded = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="row .: the last column is padding"):
        model.score(input_ids=batch["input_ids"].flip(-1), attention_mask=right_padded,
                    user_slot_ids=batch["user_slot_ids"], item_slot_ids=batch["item_slot_ids"])


class _HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make a CUDA device wait for the host: reading a value (`.item()`, `bool()`),
    `nonzero`, boolean-mask indexing and `repeat_interleave` without its output size."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"):
            self.count += 1
        elif name == "aten.index.Tensor" and any(isinstance(index, torch.Tensor) and index.dtype == torch.bool
                                                 for index in args[1] if index is not None):
            self.count += 1
        elif name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None:
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["mf", "sasrec", "mf_experts", "none"])
def test_the_per_row_checks_cost_one_host_sync_on_the_happy_path(kind):
    """All of forward's slot, id-range, routing and padding checks together add one host sync to the LM's
    own (they added 9 for MF and SASRec, 17 with experts and 3 text-only: a `.nonzero()`/`.any()`/`.item()`
    per check and boolean-mask lookups)."""
    if kind == "mf_experts":
        from test_experts_model import with_experts

        model, tokenizer = with_experts("mf")
    else:
        model, tokenizer = make_model(kind)
    records = make_records(4, seed=2)
    batch = collate(tokenizer, records, include_answers=False, **({"template": "text_only"} if kind == "none" else {}))
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids",
                                          "history_item_ids", "user_ids")}
    with torch.no_grad():
        embeds = model.embed_prompt(batch["input_ids"], batch["user_slot_ids"], batch["item_slot_ids"], batch["history_item_ids"])
        if model.has_experts:
            model.routing_state.weights = model.route(batch["user_ids"])
        with _HostSyncCounter() as language_model_alone:
            model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], logits_to_keep=1)
        with _HostSyncCounter() as thinkrec:
            model(**inputs)
    assert thinkrec.count - language_model_alone.count == 1
