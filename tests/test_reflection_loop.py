"""reflection_loop.py end to end on a tiny backbone: train, reflect, retrain with reasons, generate with
the reason prompt, judge; a finished round is reused; arguments the loop owns are refused."""

import json

import pandas as pd
import pytest
from _run_fixtures import write_backbone, write_records

import reflection_loop


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_assets")
    write_records(root / "records")
    write_backbone(root / "backbone")
    train_args = {
        "records_dir": str(root / "records"), "model_name_or_path": str(root / "backbone"), "stage": "lora",
        "score_type": "yes_no_log_odds", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "max_steps": 3, "learning_rate": 1e-3, "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "seed": 3,
    }
    (root / "stage1.json").write_text(json.dumps(train_args))
    return root


def loop_args(assets, output_dir, **overrides):
    args = {"train_args": str(assets / "stage1.json"), "output_dir": str(output_dir), "rounds": 1, "judge_rows": 4,
            "max_new_tokens": 8, "source": "synthesised", "max_reason_tokens": 40}
    args.update(overrides)
    return args


def run(tmp_path, args, name="loop.json"):
    path = tmp_path / name
    path.write_text(json.dumps(args))
    return reflection_loop.main([str(path)])


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("loop")
    summary = run(tmp_path, loop_args(assets, tmp_path / "out"))
    return tmp_path, summary


def test_the_loop_trains_reflects_retrains_and_judges(finished):
    tmp_path, summary = finished
    out = tmp_path / "out"
    assert len(summary["rounds"]) == 2 and len(summary["reflections"]) == 1
    reflection = summary["reflections"][0]
    reasons = pd.read_parquet(out / "reasons-round0.parquet")
    assert len(reasons) == reflection["explained"] > 0
    assert (reasons["mode"] == "reason").all() and reasons["reason"].str.match(r"(Yes|No)\.").all()
    # Round 1 trained on the reason split it was given, round 0 on none.
    round0 = json.loads((out / "round0.json").read_text())
    round1 = json.loads((out / "round1.json").read_text())
    assert "reason_records" not in round0 and round1["reason_records"] == str(out / "reasons-round0.parquet")
    for number in (0, 1):
        predictions = pd.read_parquet(out / f"round{number}" / "test_predictions.parquet")
        assert predictions["generated"].notna().sum() == 4
    # The references come from another source than the training reasons (the bundled SmolLM2 as teacher).
    references = pd.read_parquet(out / "test_references-local.parquet")
    # A row the teacher failed (an answer cut short, say) has no reference and is not judged.
    assert 1 <= len(references) == summary["judged_rows"] <= 4 and summary["reference_source"] == "local"
    assert references["reason"].str.match(r"(Yes|No)\.").all()
    for entry in summary["rounds"]:
        assert 0 <= entry["test"]["auc"] <= 1
        assert 0 <= entry["reasons"]["verdict_agrees_with_label"] <= 1
        assert entry["reasons"]["words_mean"] >= 0
    assert json.loads((out / "loop_summary.json").read_text())["rounds"] == summary["rounds"]


def test_a_finished_round_is_reused_not_retrained(assets, finished, monkeypatch):
    tmp_path, summary = finished
    trained = []
    original = reflection_loop.run_thinkrec.main
    monkeypatch.setattr(reflection_loop.run_thinkrec, "main", lambda argv: trained.append(argv) or original(argv))
    reflected = []
    original_reflect = reflection_loop.reflect.main
    monkeypatch.setattr(reflection_loop.reflect, "main", lambda argv: reflected.append(argv) or original_reflect(argv))
    again = run(tmp_path, loop_args(assets, tmp_path / "out"), "again.json")
    assert trained == [] and reflected == []  # neither retrained nor re-scored
    assert again["reflections"] == summary["reflections"]
    assert [entry["test"] for entry in again["rounds"]] == [entry["test"] for entry in summary["rounds"]]


def test_a_round_trained_on_other_reasons_is_not_reused(assets, finished, monkeypatch):
    tmp_path, _ = finished
    out = tmp_path / "out"
    stamp = json.loads((out / "round1" / "loop_inputs.json").read_text())
    stamp["reasons_sha256"] = "0" * 64  # as if round 1 had been trained on a different reason split
    (out / "round1" / "loop_inputs.json").write_text(json.dumps(stamp))
    trained = []
    original = reflection_loop.run_thinkrec.main
    monkeypatch.setattr(reflection_loop.run_thinkrec, "main", lambda argv: trained.append(argv) or original(argv))
    run(tmp_path, loop_args(assets, tmp_path / "out"), "third.json")
    assert trained == [[str(out / "round1.json")]]  # round 0 reused, round 1 retrained


@pytest.mark.parametrize("key", ["output_dir", "reason_records", "generate_reasons_for"])
def test_train_args_may_not_set_what_the_loop_sets(assets, tmp_path, key):
    config = json.loads((assets / "stage1.json").read_text())
    config[key] = "x"
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"bad.json: '{key}' is set by the reflection loop"):
        run(tmp_path, loop_args(assets, tmp_path / "out", train_args=str(tmp_path / "bad.json")))


def test_bad_loop_arguments_stop(assets, tmp_path):
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run(tmp_path, loop_args(assets, tmp_path / "out", rounds=0))
    with pytest.raises(ValueError, match="roundz"):
        run(tmp_path, loop_args(assets, tmp_path / "out", roundz=2))
    with pytest.raises(FileNotFoundError, match="train_args: no such file"):
        run(tmp_path, loop_args(assets, tmp_path / "out", train_args=str(tmp_path / "missing.json")))
