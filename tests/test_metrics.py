"""Metrics against hand-computed values, sklearn, and a slow per-user reference."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thinkrec.evaluation.metrics import (
    CI_RESAMPLES,
    bootstrap_intervals,
    bootstrap_replicates,
    compute_metrics,
    delong_test,
    format_metrics,
    interval_fields,
    metric_names,
    paired_bootstrap,
    per_user_ranking,
    percentile_interval,
    ranking_metrics,
    user_resample_counts,
)
from thinkrec.utils.errors import InputError


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


# ------------------------------------------------------------------------------ confidence intervals


def _random_rows(seed=0, users=30, rows=240):
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(0, users, rows)
    labels = rng.integers(0, 2, rows)
    scores_a = np.round(rng.normal(size=rows) + 0.5 * labels, 1)  # ties, within and across users
    scores_b = np.round(scores_a + rng.normal(size=rows), 1)
    return user_ids, labels, scores_a, scores_b


def test_per_user_ranking_averages_to_the_reported_ranking_metrics():
    table = per_user_ranking(USERS, LABELS, SCORES, ks=(1, 3))
    assert list(table.index) == ["A", "B", "C"] and list(table["positives"]) == [2, 1, 2]
    # Ranked labels: A [1, 0, 1, 0], B [0, 0, 1], C [1, 1] (hand-computed above).
    assert list(table["hr@1"]) == [1.0, 0.0, 1.0]
    assert table.loc["B", "ndcg@3"] == pytest.approx(0.5)
    metrics = ranking_metrics(USERS, LABELS, SCORES, ks=(1, 3))
    for name in ("hr@1", "ndcg@3", "map@3"):
        assert metrics[name] == pytest.approx(table[name].mean())
    without_positive = per_user_ranking(["D", "D", "E"], [0, 0, 1], [0.3, 0.2, 0.1], ks=(1,))
    assert math.isnan(without_positive.loc["D", "hr@1"]) and without_positive.loc["E", "hr@1"] == 1.0


def test_user_resample_counts_draw_every_user_count_times_seeded():
    counts = user_resample_counts(7, resamples=50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all() and (counts >= 0).all()
    assert (counts == user_resample_counts(7, resamples=50, seed=3)).all()
    assert not (counts == user_resample_counts(7, resamples=50, seed=4)).all()


def test_each_resample_equals_the_metrics_of_the_rows_it_copies():
    """The vectorised bootstrap (row-weighted AUC, count-weighted per-user means) against building each resample's
    table by hand: every row of a drawn user copied once per draw, each copy a user of its own."""
    user_ids, labels, scores_a, scores_b = _random_rows()
    names = ["auc", "uauc", "gauc", "hr@1", "ndcg@3", "map@5"]
    replicates = bootstrap_replicates(user_ids, labels, [scores_a, scores_b], names, CI_RESAMPLES, seed=11)
    users = np.unique(user_ids)
    counts = user_resample_counts(len(users), CI_RESAMPLES, seed=11)
    for resample in range(3):
        copies = [(f"{user}#{copy}", np.flatnonzero(user_ids == user))
                  for user, count in zip(users, counts[resample]) for copy in range(count)]
        copied_users = np.concatenate([[name] * len(rows) for name, rows in copies])
        copied_rows = np.concatenate([rows for _, rows in copies])
        for index, scores in enumerate((scores_a, scores_b)):
            expected = compute_metrics(copied_users, labels[copied_rows], scores[copied_rows], ks=(1, 3, 5))
            for name in names:
                assert replicates[name][index, resample] == pytest.approx(expected[name], abs=1e-12), name


def test_bootstrap_does_not_depend_on_row_order():
    user_ids, labels, scores_a, scores_b = _random_rows()
    order = np.random.default_rng(5).permutation(len(labels))
    straight = bootstrap_replicates(user_ids, labels, [scores_a], ["auc", "uauc", "ndcg@3"], seed=2)
    shuffled = bootstrap_replicates(user_ids[order], labels[order], [scores_a[order]], ["auc", "uauc", "ndcg@3"], seed=2)
    for name in straight:
        np.testing.assert_array_equal(straight[name], shuffled[name])


def test_single_model_interval_is_the_central_95_percent_of_the_resamples():
    user_ids, labels, scores_a, _ = _random_rows()
    intervals = bootstrap_intervals(user_ids, labels, scores_a, ("auc", "uauc"), seed=1)
    metrics = compute_metrics(user_ids, labels, scores_a)
    replicates = bootstrap_replicates(user_ids, labels, [scores_a], ["auc", "uauc"], seed=1)
    for name in ("auc", "uauc"):
        assert intervals[name]["value"] == metrics[name]
        lo, hi = intervals[name]["ci95"]
        assert lo < metrics[name] < hi
        assert [lo, hi] == pytest.approx(np.percentile(replicates[name][0], [2.5, 97.5]))
        assert intervals[name]["undefined_resamples"] == 0
    fields = interval_fields(user_ids, labels, scores_a, seed=1)
    assert fields == {"auc_ci95": intervals["auc"]["ci95"], "uauc_ci95": intervals["uauc"]["ci95"],
                      "ci95_resamples": CI_RESAMPLES, "ci95_seed": 1}
    assert bootstrap_intervals(user_ids, labels, scores_a, seed=1) == intervals  # seeded: the same draws again


def test_paired_bootstrap_of_a_model_with_itself_is_exactly_zero():
    user_ids, labels, scores_a, _ = _random_rows()
    result = paired_bootstrap(user_ids, labels, scores_a, scores_a.copy(), ("auc", "uauc", "gauc", "ndcg@3", "hr@1"))
    for entry in result.values():
        assert entry["delta"] == 0.0 and entry["ci95"] == [0.0, 0.0] and entry["a"] == entry["b"]


def test_undefined_resamples_are_counted_and_left_out():
    # Two users, only one with both labels: a resample that draws the other twice has no UAUC.
    user_ids, labels, scores = ["u", "u", "v"], [1, 0, 1], [0.9, 0.1, 0.5]
    intervals = bootstrap_intervals(user_ids, labels, scores, ("uauc",))
    assert 0 < intervals["uauc"]["undefined_resamples"] < CI_RESAMPLES
    assert intervals["uauc"]["ci95"] == [1.0, 1.0]
    assert all(math.isnan(bound) for bound in percentile_interval([math.nan, math.nan]))


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_replicates([1, 1], [1, 0], [[0.2, 0.1]], ["auc"], resamples=999), "at least 1000"),
    (lambda: bootstrap_replicates([1, 1], [1, 0], [[0.2, 0.1]], ["auc"], resamples=1000.0), "an integer"),
    (lambda: bootstrap_replicates([1, 1], [1, 0], [[0.2, 0.1]], ["mrr"]), "unknown metric 'mrr'"),
    (lambda: bootstrap_replicates([1, 1], [1, 0], [[0.2, 0.1]], ["ndcg@0"]), "unknown metric 'ndcg@0'"),
    (lambda: bootstrap_replicates([], [], [[]], ["auc"]), "no rows to resample"),
    (lambda: paired_bootstrap([1, 1], [1, 0], [0.2, 0.1], [0.3, float("nan")]), "scores must be finite"),
])
def test_interval_inputs_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_resamples_and_metrics_are_input_errors():
    with pytest.raises(InputError):
        bootstrap_intervals([1, 1], [1, 0], [0.2, 0.1], resamples=10)
    with pytest.raises(InputError):
        bootstrap_intervals([1, 1], [1, 0], [0.2, 0.1], metrics=("auc@5",))


def test_delong_on_a_hand_computed_example():
    # Positives score 0.9, 0.4 and negatives 0.5, 0.1 under A; B ranks every positive first.
    # A's components: positives beat [1, 1/2] of the negatives, negatives are beaten by [1/2, 1] of the
    # positives; B's are all 1. Var(V10_A) = Var(V01_A) = 1/8 (ddof 1), B's and the covariances 0, so
    # Var(AUC_B - AUC_A) = (1/8) / 2 + (1/8) / 2 = 1/8.
    labels = [1, 1, 0, 0]
    result = delong_test(labels, [0.9, 0.4, 0.5, 0.1], [0.8, 0.7, 0.3, 0.2])
    assert result["auc_a"] == pytest.approx(0.75) and result["auc_b"] == pytest.approx(1.0)
    assert result["delta"] == pytest.approx(0.25)
    assert result["se"] == pytest.approx(math.sqrt(0.125))
    assert result["z"] == pytest.approx(0.25 / math.sqrt(0.125))
    assert result["p_value"] == pytest.approx(math.erfc(0.5))  # z = 1/sqrt(2)
    assert result["ci95"] == pytest.approx([0.25 - 1.959964 * math.sqrt(0.125), 0.25 + 1.959964 * math.sqrt(0.125)])


def _brute_force_delong_variance(labels, scores_a, scores_b):
    """DeLong's variance from its definition: psi(x, y) over every positive-negative pair."""
    labels = np.asarray(labels)
    components_10, components_01 = [], []
    for scores in (np.asarray(scores_a), np.asarray(scores_b)):
        positives, negatives = scores[labels == 1], scores[labels == 0]
        psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
        components_10.append(psi.mean(axis=1))
        components_01.append(psi.mean(axis=0))
    m, n = len(components_10[0]), len(components_01[0])
    covariance = np.cov(components_10) / m + np.cov(components_01) / n
    return covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1], [c.mean() for c in components_10]


def test_delong_matches_the_pairwise_definition_with_ties():
    _, labels, scores_a, scores_b = _random_rows(seed=3, rows=120)
    result = delong_test(labels, scores_a, scores_b)
    variance, aucs = _brute_force_delong_variance(labels, scores_a, scores_b)
    assert result["se"] ** 2 == pytest.approx(variance, rel=1e-10)
    assert [result["auc_a"], result["auc_b"]] == pytest.approx(aucs)
    assert result["auc_a"] == pytest.approx(roc_auc_score(labels, scores_a))
    z = result["delta"] / math.sqrt(variance)
    assert result["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


def test_delong_of_identical_scores_and_of_too_few_rows():
    _, labels, scores_a, _ = _random_rows(seed=4, rows=60)
    same = delong_test(labels, scores_a, scores_a)
    assert same["delta"] == 0.0 and same["se"] == 0.0 and same["p_value"] == 1.0 and same["ci95"] == [0.0, 0.0]
    few = delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.3, 0.1])  # one positive: no covariance
    assert math.isnan(few["delta"]) and math.isnan(few["p_value"])
