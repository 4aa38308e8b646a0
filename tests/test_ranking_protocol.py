"""The ranking protocol (docs/ranking.md): pool metrics against hand-computed values (ties pessimistic, a
pool of one, k larger than the pool), candidate rows built from a records folder, bad pools refused with
the pool named, and one tiny run_thinkrec.py predict with eval_protocol 'ranking' whose reported figures
are recomputed from its per-candidate file, on one rank and on two."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from _run_fixtures import REPO_ROOT, run, write_backbone, write_mf, write_records
from safetensors.torch import load_file

import compare_predictions
import run_thinkrec
from data_collator import build_processor
from modeling_thinkrec import add_slot_tokens
from thinkrec.data.records import load_prepared, read_metadata
from thinkrec.evaluation.ranking import (
    POOL_COLUMN,
    candidate_ranks,
    candidate_rows,
    compare_pool_scores,
    describe_pools,
    pool_intervals,
    pool_metrics,
    resolve_ks,
    target_ranks,
)
from thinkrec.evaluation.metrics import user_resample_counts
from thinkrec.utils.errors import InputError, MissingInputError


POOL_SIZE = 5  # num_candidates 4 + the target


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking_assets")
    metadata = write_records(root / "records", num_candidates=POOL_SIZE - 1)
    write_records(root / "records_without_pools")
    write_backbone(root / "backbone")
    write_mf(root / "mf", metadata["num_users"], metadata["num_items"])
    return {"root": root, "records": root / "records", "plain": root / "records_without_pools", "backbone": root / "backbone",
            "mf": root / "mf", "prepared": load_prepared(root / "records")}


def run_arguments(assets, output_dir, **overrides):
    """Predict only, with the projector stage: the model holds the MF tables, so its forward returns the CF scores."""
    args = {"records_dir": str(assets["records"]), "output_dir": str(output_dir), "model_name_or_path": str(assets["backbone"]),
            "cf_checkpoint": str(assets["mf"]), "stage": "projector", "do_train": False, "do_predict": True,
            "eval_protocol": "ranking", "ranking_ks": [1, 3, 5], "per_device_eval_batch_size": 16, "report_to": "none",
            "seed": 3}
    args.update(overrides)
    return args


def assert_same_intervals(found: dict, expected: dict):
    """Two {name: number or [lo, hi]} dicts equal to 1e-12 (pytest.approx does not nest)."""
    assert list(found) == list(expected)
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


def flat(pools_scores):
    """(pool_ids, labels, scores) of pools given as lists of scores, the target's first."""
    pool_ids = np.concatenate([[pool] * len(scores) for pool, scores in enumerate(pools_scores)])
    labels = np.concatenate([[1] + [0] * (len(scores) - 1) for scores in pools_scores])
    return pool_ids, labels, np.concatenate(pools_scores).astype(np.float64)


# ------------------------------------------------------------------------------------------- metrics


def test_pool_metrics_equal_hand_computed_values_with_ties_pessimistic():
    # Target ranks: 1; 3 (0.9 above, the tie at 0.4 above it too); 5 (every other candidate above).
    pool_ids, labels, scores = flat([[0.9, 0.1, 0.5, 0.2, 0.3], [0.4, 0.9, 0.4, 0.1, 0.2], [0.0, 1.0, 1.0, 1.0, 1.0]])
    pools, ranks, sizes = target_ranks(pool_ids, labels, scores)
    assert pools.tolist() == [0, 1, 2] and ranks.tolist() == [1, 3, 5] and sizes.tolist() == [5, 5, 5]
    metrics = pool_metrics(pool_ids, labels, scores, ks=(1, 3, 5))
    expected = {"hr@1": 1 / 3, "hr@3": 2 / 3, "hr@5": 1.0,
                "ndcg@1": 1 / 3, "ndcg@3": (1 + 1 / math.log2(4)) / 3, "ndcg@5": (1 + 1 / math.log2(4) + 1 / math.log2(6)) / 3,
                "mrr": (1 + 1 / 3 + 1 / 5) / 3, "n_pools": 3}
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert candidate_ranks(pool_ids, scores)[5:10].tolist() == [3, 1, 3, 5, 4]  # tied rows share the worse rank
    # The row order does not matter.
    order = np.random.default_rng(0).permutation(len(scores))
    assert pool_metrics(pool_ids[order], labels[order], scores[order], ks=(1, 3, 5)) == pytest.approx(expected, abs=1e-12)


def test_a_constant_scorer_ranks_every_target_last():
    pool_ids, labels, scores = flat([[0.5] * 4, [2.0] * 4])
    metrics = pool_metrics(pool_ids, labels, scores, ks=(1, 4))
    assert target_ranks(pool_ids, labels, scores)[1].tolist() == [4, 4]
    assert (metrics["hr@1"], metrics["hr@4"], metrics["mrr"]) == (0.0, 1.0, 0.25)
    assert metrics["ndcg@4"] == pytest.approx(1 / math.log2(5))


def test_hr_and_ndcg_agree_with_the_target_ranks_on_many_tied_pools():
    """HR/NDCG come from metrics.per_user_ranking, MRR from target_ranks: both break ties the same way."""
    rng = np.random.default_rng(1)
    pool_ids, labels, scores = flat(list(rng.integers(0, 3, size=(60, 7))))  # three score values: ties everywhere
    _, ranks, _ = target_ranks(pool_ids, labels, scores)
    metrics = pool_metrics(pool_ids, labels, scores, ks=(1, 3, 7))
    for k in (1, 3, 7):
        assert metrics[f"hr@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert metrics[f"ndcg@{k}"] == pytest.approx(np.mean((ranks <= k) / np.log2(ranks + 1)))
    assert metrics["mrr"] == pytest.approx(np.mean(1 / ranks))


def test_a_pool_of_one_and_k_larger_than_the_pool():
    pool_ids, labels, scores = flat([[0.3], [-1.0]])
    assert pool_metrics(pool_ids, labels, scores, ks=(1,)) == {"hr@1": 1.0, "ndcg@1": 1.0, "mrr": 1.0, "n_pools": 2}
    with pytest.raises(InputError, match=r"k = \[2\] larger than pool 0, which holds 1 candidates"):
        pool_metrics(pool_ids, labels, scores, ks=(1, 2))
    with pytest.raises(InputError, match=r"ranking_ks \[10, 20\] larger than the pools' 5 candidates.*num_candidates >= 19"):
        resolve_ks([1, 10, 20], pool_size=5)
    assert resolve_ks(None, pool_size=5) == (1, 5)  # the default cut-offs that fit
    assert resolve_ks(None, pool_size=100) == (1, 5, 10, 20)
    assert resolve_ks([5, 1], pool_size=5) == (5, 1)


def test_a_pool_without_exactly_one_positive_is_refused():
    with pytest.raises(ValueError, match="pool 1 has 0 positive rows"):
        target_ranks([0, 0, 1, 1], [1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="pool 7 has 2 positive rows"):
        target_ranks([7, 7], [1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"scores must be finite, found nan at row 1 \(pool 0\)"):
        target_ranks([0, 0], [1, 0], [0.1, float("nan")])


# ---------------------------------------------------------------------------------------------- rows


def test_candidate_rows_copy_the_positive_row_and_take_each_candidates_title_from_the_item_table(assets):
    prepared = assets["prepared"]
    pools, test, items = prepared.candidates, prepared.splits["test"], prepared.items
    rows = candidate_rows(pools, test, items)
    assert len(rows) == len(pools) * POOL_SIZE == int(test["label"].sum()) * POOL_SIZE
    assert "not_cold" not in rows.columns  # it describes the target only
    titles = dict(zip(items["ItemID"], items["title"]))
    for pool_id, pool in pools.iterrows():
        group = rows[rows[POOL_COLUMN] == pool_id]
        assert group["TargetItemID"].tolist() == list(pool["CandidateItemIDs"])
        assert group["TargetItemTitle"].tolist() == [titles[item] for item in pool["CandidateItemIDs"]]
        assert group["label"].tolist() == [1] + [0] * (POOL_SIZE - 1)
        (position,) = np.flatnonzero((test["UserID"] == pool["UserID"]) & (test["TargetItemID"] == pool["TargetItemID"])
                                     & (test["label"] == 1))
        positive = test.iloc[position]
        for name in ("UserID", "HisItemIDs", "HisItemTitles", "HisItemLabels", "mode", "reason", "timestamp"):
            assert all(np.array_equal(value, positive[name]) for value in group[name]), name
        assert group["TargetItemTitle"].iloc[0] == positive["TargetItemTitle"]
    assert describe_pools(rows) == {"n_pools": len(pools), "n_users": pools["UserID"].nunique(), "pool_size": POOL_SIZE,
                                    "pools_without_history": 0}


def test_a_target_row_renders_the_prompt_of_its_test_row_and_no_history_renders_as_in_the_test_rows(assets):
    """A user with no history is not refused: its rows show the template's empty-history text, as the test
    rows (the CTR path) do, and describe_pools counts such pools."""
    from transformers import AutoTokenizer

    prepared = assets["prepared"]
    test = prepared.splits["test"].copy()
    first = int(np.flatnonzero(test["label"].to_numpy() == 1)[0])
    test.at[first, "HisItemIDs"], test.at[first, "HisItemTitles"], test.at[first, "HisItemLabels"] = [], [], []
    rows = candidate_rows(prepared.candidates, test, prepared.items)
    assert describe_pools(rows)["pools_without_history"] == 1
    tokenizer = AutoTokenizer.from_pretrained(assets["backbone"])
    add_slot_tokens(tokenizer, "<|user_slot|>", "<|item_slot|>")
    processor = build_processor(tokenizer, template="collaborative", max_prompt_tokens=None)
    targets = rows[rows["label"] == 1].drop(columns=POOL_COLUMN).to_dict("records")
    positives = test[test["label"] == 1].to_dict("records")
    assert processor.encode(targets)["prompt_ids"] == processor.encode(positives)["prompt_ids"]
    text, _, _ = processor.render_prompt(targets[0], processor.templates[0], 0)  # pool 0 is the first positive row's
    assert f": {processor.empty_history_text}." in text


def test_pools_of_one_user_and_item_are_paired_with_its_positive_rows_in_order():
    """Two positive test rows of the same user and item (a re-interaction): the j-th pool gets the j-th row's history."""
    test = pd.DataFrame({"UserID": [1, 1, 1], "HisItemIDs": [[4], [5], [4, 5]], "HisItemTitles": [["d"], ["e"], ["d", "e"]],
                         "HisItemLabels": [[1], [1], [1, 1]], "TargetItemID": [2, 3, 2], "TargetItemTitle": ["b", "c", "b"],
                         "label": [1, 0, 1], "reason": "", "mode": "rec", "not_cold": 1, "timestamp": [10, 20, 30]})
    items = pd.DataFrame({"ItemID": [1, 2, 3, 4, 5], "title": ["a", "b", "c", "d", "e"]})
    pools = pd.DataFrame({"UserID": [1, 1], "TargetItemID": [2, 2], "CandidateItemIDs": [[2, 1], [2, 3]]})
    rows = candidate_rows(pools, test, items)
    assert rows["timestamp"].tolist() == [10, 10, 30, 30]
    assert rows["TargetItemTitle"].tolist() == ["b", "a", "b", "c"]


# ----------------------------------------------------------------------------------------- bad pools


def toy_test_rows(users, targets, labels) -> pd.DataFrame:
    n = len(users)
    return pd.DataFrame({"UserID": users, "HisItemIDs": [[4]] * n, "HisItemTitles": [["d"]] * n, "HisItemLabels": [[1]] * n,
                         "TargetItemID": targets, "TargetItemTitle": "", "label": labels, "reason": "", "mode": "rec",
                         "not_cold": 1, "timestamp": np.arange(n) * 10})


def _bad_pool(case: str):
    """(pools, test, items, message) of one kind of bad pool, built on a two-pool toy folder."""
    test = toy_test_rows([1, 2, 2], [2, 3, 1], [1, 1, 0])
    items = pd.DataFrame({"ItemID": [1, 2, 3, 4, 5, 6], "title": ["a", "b", "c", "d", "e", "f"]})
    pools = pd.DataFrame({"UserID": [1, 2], "TargetItemID": [2, 3], "CandidateItemIDs": [[2, 1, 6], [3, 1, 6]]})
    if case == "item-not-in-the-item-table":
        pools.at[1, "CandidateItemIDs"] = [3, 99, 6]
        return pools, test, items, r"candidates: pool 1 \(UserID 2, TargetItemID 3\): candidate item 99 is not in the item table"
    if case == "duplicate-candidate":
        pools.at[1, "CandidateItemIDs"] = [3, 6, 6]
        return pools, test, items, r"pool 1 \(UserID 2, TargetItemID 3\) lists candidate item 6 twice"
    if case == "target-not-first":
        pools.at[0, "CandidateItemIDs"] = [1, 2, 6]
        return pools, test, items, r"pool 0 \(UserID 1, TargetItemID 2\): the target is its candidate 1, not its first"
    if case == "target-not-in-the-pool":
        pools.at[0, "CandidateItemIDs"] = [1, 5, 6]
        return pools, test, items, r"pool 0 \(UserID 1, TargetItemID 2\): the target is not in its CandidateItemIDs"
    if case == "pools-of-two-sizes":
        pools.at[1, "CandidateItemIDs"] = [3, 1]
        return pools, test, items, r"pool 1 \(UserID 2, TargetItemID 3\) has 2 candidates but pool 0 has 3"
    if case == "no-positive-test-row":
        pools = pd.DataFrame({"UserID": [1, 2], "TargetItemID": [2, 4], "CandidateItemIDs": [[2, 1, 6], [4, 1, 6]]})
        return pools, test, items, r"pool 1 \(UserID 2, TargetItemID 4\): no positive row of this user and item in the test split;"
    if case == "target-only-a-negative-test-row":
        pools = pd.DataFrame({"UserID": [1, 2], "TargetItemID": [2, 1], "CandidateItemIDs": [[2, 1, 6], [1, 2, 6]]})
        return pools, test, items, r"pool 1 \(UserID 2, TargetItemID 1\): no positive row .* \(it is there with label 0 only\)"
    if case == "two-positive-rows-one-pool":
        test = toy_test_rows([1, 2, 2, 1], [2, 3, 1, 2], [1, 1, 0, 1])
        return pools, test, items, r"pool 0 \(UserID 1, TargetItemID 2\): the test split has 2 positive rows .* but the pools 1;"
    if case == "candidates-not-a-list":
        pools.at[0, "CandidateItemIDs"] = "2,1,6"
        return pools, test, items, r"pool 0 \(UserID 1, TargetItemID 2\): CandidateItemIDs must be a list of integer item ids"
    if case == "missing-column":
        return pools.drop(columns="CandidateItemIDs"), test, items, r"candidates: missing column\(s\) \['CandidateItemIDs'\]"
    raise AssertionError(case)


BAD_POOLS = ["item-not-in-the-item-table", "duplicate-candidate", "target-not-first", "target-not-in-the-pool",
             "pools-of-two-sizes", "no-positive-test-row", "target-only-a-negative-test-row", "two-positive-rows-one-pool",
             "candidates-not-a-list", "missing-column"]


@pytest.mark.parametrize("case", BAD_POOLS)
def test_a_bad_pool_is_refused_naming_the_pool_user_and_item(case):
    pools, test, items, message = _bad_pool(case)
    with pytest.raises(InputError, match=message):
        candidate_rows(pools, test, items)


def test_the_toy_pools_the_bad_cases_start_from_pass():
    pools, test, items, _ = _bad_pool("missing-column")
    rows = candidate_rows(pools.assign(CandidateItemIDs=[[2, 1, 6], [3, 1, 6]]), test, items)
    assert rows["label"].tolist() == [1, 0, 0, 1, 0, 0] and rows["TargetItemTitle"].tolist() == ["b", "a", "f", "c", "a", "f"]


def test_a_run_with_bad_pools_stops_before_the_model_loads_and_leaves_no_folder(assets, tmp_path, monkeypatch):
    records = tmp_path / "records"
    shutil.copytree(assets["records"], records)
    path = records / read_metadata(records)["files"]["candidates"]
    pools = pd.read_parquet(path)
    pools.at[2, "CandidateItemIDs"] = np.r_[pools.at[2, "CandidateItemIDs"][:-1], pools.at[2, "CandidateItemIDs"][1]]
    pools.to_parquet(path, index=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_thinkrec, "build_model", no_model)
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: pool 2 \(UserID \d+, TargetItemID \d+\) lists candidate item \d+ twice"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", records_dir=str(records)))
    with pytest.raises(MissingInputError, match=r"eval_protocol 'ranking': .*records_without_pools: the records have no candidate "
                                                r"pools .*num_candidates"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", records_dir=str(assets["plain"])))
    with pytest.raises(InputError, match=r"ranking_ks \[10\] larger than the pools' 5 candidates"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", ranking_ks=[1, 10]))
    assert not (tmp_path / "out").exists()
    # A test subset whose users have no pool says so instead of ranking nothing.
    test = assets["prepared"].splits["test"]
    without_pools = test[~test["UserID"].isin(test["UserID"][test["label"] == 1])].head(3)
    data_args = run_thinkrec.DataArguments(records_dir=str(assets["records"]), eval_protocol="ranking", max_test_samples=3)
    with pytest.raises(InputError, match=r"none of its \d+ pools belongs to the \d+ users of the test subset \(max_test_samples=3\)"):
        run_thinkrec.load_ranking_pools(data_args, datasets.Dataset.from_pandas(without_pools, preserve_index=False))


def test_ranking_arguments_that_would_do_nothing_are_refused(assets, tmp_path):
    with pytest.raises(InputError, match="eval_protocol 'ranking' ranks the test pools when the run predicts: set do_predict"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", do_predict=False, do_eval=True))
    with pytest.raises(InputError, match="ranking_ks=.* is read by eval_protocol 'ranking' only"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", eval_protocol="ctr"))
    with pytest.raises(InputError, match="eval_protocol must be one of"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", eval_protocol="listwise"))
    with pytest.raises(InputError, match="ranking_ks must be distinct integers >= 1"):
        run(tmp_path, run_arguments(assets, tmp_path / "out", ranking_ks=[1, 1]))


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ranking_run(assets, tmp_path_factory):
    """One predict-only run with eval_protocol 'ranking' on a test subset: (output folder, results, arguments)."""
    tmp_path = tmp_path_factory.mktemp("ranking_run")
    args = run_arguments(assets, tmp_path / "out", max_test_samples=20)
    return tmp_path / "out", run(tmp_path, args), args


def test_a_ranking_run_reports_what_its_per_candidate_scores_give_next_to_the_cf_model(assets, ranking_run):
    """The reported HR / NDCG / MRR equal those recomputed from ranking_predictions.parquet, the CF column is
    the MF tables' own dot product, and each pool's target is scored exactly as its row of the CTR test set."""
    output, results, _ = ranking_run
    saved = json.loads((output / "test_results.json").read_text())
    ranking = saved["ranking"]
    assert ranking == results["ranking"]
    assert "test" in saved and "cf_alone" in saved  # the CTR figures stay
    test_predictions = pd.read_parquet(output / "test_predictions.parquet")
    predictions = pd.read_parquet(output / "ranking_predictions.parquet")
    # The pools of the users in the test subset, all of them.
    assert ranking["n_pools"] == int(test_predictions["label"].sum()) == predictions[POOL_COLUMN].nunique()
    assert ranking["pools_in_file"] == len(assets["prepared"].candidates) > ranking["n_pools"]
    assert (ranking["pool_size"], ranking["ks"], ranking["ties"].split(":")[0]) == (POOL_SIZE, [1, 3, 5], "pessimistic")
    assert len(predictions) == ranking["n_pools"] * POOL_SIZE
    assert set(predictions["UserID"]) == set(test_predictions["UserID"][test_predictions["label"] == 1])

    def recomputed(score_column):
        frame = predictions.assign(above=lambda f: f.groupby(POOL_COLUMN)[score_column].transform(
            lambda s: (s >= s.iloc[0]).sum()))  # rows come target first: rank = candidates scoring at least as high
        ranks = frame[frame["label"] == 1]["above"].to_numpy()
        return {**{f"hr@{k}": np.mean(ranks <= k) for k in (1, 3, 5)},
                **{f"ndcg@{k}": np.mean((ranks <= k) / np.log2(ranks + 1)) for k in (1, 3, 5)},
                "mrr": np.mean(1 / ranks), "n_pools": len(ranks)}, ranks

    expected, ranks = recomputed("logit")
    assert {name: ranking[name] for name in expected} == pytest.approx(expected, abs=1e-12)
    assert predictions["rank"][predictions["label"] == 1].tolist() == ranks.tolist()
    assert ranking["cf_alone"]["model"] == "mf"
    cf_expected, _ = recomputed("cf_score")
    assert {name: ranking["cf_alone"][name] for name in cf_expected} == pytest.approx(cf_expected, abs=1e-12)
    mf = load_file(assets["mf"] / "model.safetensors")
    users, items = (torch.from_numpy(predictions[name].to_numpy().copy()) for name in ("UserID", "TargetItemID"))
    dot = (mf["user_table"][users] * mf["item_table"][items]).sum(-1)
    np.testing.assert_allclose(predictions["cf_score"], dot.numpy(), rtol=1e-5, atol=1e-6)
    # Scored through the same path as the test rows: a target's score is its CTR row's score.
    targets = predictions[predictions["label"] == 1].merge(test_predictions[test_predictions["label"] == 1],
                                                           on=["UserID", "TargetItemID"], suffixes=("", "_ctr"))
    assert len(targets) == ranking["n_pools"]
    np.testing.assert_allclose(targets["score"], targets["score_ctr"], atol=1e-5)
    # Intervals: the bootstrap over users of both models, and this model - CF with the paired interval, as
    # compare_predictions.py recomputes them from the file.
    users, pool_ids = predictions["UserID"].to_numpy(), predictions[POOL_COLUMN].to_numpy()
    labels = predictions["label"].to_numpy()
    seed = ranking["ci95_seed"]
    assert_same_intervals(ranking["ci95"], pool_intervals(pool_ids, users, labels, predictions["logit"].to_numpy(),
                                                          ks=(1, 3, 5), seed=seed))
    assert set(ranking["ci95"]) == {"hr@1", "hr@3", "hr@5", "ndcg@1", "ndcg@3", "ndcg@5", "mrr"}
    for name, (lo, hi) in ranking["ci95"].items():
        assert lo <= ranking[name] <= hi
    versus = ranking["vs_cf_alone"]
    assert (versus["pools"], versus["users"]) == (ranking["n_pools"], predictions["UserID"].nunique())
    for name, entry in versus["metrics"].items():
        assert entry["delta"] == pytest.approx(ranking[name] - ranking["cf_alone"][name], abs=1e-12)
    rerun = compare_predictions.main([str(output / "ranking_predictions.parquet"), str(output / "ranking_predictions.parquet"),
                                      "--score_column_a", "cf_score", "--score_column_b", "logit", "--seed", str(seed),
                                      "--metrics", ",".join(versus["metrics"])])
    assert_same_intervals({name: entry["ci95"] for name, entry in rerun["metrics"].items()},
                          {name: entry["ci95"] for name, entry in versus["metrics"].items()})


def test_two_cpu_ranks_rank_the_pools_like_one(ranking_run, tmp_path):
    """Every rank scores its share of the candidate rows through trainer.predict; rank 0 writes what one rank writes."""
    output, results, args = ranking_run
    path = tmp_path / "two_ranks.json"
    path.write_text(json.dumps(dict(args, output_dir=str(tmp_path / "out"))))
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO_ROOT, "accelerate_configs", "cpu_two_ranks.yaml"), os.path.join(REPO_ROOT, "run_thinkrec.py"), str(path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    one, two = (pd.read_parquet(folder / "ranking_predictions.parquet") for folder in (output, tmp_path / "out"))
    assert two[[POOL_COLUMN, "UserID", "TargetItemID", "label"]].equals(one[[POOL_COLUMN, "UserID", "TargetItemID", "label"]])
    np.testing.assert_allclose(two["logit"], one["logit"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two["cf_score"], one["cf_score"], rtol=1e-5, atol=1e-6)
    ranking = json.loads((tmp_path / "out" / "test_results.json").read_text())["ranking"]
    assert ranking.keys() == results["ranking"].keys() and ranking["n_pools"] == results["ranking"]["n_pools"]
    for name in ("hr@1", "hr@3", "ndcg@3", "mrr"):
        assert ranking[name] == pytest.approx(results["ranking"][name]), name
        assert ranking["cf_alone"][name] == pytest.approx(results["ranking"]["cf_alone"][name]), name


# --------------------------------------------------------------------------------------------- intervals


def users_with_pools(pools_per_user, size=5, seed=0):
    """Flat rows of pools (target first), the pools of user u numbered consecutively."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(pools_per_user)), pools_per_user)
    pool_ids = np.repeat(np.arange(len(users)), size)
    labels = np.tile(np.r_[1, np.zeros(size - 1, dtype=np.int64)], len(users))
    return pool_ids, np.repeat(users, size), labels, rng.normal(size=len(labels))


def test_pool_intervals_resample_users_with_all_their_pools():
    """Each resample averages the pools of the drawn users, a user drawn twice counting twice: equal to the
    metric recomputed on the copied pools, for the draws user_resample_counts gives."""
    pool_ids, users, labels, scores = users_with_pools([5, 1, 3, 1, 2])
    compared = compare_pool_scores(pool_ids, users, labels, scores, scores + 100 * labels, ks=(1, 3), resamples=1000, seed=7)
    counts = user_resample_counts(5, 1000, 7)
    per_pool = pool_metrics(pool_ids, labels, scores, (1, 3))
    _, ranks, _ = target_ranks(pool_ids, labels, scores)
    pool_users = users[::5]
    by_hand = np.array([np.average(1 / ranks, weights=draw[pool_users]) for draw in counts])
    assert compared["metrics"]["mrr"]["a"] == pytest.approx(per_pool["mrr"])
    assert compared["metrics"]["mrr"]["ci95_a"] == pytest.approx(list(np.percentile(by_hand, [2.5, 97.5])))
    # B ranks every target first: its HR@1 is 1 in every resample, so the delta's interval is 1 - A's.
    assert compared["metrics"]["hr@1"]["b"] == 1.0
    assert compared["metrics"]["hr@1"]["ci95"] == pytest.approx([1 - hi for hi in compared["metrics"]["hr@1"]["ci95_a"][::-1]])
    assert compared["metrics"]["hr@1"]["verdict"] == "B better"
    assert (compared["pools"], compared["users"]) == (12, 5)


def test_the_same_scores_compare_to_a_zero_interval_and_the_seed_fixes_the_interval():
    pool_ids, users, labels, scores = users_with_pools([3, 2, 4, 1, 2, 5, 1, 3, 2, 2], seed=3)
    same = compare_pool_scores(pool_ids, users, labels, scores, scores.copy(), ks=(1,), resamples=1000, seed=1)
    assert all(entry["ci95"] == [0.0, 0.0] and entry["verdict"].startswith("no difference") for entry in same["metrics"].values())
    again = pool_intervals(pool_ids, users, labels, scores, ks=(1,), resamples=1000, seed=1)
    assert again == {name: entry["ci95_a"] for name, entry in same["metrics"].items()}
    assert again["mrr"] != pool_intervals(pool_ids, users, labels, scores, ks=(1,), resamples=1000, seed=2)["mrr"]


def test_bad_interval_inputs_are_refused():
    pool_ids, users, labels, scores = users_with_pools([2, 2])
    with pytest.raises(InputError, match="unknown ranking metric 'auc'"):
        compare_pool_scores(pool_ids, users, labels, scores, scores, metrics=["auc"])
    with pytest.raises(InputError, match="k = 9 larger than pool"):
        compare_pool_scores(pool_ids, users, labels, scores, scores, ks=(9,))
    with pytest.raises(InputError, match="at least 1000"):
        pool_intervals(pool_ids, users, labels, scores, ks=(1,), resamples=100)
    mixed = users.copy()
    mixed[1] = 1  # pool 0's second row names another user
    with pytest.raises(ValueError, match="pool 0 has rows of more than one user"):
        pool_intervals(pool_ids, mixed, labels, scores, ks=(1,))


def test_compare_predictions_pairs_ranking_files_by_pool(tmp_path):
    """A candidate can sit in two pools of one user: ranking files pair rows by (PoolID, TargetItemID), which
    the (UserID, TargetItemID) pairing of test predictions would refuse as a repeated key."""
    pool_ids, users, labels, scores = users_with_pools([2, 3], size=4)
    items = np.tile([10, 11, 12, 13], len(np.unique(pool_ids)))  # the same items in every pool of a user
    frame = pd.DataFrame({POOL_COLUMN: pool_ids, "UserID": users, "TargetItemID": items, "label": labels, "logit": scores,
                          "cf_score": -scores})
    frame.sample(frac=1, random_state=0).to_parquet(tmp_path / "a.parquet")
    frame.to_parquet(tmp_path / "b.parquet")
    result = compare_predictions.main([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "--score_column_a", "cf_score",
                                       "--score_column_b", "logit"])
    expected = compare_pool_scores(pool_ids, users, labels, -scores, scores, ks=(1,))
    assert list(result["metrics"]) == list(expected["metrics"])
    for name, entry in expected["metrics"].items():
        assert result["metrics"][name]["verdict"] == entry["verdict"]
        assert_same_intervals({key: result["metrics"][name][key] for key in ("a", "b", "ci95", "ci95_a")},
                              {key: entry[key] for key in ("a", "b", "ci95", "ci95_a")})
    assert list(result["metrics"]) == ["hr@1", "ndcg@1", "mrr"]  # the default cut-offs that fit pools of 4
    frame.drop(columns=POOL_COLUMN).to_parquet(tmp_path / "ctr.parquet")
    with pytest.raises(InputError, match="is a ranking predictions file .* but .* is a test predictions file"):
        compare_predictions.main([str(tmp_path / "a.parquet"), str(tmp_path / "ctr.parquet")])
    moved = frame.copy()
    moved.loc[0, "UserID"] = 1
    moved.to_parquet(tmp_path / "moved.parquet")
    with pytest.raises(InputError, match=r"row 0 \(PoolID=0, TargetItemID=10\) has UserID 1 but row \d+ of .* has UserID 0"):
        compare_predictions.main([str(tmp_path / "a.parquet"), str(tmp_path / "moved.parquet"), "--score_column", "logit"])
    with pytest.raises(InputError, match="unknown ranking metric 'uauc'"):
        compare_predictions.main([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), "--metrics", "uauc",
                                  "--score_column", "logit"])
