"""Paired comparisons of two prediction files: compare_predictions.py, its row matching, the intervals
run_thinkrec.py's predict writes, and the benchmarks' difference tables."""

import importlib.util
import json
import math
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import compare_predictions
from thinkrec.evaluation.metrics import (
    CI_RESAMPLES,
    compare_against_references,
    compare_prediction_files,
    compare_prediction_frames,
    format_comparison,
    format_delta_table,
    match_predictions,
    per_user_auc,
    summarise_deltas,
)
from thinkrec.utils.arguments import run_command
from thinkrec.utils.errors import InputError


REPO_ROOT = Path(__file__).resolve().parents[1]
NO_DIFFERENCE = "no difference (interval includes 0)"


def predictions(seed=0, users=24, rows_per_user=8, separation=0.6, cf=True) -> pd.DataFrame:
    """A run_thinkrec-style test_predictions table: every user has both labels."""
    rng = np.random.default_rng(seed)
    user_ids = np.repeat(np.arange(users) + 100, rows_per_user)
    labels = np.tile(np.arange(rows_per_user) % 2, users)
    frame = pd.DataFrame({"UserID": user_ids, "TargetItemID": np.arange(len(user_ids)) * 7 % 997, "label": labels,
                          "score": 1 / (1 + np.exp(-(rng.normal(size=len(labels)) + separation * labels))),
                          "not_cold": rng.integers(0, 2, len(labels))})
    if cf:
        frame["cf_score"] = rng.normal(size=len(labels)) + 0.3 * labels
    return frame


def shuffled(frame: pd.DataFrame, seed=1) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def write(frame: pd.DataFrame, path: Path) -> str:
    frame.to_parquet(path, index=False)
    return str(path)


METRICS = ("auc", "uauc", "gauc", "ndcg@3", "hr@1", "map@3")


def test_identical_predictions_give_zero_deltas_and_a_zero_interval():
    frame = predictions()
    result = compare_prediction_frames(frame, frame.copy(), metrics=METRICS)
    assert list(result["metrics"]) == list(METRICS)
    for entry in result["metrics"].values():
        assert entry["delta"] == 0.0 and entry["ci95"] == [0.0, 0.0] and entry["verdict"] == NO_DIFFERENCE
    assert result["delong"]["delta"] == 0.0 and result["delong"]["p_value"] == 1.0 and result["delong"]["ci95"] == [0.0, 0.0]
    assert (result["rows"], result["users"], result["resamples"]) == (len(frame), 24, CI_RESAMPLES)


def test_a_model_better_on_every_user_has_an_interval_above_zero():
    stronger = predictions()
    stronger["score"] = stronger["label"] + 0.01 * np.random.default_rng(2).random(len(stronger))  # every pair in order
    weaker = stronger.copy()
    first_positive = weaker[weaker["label"] == 1].groupby("UserID").head(1).index
    weaker.loc[first_positive, "score"] = -1.0  # each user's first positive below all its negatives
    per_user = per_user_auc(weaker["UserID"], weaker["label"], weaker["score"])["auc"]
    assert (per_user == 0.75).all()  # the premise: A misorders 4 of the 16 pairs of every user
    result = compare_prediction_frames(weaker, stronger, metrics=("auc", "uauc"))
    for name in ("auc", "uauc"):
        entry = result["metrics"][name]
        assert entry["b"] == 1.0 and entry["delta"] > 0 and entry["ci95"][0] > 0 and entry["verdict"] == "B better"
    assert result["delong"]["ci95"][0] > 0 and result["delong"]["p_value"] < 0.05
    reverse = compare_prediction_frames(stronger, weaker, metrics=("auc", "uauc"), names=("LLM", "MF"))
    for entry in reverse["metrics"].values():
        assert entry["ci95"][1] < 0 and entry["verdict"] == "LLM better"


def test_rows_are_paired_by_key_not_by_position():
    frame = predictions()
    # The same predictions in another order: the same comparison, to the last bit.
    straight = compare_prediction_frames(frame, predictions(seed=5), metrics=METRICS)
    reordered = compare_prediction_frames(shuffled(frame, 3), shuffled(predictions(seed=5), 4), metrics=METRICS)
    assert reordered == straight
    same = compare_prediction_frames(frame, shuffled(frame))
    assert all(entry["delta"] == 0.0 and entry["ci95"] == [0.0, 0.0] for entry in same["metrics"].values())


def test_the_seeded_bootstrap_is_reproducible():
    a, b = predictions(seed=1), predictions(seed=2)
    first = compare_prediction_frames(a, b, seed=7)
    assert compare_prediction_frames(a, b, seed=7) == first
    other = compare_prediction_frames(a, b, seed=8)
    assert other["metrics"]["auc"]["delta"] == first["metrics"]["auc"]["delta"]
    assert other["metrics"]["auc"]["ci95"] != first["metrics"]["auc"]["ci95"]
    assert other["seed"] == 8 and first["seed"] == 7


def test_match_predictions_pairs_rows_and_columns():
    frame = predictions()
    rows = match_predictions(shuffled(frame), frame, score_column_a="cf_score")
    assert list(rows.columns) == ["UserID", "TargetItemID", "label", "score_a", "score_b"]
    expected = frame.sort_values(["UserID", "TargetItemID"], ignore_index=True)
    np.testing.assert_array_equal(rows["score_a"], expected["cf_score"])
    np.testing.assert_array_equal(rows["score_b"], expected["score"])
    np.testing.assert_array_equal(rows["label"], expected["label"])


def _missing_row(frame):
    return frame.drop(index=5)


def _duplicated_key(frame):
    frame = frame.copy()
    frame.loc[9, ["UserID", "TargetItemID"]] = frame.loc[2, ["UserID", "TargetItemID"]].to_numpy()
    return frame


def _flipped_label(frame):
    frame = frame.copy()
    frame.loc[4, "label"] = 1 - frame.loc[4, "label"]
    return frame


def _nan_score(frame):
    frame = frame.copy()
    frame.loc[6, "score"] = math.nan
    return frame


def _bad_label(frame):
    frame = frame.copy()
    frame["label"] = frame["label"].astype(np.int64)
    frame.loc[3, "label"] = 2
    return frame


@pytest.mark.parametrize("change, side, message", [
    (_missing_row, "b", r"A: row 5 \(UserID=100, TargetItemID=35\) is not in B; 1 row\(s\) of A are missing from B"),
    (_missing_row, "a", r"B: row 5 \(UserID=100, TargetItemID=35\) is not in A; 1 row\(s\) of B are missing from A"),
    (_duplicated_key, "b", r"B: row 9 repeats \(UserID=100, TargetItemID=14\) of row 2"),
    (_flipped_label, "b", r"B: row 4 \(UserID=100, TargetItemID=28\) has label 1 but row 4 of A has label 0"),
    (_nan_score, "b", r"B: row 6 \(UserID=100, TargetItemID=42\) has score=nan; scores must be finite"),
    (_bad_label, "a", r"A: row 3 \(UserID=100, TargetItemID=21\) has label 2; labels must be 0 or 1"),
    (lambda frame: frame.drop(columns="TargetItemID"), "a", r"A: missing column\(s\) \['TargetItemID'\]"),
    (lambda frame: frame.drop(columns="cf_score"), "b", None),  # B's score column is score: fine
    (lambda frame: frame.assign(UserID=frame["UserID"].astype(str)), "b", "UserID is int64 in A but .+ in B: the files come from different"),
])
def test_mismatched_tables_name_the_file_and_the_first_offending_row(change, side, message):
    frame = predictions()
    a, b = (change(frame), frame) if side == "a" else (frame, change(frame))
    if message is None:
        match_predictions(a, b)
        return
    with pytest.raises(InputError, match=message):
        match_predictions(a, b)


def test_command_prints_a_table_and_ends_with_one_json_line(tmp_path, capsys):
    a = write(predictions(seed=1), tmp_path / "a.parquet")
    b = write(shuffled(predictions(seed=1).assign(score=lambda f: f["label"] + 0.01 * f.index % 3)), tmp_path / "b.parquet")
    result = compare_predictions.main([a, b, "--metrics", "auc,uauc,ndcg@3", "--seed", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"A = {a} (score)" and lines[1] == f"B = {b} (score)"
    assert "1,000 resamples, seed 3" in lines[2]
    assert lines[3].split()[:4] == ["metric", "A", "B", "Δ"]
    table = {line.split()[0]: line for line in lines[4:-2]}
    assert set(table) == {"auc", "uauc", "ndcg@3"}
    auc = result["metrics"]["auc"]
    assert table["auc"].split()[1:4] == [f"{auc['a']:.4f}", f"{auc['b']:.4f}", f"{auc['delta']:+.4f}"]
    assert table["auc"].endswith("B better") and "auc (DeLong)" in lines[-2]
    figures = json.loads(lines[-1])
    assert figures == json.loads(json.dumps(result))
    assert figures["a"] == a and figures["score_column_a"] == "score" and figures["seed"] == 3
    assert set(figures["metrics"]["auc"]) == {"a", "b", "delta", "ci95", "undefined_resamples", "verdict"}
    # The same with flags, and with the files given by name.
    assert compare_predictions.main(["--predictions_a", a, "--predictions_b", b, "--metrics", "auc,uauc,ndcg@3", "--seed", "3"]) == result


def test_command_compares_the_cf_score_and_train_collaborative_files(tmp_path, capsys):
    llm = predictions(seed=4)
    stage2 = write(llm, tmp_path / "stage2.parquet")
    result = compare_predictions.main([stage2, stage2, "--score_column_a", "cf_score"])
    assert result["score_column_a"] == "cf_score" and result["score_column_b"] == "score"
    expected = compare_prediction_frames(llm.assign(score=llm["cf_score"]), llm)
    assert result["metrics"] == expected["metrics"]
    # train_collaborative.py's file: UserID, TargetItemID, label, score, not_cold and no cf_score.
    mf = write(shuffled(llm.drop(columns="cf_score").assign(score=llm["cf_score"])), tmp_path / "mf.parquet")
    assert compare_predictions.main([mf, stage2])["metrics"] == expected["metrics"]
    capsys.readouterr()


@pytest.mark.parametrize("arguments, message", [
    (["{dir}/missing.parquet", "{b}"], "predictions file not found: {dir}/missing.parquet"),
    (["{a}", "{b}", "--score_column", "cf_score"], "{b}: missing column(s) ['cf_score']"),
    (["{a}", "{short}"], "{a}: row 5 (UserID=100, TargetItemID=35) is not in {short}"),
    (["{a}", "{b}", "--resamples", "100"], "resamples must be an integer of at least 1000"),
    (["{a}", "{b}", "--metrics", "auc,mrr"], "unknown metric 'mrr'"),
    (["{a}", "{empty}"], "{empty}: the file is empty"),
])
def test_command_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, arguments, message):
    frame = predictions()
    files = {"dir": str(tmp_path), "a": write(frame, tmp_path / "a.parquet"),
             "b": write(frame.drop(columns="cf_score"), tmp_path / "b.parquet"),
             "short": write(_missing_row(frame), tmp_path / "short.parquet"), "empty": str(tmp_path / "empty.parquet")}
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        run_command(compare_predictions.main, [argument.format(**files) for argument in arguments])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message.format(**files) in errors[0]


def test_format_comparison_reads_undefined_figures_as_na():
    # One user with both labels: UAUC is that user's AUC in every resample; ranking metrics on a single user too.
    frame = pd.DataFrame({"UserID": [1, 1, 1, 1], "TargetItemID": [1, 2, 3, 4], "label": [1, 0, 1, 0], "score": [0.9, 0.1, 0.8, 0.2]})
    text = format_comparison(compare_prediction_frames(frame, frame.assign(score=[0.1, 0.9, 0.8, 0.2])))
    assert "auc (DeLong)" in text and "A better" in text
    single_class = frame.assign(label=1)
    text = format_comparison(compare_prediction_frames(single_class, single_class))
    assert "undefined" in text and "n/a" in text


# ------------------------------------------------------------------------------ run_thinkrec.py predict


@pytest.mark.slow  # imports run_thinkrec (torch, transformers): ~10 s on a busy 2-core machine
def test_predict_writes_intervals_and_the_paired_difference_with_the_cf_model(tmp_path, capsys):
    import datasets

    import run_thinkrec

    frame = predictions(seed=6)
    logits = np.log(frame["score"] / (1 - frame["score"])).to_numpy()
    test = datasets.Dataset.from_pandas(frame[["UserID", "TargetItemID", "label", "not_cold"]])
    output = types.SimpleNamespace(predictions={"scores": logits, "cf_scores": frame["cf_score"].to_numpy()})
    trainer = types.SimpleNamespace(prediction_fields=("scores",), predict=lambda dataset, metric_key_prefix: output,
                                    is_world_process_zero=lambda: True)
    model = types.SimpleNamespace(config=types.SimpleNamespace(cf_model_type="mf"))
    data_args = types.SimpleNamespace(generate_reasons_for=0)
    training_args = types.SimpleNamespace(output_dir=str(tmp_path), seed=5, per_device_eval_batch_size=8)
    result = run_thinkrec.predict(trainer, model, None, test, data_args, training_args)
    written = json.loads((tmp_path / "test_results.json").read_text())
    assert written == json.loads(json.dumps(result))
    for part in ("test", "cf_alone"):
        figures = written[part]
        assert figures["ci95_resamples"] == CI_RESAMPLES and figures["ci95_seed"] == 5
        for name in ("auc", "uauc"):
            lo, hi = figures[f"{name}_ci95"]
            assert lo < figures[name] < hi
    versus = written["vs_cf_alone"]["metrics"]["auc"]
    assert versus["delta"] == pytest.approx(written["test"]["auc"] - written["cf_alone"]["auc"])
    # The file it wrote gives the same comparison through compare_predictions (ranks of P(Yes) = ranks of the logits).
    again = compare_prediction_files(tmp_path / "test_predictions.parquet", tmp_path / "test_predictions.parquet", "cf_score", "score",
                                     seed=5)
    for name in ("auc", "uauc"):
        assert again["metrics"][name]["ci95"] == pytest.approx(written["vs_cf_alone"]["metrics"][name]["ci95"], abs=1e-12)
    out = capsys.readouterr().out
    assert "95% intervals (bootstrap over users, 1,000 resamples): AUC" in out and "this model - MF alone" in out


# ------------------------------------------------------------------------------ benchmarks' difference tables


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_compares_each_row_with_its_baseline_and_the_control(tmp_path):
    quality = load_benchmark("quality_ml1m")
    base = predictions(seed=7)
    folders = {"stage1_lora": base.assign(score=np.random.default_rng(8).random(len(base))),
               "stage2_projector": base, "stage2_more_lora": base.assign(score=base["label"] + 0.01 * base.index % 5),
               "stage3_experts_k2_hard": shuffled(base)}
    for folder, frame in folders.items():
        (tmp_path / folder).mkdir()
        write(frame, tmp_path / folder / quality.PREDICTIONS)  # stage3_experts_k2_soft never ran
    sources, references = quality.comparison_plan(tmp_path, [2])
    assert references == {"stage1": ["mf"], "stage2": ["mf"], "stage2_more_lora": ["stage2"],
                          "experts_k2_hard": ["stage2", "stage2_more_lora"], "experts_k2_soft": ["stage2", "stage2_more_lora"]}
    assert sources["mf"] == (tmp_path / "stage2_projector" / quality.PREDICTIONS, "cf_score")
    deltas = compare_against_references(sources, references, seed=1)
    hard = deltas["experts_k2_hard"]
    assert hard["stage2"]["metrics"]["auc"]["delta"] == 0.0 and hard["stage2"]["metrics"]["auc"]["ci95"] == [0.0, 0.0]
    assert hard["stage2_more_lora"]["metrics"]["uauc"]["verdict"] == "stage2_more_lora better"
    assert deltas["stage2"]["mf"]["metrics"]["auc"]["a"] == pytest.approx(compare_prediction_frames(
        base.assign(score=base["cf_score"]), base)["metrics"]["auc"]["a"])
    assert "predictions file not found" in deltas["experts_k2_soft"]["stage2"]["error"]
    lines = format_delta_table(deltas, {"experts_k2_hard": "stage 3, 2 clusters, hard", "stage2_more_lora": "control"}).splitlines()
    assert lines[0].startswith("differences, model - reference (95% interval, paired bootstrap over users, 1,000 resamples")
    assert lines[1].split()[:4] == ["model", "reference", "ΔAUC", "[95%]"]
    control_line = next(line for line in lines if line.startswith("stage 3, 2 clusters, hard") and "control" in line)
    assert control_line.endswith("AUC loss, UAUC loss")
    same_line = next(line for line in lines if line.startswith("stage 3, 2 clusters, hard") and "stage2 " in line)
    assert "+0.0000 [+0.0000, +0.0000]" in same_line and same_line.endswith("AUC no difference, UAUC no difference")
    assert sum("n/a: " in line for line in lines) == 2
    summary = summarise_deltas(deltas)
    json.dumps(summary, allow_nan=False)
    assert set(summary["stage2"]["mf"]) == {"auc", "uauc", "delong_p"} and "error" in summary["experts_k2_soft"]["stage2"]


def test_reasons_benchmark_compares_the_reason_rows_with_stage2_and_the_control(tmp_path):
    reasons = load_benchmark("reasons_ml1m")
    base = predictions(seed=9)
    stage2 = tmp_path / "quality" / "cpu" / "stage2_projector"
    output = tmp_path / "reasons"
    frames = {stage2: base, stage2.parent / "stage2_more_lora": base.assign(score=base["cf_score"]),
              output / "with_keywords" / "loop" / "round1": base.assign(score=base["label"] + 0.01 * base.index % 7),
              output / "without_keywords" / "loop" / "round1": shuffled(base),
              output / "with_keywords" / "loop" / "round0": base.iloc[:-8]}  # fewer rows: not comparable
    for folder, frame in frames.items():
        folder.mkdir(parents=True)
        write(frame, folder / reasons.PREDICTIONS)
    deltas, names = reasons.reason_deltas(stage2, output, True, seed=0)
    assert set(deltas) == {"stage2_with_reasons", "stage2_with_reasons_no_keywords", "stage2_on_keyword_prompts"}
    assert all(set(compared) == {"stage2", "stage2_more_lora"} for compared in deltas.values())
    assert deltas["stage2_with_reasons"]["stage2"]["metrics"]["auc"]["ci95"][0] > 0
    assert deltas["stage2_with_reasons_no_keywords"]["stage2"]["metrics"]["uauc"]["ci95"] == [0.0, 0.0]
    assert "is not in" in deltas["stage2_on_keyword_prompts"]["stage2"]["error"]
    text = format_delta_table(deltas, names)
    assert "stage 2 + reasons (keywords)" in text and "AUC gain, UAUC gain" in text
    without_control, _ = reasons.reason_deltas(stage2, output, False, seed=0)
    assert all(set(compared) == {"stage2"} for compared in without_control.values())
    json.dumps(summarise_deltas(deltas), allow_nan=False)
