"""run_thinkrec.py end to end on a tiny backbone: stages, evaluation, prediction, resume, publishing,
bad input, and two CPU ranks through `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from _run_fixtures import REPO_ROOT, run, write_backbone, write_mf, write_run_assets
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import run_thinkrec
from thinkrec.data.records import load_prepared
from thinkrec.training.trainer import interleave_reasoning_rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_run_assets(tmp_path_factory.mktemp("run_assets"))


def arguments(assets, output_dir, **overrides):
    args = {
        "records_dir": str(assets["records"]),
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_steps": 2,
        "eval_strategy": "no",
        "report_to": "none",
        "do_train": True,
        "seed": 7,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory):
    """A text-only LoRA model (stage 1) with evaluation, prediction and generation."""
    tmp_path = tmp_path_factory.mktemp("stage1")
    args = arguments(
        assets,
        tmp_path / "out",
        model_name_or_path=str(assets["backbone"]),
        stage="lora",
        eval_strategy="steps",
        eval_steps=2,
        do_eval=True,
        do_predict=True,
        generate_reasons_for=3,
        max_new_tokens=6,
        cf_checkpoint=str(assets["mf"]),
    )
    results = run(tmp_path, args)
    return tmp_path / "out", results


def test_stage1_writes_metrics_predictions_plots_and_card(stage1, assets):
    output_dir, results = stage1
    test_rows = assets["metadata"]["rows"]["test"]
    assert 0.0 <= results["test"]["auc"] <= 1.0
    assert results["test"]["n_rows"] == test_rows
    assert "cf_alone" in results  # the MF baseline measured on the same rows
    predictions = pd.read_parquet(output_dir / "test_predictions.parquet")
    assert len(predictions) == test_rows
    assert predictions["score"].between(0, 1).all()
    assert predictions["generated"].notna().sum() == 3
    for name in ("roc_curve.png", "training_curves.png", "README.md", "config.json", "thinkrec_weights.safetensors",
                 "modeling_thinkrec.py", "generation_settings.json", "test_results.json"):
        assert (output_dir / name).is_file(), name
    # The card's metadata is huggingface_hub's: the test AUC is one of its eval results.
    card_results = {result.metric_type: result.metric_value for result in ModelCard.load(output_dir / "README.md").data.eval_results}
    assert card_results["auc"] == results["test"]["auc"]
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train_logs = [entry for entry in log_history if "loss" in entry]
    assert train_logs and all("bce_loss" in entry and "lm_loss" in entry for entry in train_logs)
    assert any("eval_auc" in entry for entry in log_history)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["cf_model_type"] == "none" and config["lora_config"]["r"] == 8
    # The checkpoint holds what was trained and added, and a reference to the frozen base, not the base.
    assert config["base_model_name_or_path"] == str(assets["backbone"])
    assert not (output_dir / "model.safetensors").exists()
    saved = load_file(output_dir / "thinkrec_weights.safetensors")
    assert all("lora_" in name or name.startswith("added_rows.") for name in saved), sorted(saved)[:5]
    assert saved["added_rows.input_embeddings"].shape[0] == 2  # the user and item slot tokens
    for checkpoint in output_dir.glob("checkpoint-*"):
        assert (checkpoint / "thinkrec_weights.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()


def test_stage2_trains_the_projector_and_keeps_the_stage1_lora(stage1, assets, tmp_path):
    stage1_dir, _ = stage1
    args = arguments(assets, tmp_path / "out", init_from=str(stage1_dir), cf_checkpoint=str(assets["mf"]), stage="projector")
    run(tmp_path, args)
    before, after = load_file(stage1_dir / "thinkrec_weights.safetensors"), load_file(tmp_path / "out" / "thinkrec_weights.safetensors")
    lora = [name for name in before if "lora_" in name]
    assert lora and all(torch.equal(before[name], after[name]) for name in lora)
    projector = [name for name in after if name.startswith("projector.")]
    assert projector and not any(name in before for name in projector)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["cf_model_type"] == "mf" and config["lora_config"] is not None
    mf = load_file(assets["mf"] / "model.safetensors")
    assert torch.equal(after["user_table.weight"], mf["user_table"])


def test_unknown_key_in_the_args_file_stops(assets, tmp_path):
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), learning_rat=1e-3)
    with pytest.raises(ValueError, match="learning_rat"):
        run(tmp_path, args)


def test_projector_stage_needs_a_template_with_slots_and_a_cf_checkpoint(stage1, assets, tmp_path):
    stage1_dir, _ = stage1
    with pytest.raises(ValueError, match="no id slot"):
        run(tmp_path, arguments(assets, tmp_path / "a", init_from=str(stage1_dir), cf_checkpoint=str(assets["mf"]),
                                stage="projector", template="text_only"))
    with pytest.raises(ValueError, match="set cf_checkpoint"):
        run(tmp_path, arguments(assets, tmp_path / "b", init_from=str(stage1_dir), stage="projector"))


def test_a_text_only_stage_refuses_a_reason_template_with_id_slots(assets, tmp_path):
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), stage="lora",
                     reason_template="reflection")
    with pytest.raises(ValueError, match="'reflection' has id slots"):
        run(tmp_path, args)


def test_generated_reasons_are_asked_for_with_the_reason_template_and_start_with_the_scores_verdict(stage1, assets, monkeypatch):
    """Recommendation prompts ask for one word; generation must use the prompt that asks for the reason,
    and the verdict written is the score's (one decision per row), the reason generated after it."""
    from transformers import AutoTokenizer

    from data_collator import build_processor
    from modeling_thinkrec import ThinkRecForCausalLM

    stage1_dir, _ = stage1
    model = ThinkRecForCausalLM.from_pretrained(stage1_dir)
    tokenizer = AutoTokenizer.from_pretrained(stage1_dir)
    prompts, generate = [], model.generate

    def recording_generate(**kwargs):  # records the prompts, then generates as usual
        prompts.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    records = load_prepared(assets["records"]).splits["test"]
    processor = build_processor(tokenizer, template="text_only", reason_template="reflection_text_only")
    # log-odds scores: P(Yes) = 0.95, 0.05, 0.52 and, at threshold 0.6, the third is a No.
    scores = np.log(np.array([0.95, 0.05, 0.52]) / (1 - np.array([0.95, 0.05, 0.52])))
    texts = run_thinkrec.generate_reasons(model, processor, records.head(3).to_dict("records"), scores, 0.5, 4, 2)
    assert len(texts) == 3 and len(prompts) == 3
    assert all("explain the reason" in prompt for prompt in prompts)
    assert [text[:3] for text in texts] == ["Yes", "No.", "Yes"] and texts[0].startswith("Yes.")
    assert [prompt.rstrip().endswith(verdict) for prompt, verdict in zip(prompts, ["Yes.", "No.", "Yes."])] == [True] * 3
    texts = run_thinkrec.generate_reasons(model, processor, records.head(3).to_dict("records"), scores, 0.6, 4, 3)
    assert [text[:3] for text in texts] == ["Yes", "No.", "No."]


def test_predicted_reasons_agree_with_the_scores(stage1):
    """Before, the verdict was whatever the model wrote first: a barely trained model's text agreed with
    its own score in about 1% of ML-1M rows, and one quickstart answer was empty."""
    output_dir, results = stage1
    assert results["test"]["verdict_agrees_with_score"] == 1.0
    predictions = pd.read_parquet(output_dir / "test_predictions.parquet")
    generated = predictions[predictions["generated"].notna()]
    assert ((generated["score"] >= 0.5) == generated["generated"].str.startswith("Yes.")).all()
    assert (generated["generated"].str.len() > 0).all()


def test_scores_can_be_read_at_the_reason_prompt(assets, tmp_path):
    """score_prompt="reason": recommendation rows are trained and scored at the reason prompt, as published."""
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), stage="lora", max_steps=1,
                     do_predict=True, score_prompt="reason", generate_reasons_for=2, max_new_tokens=3)
    results = run(tmp_path, args)
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor_config["templates"] == processor_config["reason_templates"]
    assert "explain the reason" in processor_config["templates"][0]
    assert results["test"]["verdict_agrees_with_score"] == 1.0
    with pytest.raises(ValueError, match="score_prompt must be one of"):
        run(tmp_path, dict(args, score_prompt="answer"), name="bad.json")


def test_evaluation_subsets_keep_whole_users(assets):
    """A random-row subset of a split leaves most users with one row: no per-user AUC, UAUC is noise."""
    full = load_prepared(assets["records"]).splits
    data_args = run_thinkrec.DataArguments(records_dir=str(assets["records"]), max_eval_samples=9, max_test_samples=9)
    splits, _ = run_thinkrec.load_splits(data_args, seed=3)
    for name in ("validation", "test"):
        subset = splits[name].to_pandas()
        rows_per_user = full[name]["UserID"].value_counts()
        assert 0 < len(subset) <= 9
        assert (subset["UserID"].value_counts() == rows_per_user[subset["UserID"].unique()]).all(), name
        # Rows keep the split's order.
        assert subset["timestamp"].is_monotonic_increasing
    again, _ = run_thinkrec.load_splits(data_args, seed=3)
    assert again["test"]["UserID"] == splits["test"]["UserID"]


def test_records_without_an_item_noun_stop_before_the_model_loads(assets, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(assets["records"], records)
    metadata = json.loads((records / "metadata.json").read_text())
    del metadata["item_noun"]
    (records / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"records: metadata.json has no item_noun / item_noun_plural.*--item_noun"):
        run_thinkrec.load_splits(run_thinkrec.DataArguments(records_dir=str(records)), seed=0)


def test_records_whose_ids_exceed_the_cf_tables_stop_before_training(assets, tmp_path):
    small = write_mf(tmp_path / "small_mf", 3, 3)
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), cf_checkpoint=str(small), stage="joint")
    with pytest.raises(ValueError, match=r"largest UserID \d+ >= user table size 3"):
        run(tmp_path, args)
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_a_checkpoint_from_another_backbone_is_refused(stage1, tmp_path, assets):
    stage1_dir, _ = stage1
    from thinkrec.training.backbones import tiny_llama

    other = tiny_llama(100, hidden_size=48, num_attention_heads=2)
    other.save_pretrained(tmp_path / "other")
    args = arguments(assets, tmp_path / "out", init_from=str(stage1_dir), model_name_or_path=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="hidden_size is 32.*has 48"):
        run(tmp_path, args)


def test_an_empty_train_split_stops(assets, tmp_path):
    records = tmp_path / "records"
    shutil.copytree(assets["records"], records)
    metadata = json.loads((records / "metadata.json").read_text())
    train_file = records / metadata["files"]["train"]
    pd.read_parquet(train_file).head(0).to_parquet(train_file)
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), records_dir=str(records))
    with pytest.raises(ValueError, match="train split is empty"):
        run(tmp_path, args)


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(assets, tmp_path):
    common = dict(model_name_or_path=str(assets["backbone"]), stage="lora", max_steps=6, save_steps=3, do_predict=True)
    uninterrupted = run(tmp_path, arguments(assets, tmp_path / "full", **common), "full.json")
    killed = arguments(assets, tmp_path / "killed", **common)
    run(tmp_path, killed, "killed.json")
    # Leave the folder as a run killed after step 3 would: only checkpoint-3 exists.
    for path in (tmp_path / "killed").iterdir():
        if path.name != "checkpoint-3":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run(tmp_path, killed, "killed.json")
    assert resumed["test"]["auc"] == pytest.approx(uninterrupted["test"]["auc"], abs=1e-9)
    full_weights = load_file(tmp_path / "full" / "thinkrec_weights.safetensors")
    resumed_weights = load_file(tmp_path / "killed" / "thinkrec_weights.safetensors")
    for name in (n for n in full_weights if "lora_" in n):
        torch.testing.assert_close(resumed_weights[name], full_weights[name])


def test_push_to_hub_uploads_a_folder_that_loads_with_remote_code(stage1, assets, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_collator import ThinkRecCollator

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):  # network call
        uploaded["repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):  # network call
        shutil.copytree(folder_path, tmp_path / "hub", ignore=shutil.ignore_patterns(*ignore_patterns))

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    stage1_dir, _ = stage1
    args = arguments(assets, tmp_path / "out", init_from=str(stage1_dir), cf_checkpoint=str(assets["mf"]), stage="projector",
                     push_to_hub=True, hub_model_id="someone/thinkrec-toy")
    run(tmp_path, args)
    hub = tmp_path / "hub"
    assert uploaded["repo"] == "someone/thinkrec-toy"
    assert not list(hub.glob("checkpoint-*")) and (hub / "README.md").is_file()
    assert "someone/thinkrec-toy" in (hub / "README.md").read_text()
    remote = AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True).eval()
    local = run_thinkrec.ThinkRecForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(hub)
    rows = datasets.load_dataset(str(assets["records"]), split="test").select(range(6)).to_list()
    batch = ThinkRecCollator(tokenizer, template="collaborative", include_answers=False)(rows)
    torch.testing.assert_close(remote.score(**batch), local.score(**batch))


def test_reasoning_rows_are_mixed_in_per_row_at_the_share():
    rec = datasets.Dataset.from_dict({"UserID": list(range(4000)), "mode": ["rec"] * 4000, "reason": [""] * 4000})
    reason = datasets.Dataset.from_dict({"UserID": list(range(50)), "mode": ["reason"] * 50, "reason": ["Yes. x"] * 50})
    mixed = interleave_reasoning_rows(rec, reason, 0.2, seed=0)
    modes = np.array(mixed["mode"])
    share = (modes == "reason").mean()
    assert 0.17 < share < 0.23
    assert (modes == "rec").sum() == 4000  # every recommendation row is used once
    first_half = (modes[: len(modes) // 2] == "reason").mean()
    assert 0.15 < first_half < 0.25  # mixed row by row, not appended in a block


@pytest.mark.slow
def launch_two_cpu_ranks(script, args_path, env_extra=None):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", **(env_extra or {}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO_ROOT, "accelerate_configs", "cpu_two_ranks.yaml"), script, str(args_path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]


def test_two_cpu_ranks_train_identical_weights_and_evaluate_every_row_once(assets, tmp_path):
    output_dir = tmp_path / "ddp"
    args = arguments(assets, output_dir, model_name_or_path=str(assets["backbone"]), stage="lora", do_eval=True,
                     per_device_train_batch_size=2, max_steps=3, save_steps=100, do_predict=True)
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(args))
    launch_two_cpu_ranks(os.path.join(REPO_ROOT, "tests", "_launch_and_dump.py"), path,
                         {"THINKREC_DUMP_RANK_WEIGHTS": str(tmp_path)})
    rank0, rank1 = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    results = json.loads((output_dir / "test_results.json").read_text())
    assert results["test"]["n_rows"] == assets["metadata"]["rows"]["test"]
    evaluation = json.loads((output_dir / "eval_results.json").read_text())
    assert evaluation["eval_n_rows"] == assets["metadata"]["rows"]["validation"]  # gathered from both ranks, once


def test_two_cpu_ranks_predict_generate_and_route_like_one(stage1, assets, tmp_path):
    """Predict on two ranks gives what one rank gives: scores, the CF model's own scores and routing
    weights from every rank's forwards, reasons generated for an odd number of rows split over both
    ranks (rank 0 used to do the CF scoring, routing and generation alone, which hangs under FSDP/ZeRO-3)."""
    stage1_dir, _ = stage1
    experts = tmp_path / "experts"
    run(tmp_path, arguments(assets, experts, init_from=str(stage1_dir), cf_checkpoint=str(assets["mf"]), stage="experts",
                            num_clusters=2, routing_rule="soft", max_steps=2), name="train.json")
    outputs = {}
    for ranks in (1, 2):
        output_dir = tmp_path / f"predict{ranks}"
        args = arguments(assets, output_dir, init_from=str(experts), stage="experts", routing_rule="soft", do_train=False,
                         do_predict=True, generate_reasons_for=3, max_new_tokens=5, per_device_eval_batch_size=4)
        if ranks == 1:
            run(tmp_path, args, name="predict1.json")
        else:
            path = tmp_path / "predict2.json"
            path.write_text(json.dumps(args))
            launch_two_cpu_ranks(os.path.join(REPO_ROOT, "run_thinkrec.py"), path)
        outputs[ranks] = pd.read_parquet(output_dir / "test_predictions.parquet")
    one, two = outputs[1], outputs[2]
    assert len(two) == len(one) == assets["metadata"]["rows"]["test"]
    np.testing.assert_allclose(two["score"], one["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["cf_score"], one["cf_score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(two["routing_weights"]), np.stack(one["routing_weights"]), rtol=1e-5, atol=1e-6)
    assert one["generated"].notna().sum() == 3
    assert two["generated"].tolist() == one["generated"].tolist()
    # The CF scores are the MF checkpoint's own: user vector · item vector.
    mf = load_file(assets["mf"] / "model.safetensors")
    expected = (mf["user_table"][torch.tensor(one["UserID"])] * mf["item_table"][torch.tensor(one["TargetItemID"])]).sum(-1)
    np.testing.assert_allclose(one["cf_score"], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_qlora_stage1_to_stage2_to_reflect_reloads_the_4bit_base(assets, tmp_path):
    """A QLoRA checkpoint reloads with its quantisation (it used to fail: "FP4 quantization state not
    initialized"), feeds stage 2 and reflect.py, and scores the same after reload."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoTokenizer

    import reflect
    from data_collator import ThinkRecCollator
    from modeling_thinkrec import ThinkRecForCausalLM

    # bitsandbytes' CPU 4-bit inference kernel works in blocks of 64 inputs: a hidden size of 128, not 32.
    backbone = write_backbone(tmp_path / "backbone128", hidden_size=128)
    stage1 = tmp_path / "stage1"
    run(tmp_path, arguments(assets, stage1, model_name_or_path=str(backbone), load_in_4bit=True, max_steps=2,
                            do_predict=True), "s1.json")
    config = json.loads((stage1 / "config.json").read_text())
    assert config["text_config"]["quantization_config"]["load_in_4bit"] is True
    reloaded = ThinkRecForCausalLM.from_pretrained(stage1).eval()
    assert any(isinstance(module, Linear4bit) for module in reloaded.modules())
    tokenizer = AutoTokenizer.from_pretrained(stage1)
    rows = load_prepared(assets["records"]).splits["test"].to_dict("records")[:4]
    scores = reloaded.score(**ThinkRecCollator(tokenizer, template="text_only")(rows))
    predictions = pd.read_parquet(stage1 / "test_predictions.parquet")
    np.testing.assert_allclose(scores.numpy(), predictions["score"].to_numpy()[:4], rtol=1e-4, atol=1e-5)

    stage2 = tmp_path / "stage2"
    results = run(tmp_path, arguments(assets, stage2, init_from=str(stage1), cf_checkpoint=str(assets["mf"]), stage="projector",
                                      load_in_4bit=True, max_steps=1), "s2.json")
    assert results["train"]["train_loss"] > 0
    assert any(isinstance(m, Linear4bit) for m in ThinkRecForCausalLM.from_pretrained(stage2).modules())
    (tmp_path / "reflect.json").write_text(json.dumps({
        "model_dir": str(stage2), "records_dir": str(assets["records"]), "output_path": str(tmp_path / "reasons.parquet"),
        "max_train_samples": 12, "history_item_slots": False,
    }))
    summary = reflect.main([str(tmp_path / "reflect.json")])
    assert summary["rows_scored"] == 12


def test_experts_stage_trains_all_experts_in_one_run_and_reloads_to_the_same_scores(stage1, assets, tmp_path):
    from transformers import AutoTokenizer

    from data_collator import ThinkRecCollator
    from experts_thinkrec import ExpertLoraLinear
    from modeling_thinkrec import ThinkRecForCausalLM

    stage1_dir, _ = stage1
    args = arguments(assets, tmp_path / "out", init_from=str(stage1_dir), cf_checkpoint=str(assets["mf"]), stage="experts",
                     num_clusters=2, routing_rule="soft", do_predict=True)
    results = run(tmp_path, args)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 2 and config["routing_rule"] == "soft" and config["expert_layers"] == [0, 1]
    summary = json.loads((out / "user_clusters.json").read_text())
    assert summary["num_clusters"] == 2 and sum(summary["users_per_cluster"]) == assets["metadata"]["num_users"] - 1
    assert (out / "experts_thinkrec.py").is_file()
    predictions = pd.read_parquet(out / "test_predictions.parquet")
    assert set(predictions["expert"]) <= {0, 1} and len(predictions["routing_weights"][0]) == 3
    assert results["test"]["routing_rule"] == "soft"
    # Trained: the expert slices moved away from the stage-1 LoRA they were copied from.
    before, after = load_file(stage1_dir / "thinkrec_weights.safetensors"), load_file(out / "thinkrec_weights.safetensors")
    expert_keys = [key for key in after if key.endswith(".lora_B") and "layers.1." in key]
    assert expert_keys
    shared = before[expert_keys[0].replace(".lora_B", ".lora_B.default.weight")]
    assert not torch.equal(after[expert_keys[0]][:, : shared.shape[1]], shared)
    # The saved folder reloads to the scores in the predictions file.
    model = ThinkRecForCausalLM.from_pretrained(out).eval()
    assert sum(isinstance(m, ExpertLoraLinear) for m in model.modules()) == 4
    tokenizer = AutoTokenizer.from_pretrained(out)
    test = load_prepared(assets["records"]).splits["test"].to_dict("records")[:6]
    scores = model.score(**ThinkRecCollator(tokenizer, template="text_only")(test))
    np.testing.assert_allclose(scores.numpy(), predictions["score"].to_numpy()[:6], rtol=1e-4, atol=1e-5)


def test_experts_stage_refuses_a_start_without_lora_or_init_from(assets, tmp_path):
    with pytest.raises(ValueError, match="set init_from"):
        run(tmp_path, arguments(assets, tmp_path / "a", stage="experts", cf_checkpoint=str(assets["mf"]),
                                model_name_or_path=str(assets["backbone"])))
    projector_only = tmp_path / "projector_only"
    run(tmp_path, arguments(assets, projector_only, stage="projector", cf_checkpoint=str(assets["mf"]),
                            model_name_or_path=str(assets["backbone"]), max_steps=1), name="p.json")
    with pytest.raises(ValueError, match="has none \\(train stage 'lora' first\\)"):
        run(tmp_path, arguments(assets, tmp_path / "b", stage="experts", init_from=str(projector_only), num_clusters=2))


def test_a_checkpoint_of_another_run_is_not_resumed(assets, tmp_path):
    out = tmp_path / "out"
    common = dict(model_name_or_path=str(assets["backbone"]), stage="lora", max_steps=2, save_steps=2)
    run(tmp_path, arguments(assets, out, **common), "a.json")
    saved = json.loads((out / "checkpoint-2" / "thinkrec_run_arguments.json").read_text())
    assert saved["training"]["learning_rate"] == 1e-3 and saved["records"]["files"]
    with pytest.raises(ValueError, match=r"training\.learning_rate: 0\.001 in the checkpoint, 0\.005 now"):
        run(tmp_path, arguments(assets, out, learning_rate=5e-3, **common), "b.json")
    with pytest.raises(ValueError, match=r"data\.template: None in the checkpoint, 'reflection_text_only' now"):
        run(tmp_path, arguments(assets, out, template="reflection_text_only", **common), "c.json")
    run(tmp_path, arguments(assets, out, learning_rate=5e-3, overwrite_output_dir=True, **common), "d.json")
    saved = json.loads((out / "checkpoint-2" / "thinkrec_run_arguments.json").read_text())
    assert saved["training"]["learning_rate"] == 5e-3


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_splits_are_memory_mapped_records_with_seeded_user_subsets(tmp_path, output_format):
    from _run_fixtures import write_records

    from thinkrec.utils.subsets import seeded_subset, seeded_user_subset

    write_records(tmp_path / "records", output_format=output_format)
    data_args = run_thinkrec.DataArguments(records_dir=str(tmp_path / "records"), max_train_samples=20, max_eval_samples=10,
                                           max_test_samples=10)
    splits, metadata = run_thinkrec.load_splits(data_args, seed=3)
    frames = load_prepared(tmp_path / "records").splits
    assert metadata["output_format"] == output_format
    for name, subset in (("train", seeded_subset), ("validation", seeded_user_subset), ("test", seeded_user_subset)):
        assert splits[name].cache_files, "read through load_dataset's Arrow cache, not from pandas"
        expected = subset(frames[name], {"train": 20, "validation": 10, "test": 10}[name], 3)
        for column in ("UserID", "TargetItemID", "label", "HisItemIDs", "HisItemTitles"):
            assert splits[name][column] == [list(v) if isinstance(v, np.ndarray) else v for v in expected[column]], (name, column)
    # Evaluation subsets keep every row of the users they pick.
    users = set(splits["test"]["UserID"])
    assert sum(frames["test"]["UserID"].isin(users)) == len(splits["test"])


def test_runs_save_the_processor_with_the_model_and_every_checkpoint(stage1, assets):
    from transformers import AutoProcessor

    from data_collator import ThinkRecCollator

    output_dir, _ = stage1
    for folder in (output_dir, *output_dir.glob("checkpoint-*")):
        for name in ("processor_config.json", "processing_thinkrec.py", "tokenizer.json"):
            assert (folder / name).is_file(), folder / name
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert processor.templates[0].startswith("#Question:") and processor.reason_templates and processor.max_prompt_tokens == 512
    rows = datasets.load_dataset(str(assets["records"]), split="test").select(range(5)).to_list()
    expected = ThinkRecCollator(processor.tokenizer, template="text_only", max_prompt_tokens=512, seed=7)(rows)
    found = processor(rows, include_answers=True)
    assert all(torch.equal(found[name], expected[name]) for name in expected)


def test_records_rewritten_in_place_are_read_again_not_served_from_the_cache(assets, tmp_path):
    # datasets keys a local folder's cache by its name and file names; this folder has the same ones.
    records = tmp_path / "records"
    shutil.copytree(assets["records"], records)
    run_thinkrec.load_splits(run_thinkrec.DataArguments(records_dir=str(assets["records"])), seed=0)
    metadata = json.loads((records / "metadata.json").read_text())
    train_file = records / metadata["files"]["train"]
    pd.read_parquet(train_file).head(10).to_parquet(train_file)
    splits, _ = run_thinkrec.load_splits(run_thinkrec.DataArguments(records_dir=str(records)), seed=0)
    assert len(splits["train"]) == 10
    splits, _ = run_thinkrec.load_splits(run_thinkrec.DataArguments(records_dir=str(assets["records"])), seed=0)
    assert len(splits["train"]) == assets["metadata"]["rows"]["train"]


def test_collaborative_tables_from_other_records_stop_with_both_folders_named(assets, tmp_path):
    """Preparing data again renumbers users and items: tables of the right size from the old records
    would silently index other ones."""
    from _run_fixtures import write_records

    import train_collaborative

    write_records(tmp_path / "other", seed=5)  # same sizes, other interactions
    train_collaborative.main(["--model_type", "mf", "--records_dir", str(assets["records"]), "--output_dir",
                              str(tmp_path / "mf"), "--max_epochs", "1", "--embedding_dim", "8"])
    assert json.loads((tmp_path / "mf" / "cf_config.json").read_text())["config"]["records_fingerprint"]
    args = arguments(assets, tmp_path / "out", model_name_or_path=str(assets["backbone"]), stage="projector",
                     template="collaborative", cf_checkpoint=str(tmp_path / "mf"), records_dir=str(tmp_path / "other"), max_steps=1)
    with pytest.raises(ValueError, match=rf"trained on the records in {assets['records']} .* records_dir={tmp_path / 'other'} holds other records"):
        run(tmp_path, args)
    # The same tables on their own records train, and the model remembers which records they index.
    run(tmp_path, dict(args, records_dir=str(assets["records"])), name="ok.json")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["cf_records_dir"] == str(assets["records"]) and config["cf_records_fingerprint"]
    with pytest.raises(ValueError, match=r"collaborative tables of init_from=.* holds other records"):
        run(tmp_path, arguments(assets, tmp_path / "next", init_from=str(tmp_path / "out"), stage="projector",
                                records_dir=str(tmp_path / "other"), max_steps=1), name="next.json")
