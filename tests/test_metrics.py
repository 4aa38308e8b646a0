"""Metrics against hand-computed values, sklearn, and a slow per-user reference."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thinkrec.evaluation.metrics import compute_metrics, format_metrics, metric_names


# Users A, B, C. A has a tied positive/negative pair at 0.8; C has positives only.
USERS = np.array(["A", "A", "A", "A", "B", "B", "B", "C", "C"])
LABELS = np.array([1, 0, 1, 0, 1, 0, 0, 1, 1])
SCORES = np.array([0.9, 0.8, 0.8, 0.1, 0.3, 0.7, 0.5, 0.2, 0.6])
NOT_COLD = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1])


def test_hand_computed_auc_uauc_gauc():
    metrics = compute_metrics(USERS, LABELS, SCORES)
    # 5 positives x 4 negatives; pair wins 4 + 3.5 + 1 + 1 + 2 (the 0.8/0.8 tie counts 1/2).
    assert metrics["auc"] == pytest.approx(11.5 / 20)
    # Per user: A 3.5/4, B 0/2, C skipped (positives only).
    assert metrics["uauc"] == pytest.approx((0.875 + 0.0) / 2)
    assert metrics["gauc"] == pytest.approx((0.875 * 4 + 0.0 * 3) / 7)
    assert metrics["uauc_users"] == 2
    assert metrics["n_rows"] == 9 and metrics["n_users"] == 3
    assert metrics["n_positive"] == 5 and metrics["n_negative"] == 4


def test_hand_computed_ranking_with_pessimistic_ties():
    metrics = compute_metrics(USERS, LABELS, SCORES, ks=(1, 3))
    # Ranked labels: A [1, 0, 1, 0] (tie at 0.8 puts the negative first), B [0, 0, 1], C [1, 1].
    ndcg3_a = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["hr@1"] == pytest.approx(2 / 3)
    assert metrics["ndcg@1"] == pytest.approx(2 / 3)
    assert metrics["map@1"] == pytest.approx(2 / 3)
    assert metrics["hr@3"] == pytest.approx(1.0)
    assert metrics["ndcg@3"] == pytest.approx((ndcg3_a + 0.5 + 1.0) / 3)
    assert metrics["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3 + 1.0) / 3)
    assert metrics["ranking_users"] == 3


def test_users_without_positive_are_skipped_in_ranking():
    with_extra = compute_metrics(np.append(USERS, ["D", "D"]), np.append(LABELS, [0, 0]), np.append(SCORES, [0.95, 0.4]))
    without = compute_metrics(USERS, LABELS, SCORES)
    for name in ("hr@1", "ndcg@5", "map@10", "uauc", "gauc"):
        assert with_extra[name] == pytest.approx(without[name])
    assert with_extra["ranking_users"] == 3
    assert with_extra["auc"] != pytest.approx(without["auc"])  # D's rows do count in the global AUC


def test_constant_scores_give_half_auc_and_worst_ranking():
    metrics = compute_metrics(USERS, LABELS, np.zeros(len(LABELS)))
    assert metrics["auc"] == pytest.approx(0.5)
    assert metrics["uauc"] == pytest.approx(0.5)
    # Negatives first among ties: A and B start with a negative, C has positives only.
    assert metrics["hr@1"] == pytest.approx(1 / 3)


def test_warm_cold_breakdown():
    metrics = compute_metrics(USERS, LABELS, SCORES, not_cold=NOT_COLD)
    assert metrics["warm/uauc"] == pytest.approx(0.875)
    assert metrics["cold/uauc"] == pytest.approx(0.0)
    assert metrics["cold/auc"] == pytest.approx(0.0)
    # Warm positives 0.9, 0.8, 0.2, 0.6 against negatives 0.8, 0.1: wins 2 + 1.5 + 1 + 1.
    assert metrics["warm/auc"] == pytest.approx(5.5 / 8)
    assert metrics["warm/n_rows"] == 6 and metrics["cold/n_rows"] == 3
    assert metrics["auc"] == pytest.approx(11.5 / 20)


def test_empty_group_is_nan_with_zero_count():
    metrics = compute_metrics(USERS, LABELS, SCORES, not_cold=np.ones(len(LABELS), dtype=int))
    assert metrics["cold/n_rows"] == 0
    for name in ("auc", "uauc", "gauc", "ndcg@5", "hr@1", "map@3"):
        assert math.isnan(metrics[f"cold/{name}"])
    assert set(metrics) == set(metric_names()) | {f"{g}/{n}" for g in ("warm", "cold") for n in metric_names()}


def test_single_class_split_gives_nan_auc_and_counts():
    metrics = compute_metrics(USERS, np.ones(len(LABELS), dtype=int), SCORES)
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["uauc"]) and math.isnan(metrics["gauc"])
    assert metrics["n_negative"] == 0 and metrics["uauc_users"] == 0
    assert metrics["hr@1"] == pytest.approx(1.0)  # ranking is still defined


def test_per_user_metrics_on_too_few_users_warn_with_the_counts(caplog):
    with caplog.at_level("WARNING", logger="thinkrec.evaluation.metrics"):
        metrics = compute_metrics(USERS, LABELS, SCORES)
    assert metrics["uauc_users"] == 2 and metrics["ranking_users"] == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "UAUC/GAUC rest on 2 users" in warnings[0] and "HR/NDCG/MAP@k on 3 users" in warnings[0]
    caplog.clear()
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(25), 2)
    labels = np.tile([1, 0], 25)
    with caplog.at_level("WARNING", logger="thinkrec.evaluation.metrics"):
        many = compute_metrics(users, labels, rng.random(50))
    assert many["uauc_users"] == 25 and not caplog.records


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": [1, 0]}, "same length"),
        ({"labels": [1, 0, 2]}, "labels must be 0 or 1, found 2 at row 2"),
        ({"scores": [0.1, float("nan"), 0.3]}, "scores must be finite, found nan at row 1"),
        ({"not_cold": [1, 0, 5]}, "not_cold must be 0 or 1"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    arguments = {"user_ids": [1, 1, 2], "labels": [1, 0, 1], "scores": [0.1, 0.2, 0.3], **kwargs}
    with pytest.raises(ValueError, match=message):
        compute_metrics(**arguments)


def _reference_ranking(labels_by_score_desc, k):
    relevance = np.asarray(labels_by_score_desc[:k], dtype=float)
    positives = int(np.sum(labels_by_score_desc))
    ideal = min(k, positives)
    dcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(relevance))
    idcg = sum(1 / math.log2(i + 2) for i in range(ideal))
    precision_sum = sum(relevance[: i + 1].sum() / (i + 1) for i in range(len(relevance)) if relevance[i])
    return float(relevance.any()), dcg / idcg, precision_sum / ideal


def test_matches_sklearn_and_slow_reference_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 2000)
    labels = rng.integers(0, 2, 2000)
    scores = np.round(rng.normal(size=2000) + 0.5 * labels, 1)  # rounding creates many ties
    metrics = compute_metrics(users, labels, scores)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    per_user_auc, per_user_rank = [], {k: [] for k in (1, 5, 10)}
    for user in np.unique(users):
        mask = users == user
        if 0 < labels[mask].sum() < mask.sum():
            per_user_auc.append(roc_auc_score(labels[mask], scores[mask]))
        if labels[mask].sum() > 0:
            order = np.lexsort((labels[mask], -scores[mask]))  # score desc, then negatives first
            for k in per_user_rank:
                per_user_rank[k].append(_reference_ranking(labels[mask][order], k))
    assert metrics["uauc"] == pytest.approx(np.mean(per_user_auc))
    for k, values in per_user_rank.items():
        hr, ndcg, average_precision = np.mean(values, axis=0)
        assert metrics[f"hr@{k}"] == pytest.approx(hr)
        assert metrics[f"ndcg@{k}"] == pytest.approx(ndcg)
        assert metrics[f"map@{k}"] == pytest.approx(average_precision)


def test_format_metrics_shows_groups():
    table = format_metrics(compute_metrics(USERS, LABELS, SCORES, not_cold=NOT_COLD), title="test")
    lines = table.splitlines()
    assert lines[0] == "test"
    assert lines[1].split() == ["metric", "all", "warm", "cold"]
    auc_line = next(line for line in lines if line.startswith("auc "))
    assert auc_line.split()[1:] == ["0.5750", "0.6875", "0.0000"]
    n_rows_line = next(line for line in lines if line.startswith("n_rows"))
    assert n_rows_line.split()[1:] == ["9", "6", "3"]
