"""Click-through and per-user ranking metrics shared by every evaluation in the project.

One entry point, :func:`compute_metrics`, returns a flat ``dict[str, float]``::

    auc, uauc, gauc, hr@k, ndcg@k, map@k          (k in ``ks``)
    n_rows, n_users, n_positive, n_negative, uauc_users, ranking_users
    warm/<name>, cold/<name>                       (the same on not_cold == 1 / == 0 rows)

``uauc_users`` / ``ranking_users`` count the users the per-user metrics rest on; under
``MIN_USERS_PER_USER_METRICS`` of them (all rows) a warning is logged.

Conventions (all documented where they are computed):

- AUC is the Mann-Whitney statistic with tied scores counted as one half, i.e. the same value as
  ``sklearn.metrics.roc_auc_score``. A group with a single class has no AUC: the value is NaN and
  ``n_positive`` / ``n_negative`` say why. Metrics never raise on a single-class or empty group,
  because the cold part of a small split is often exactly that; callers that need both classes
  (training, model selection) check it themselves.
- Empty group (e.g. no cold rows): every metric is NaN and ``n_rows`` is 0.
- Ranking ties are broken pessimistically: among rows with the same score, negatives are ranked
  before positives. A constant scorer therefore gets the worst possible HR/NDCG/MAP instead of
  whatever the row order happens to give (candidate files list the positive first).

Everything is vectorised: rows are grouped by user through one sort, and per-user sums are
``np.bincount`` / pandas ``groupby`` reductions.

95% intervals (the last section): :func:`bootstrap_intervals` for one model and :func:`compare_scores`
(:func:`paired_bootstrap` and :func:`delong_test`) for two models on the same rows, from a bootstrap over
users; :func:`match_predictions` pairs two prediction files' rows by (UserID, TargetItemID).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pandas as pd

from thinkrec.data.readers import read_table_file
from thinkrec.utils.errors import InputError
from thinkrec.utils.files import strict_json


logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 3, 5, 10)
GROUPS = ("warm", "cold")
# Below this many users a per-user mean moves by whole points with one user: report it, but say so.
MIN_USERS_PER_USER_METRICS = 20


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, found shape {array.shape}")
    return array


def _validate(user_ids, labels, scores, not_cold):
    user_ids = _as_1d(user_ids, "user_ids")
    labels = _as_1d(labels, "labels")
    scores = _as_1d(scores, "scores").astype(np.float64)
    lengths = {"user_ids": len(user_ids), "labels": len(labels), "scores": len(scores)}
    if not_cold is not None:
        not_cold = _as_1d(not_cold, "not_cold")
        lengths["not_cold"] = len(not_cold)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, found {lengths}")
    bad_labels = ~np.isin(labels, (0, 1))
    if bad_labels.any():
        row = int(np.flatnonzero(bad_labels)[0])
        raise ValueError(f"labels must be 0 or 1, found {labels[row].item()!r} at row {row}")
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores must be finite, found {scores[row].item()!r} at row {row}")
    if not_cold is not None:
        bad_flags = ~np.isin(not_cold, (0, 1))
        if bad_flags.any():
            row = int(np.flatnonzero(bad_flags)[0])
            raise ValueError(f"not_cold must be 0 or 1, found {not_cold[row].item()!r} at row {row}")
        not_cold = not_cold.astype(bool)
    return user_ids, labels.astype(np.int64), scores, not_cold


def _midranks(values) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (the Mann-Whitney midranks)."""
    return pd.Series(values).rank(method="average").to_numpy()


def roc_auc(labels, scores) -> float:
    """AUC over all rows (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    if n_positive == 0 or n_negative == 0:
        return math.nan
    rank_sum = _midranks(scores)[labels == 1].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def per_user_auc(user_ids, labels, scores) -> pd.DataFrame:
    """Per-user AUC table indexed by user: columns ``auc`` (NaN for single-class users), ``rows``.

    Uses average ranks within each user, so ties count one half as in :func:`roc_auc`.
    """
    frame = pd.DataFrame({"user": user_ids, "label": labels, "score": scores})
    frame["rank"] = frame.groupby("user", sort=False)["score"].rank(method="average")
    grouped = frame.groupby("user", sort=True)
    rows = grouped.size()
    n_positive = grouped["label"].sum()
    n_negative = rows - n_positive
    positive_rank_sum = frame["rank"].where(frame["label"] == 1, 0.0).groupby(frame["user"]).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (positive_rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    auc = auc.where((n_positive > 0) & (n_negative > 0))
    return pd.DataFrame({"auc": auc.astype(np.float64), "rows": rows})


def user_auc_metrics(user_ids, labels, scores) -> dict[str, float]:
    """UAUC and GAUC.

    UAUC: unweighted mean of per-user AUC over users that have both a positive and a negative row
    in the given rows (CoLLM/ThinkRec definition); users with a single class are skipped.
    GAUC: the same per-user AUCs weighted by each user's row count (RecBole's definition), over the
    same users. ``uauc_users`` counts the users used. NaN when no user has both labels.
    """
    table = per_user_auc(user_ids, labels, scores).dropna(subset=["auc"])
    if table.empty:
        return {"uauc": math.nan, "gauc": math.nan, "uauc_users": 0.0}
    return {
        "uauc": float(table["auc"].mean()),
        "gauc": float(np.average(table["auc"], weights=table["rows"])),
        "uauc_users": float(len(table)),
    }


def per_user_ranking(user_ids, labels, scores, ks: Sequence[int] = DEFAULT_KS) -> pd.DataFrame:
    """Per-user HR@k, NDCG@k and MAP@k (definitions in :func:`ranking_metrics`), indexed by user (sorted).

    Columns ``positives`` (the user's positive rows), then ``hr@k``, ``ndcg@k``, ``map@k`` for k in ``ks``;
    NaN for users without a positive row.
    """
    frame = pd.DataFrame({"user": user_ids, "label": labels, "score": scores})
    # Sort by user, then score descending, then label ascending (negatives first among ties).
    frame = frame.sort_values(["user", "score", "label"], ascending=[True, False, True], kind="stable")
    user_codes, users = pd.factorize(frame["user"], sort=False)
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    label = frame["label"].to_numpy(dtype=np.float64)
    rank = frame.groupby("user", sort=False).cumcount().to_numpy() + 1  # 1-based within user
    hits_so_far = frame.groupby("user", sort=False)["label"].cumsum().to_numpy(dtype=np.float64)
    n_positive = np.bincount(user_codes, weights=label, minlength=n_users)
    has_positive = n_positive > 0
    columns: dict[str, np.ndarray] = {"positives": n_positive}
    discount = 1.0 / np.log2(rank + 1.0)
    for k in ks:
        in_top_k = rank <= k
        hits = np.bincount(user_codes, weights=label * in_top_k, minlength=n_users)
        dcg = np.bincount(user_codes, weights=label * discount * in_top_k, minlength=n_users)
        ideal_count = np.minimum(n_positive, k).astype(np.int64)
        ideal_dcg_by_count = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
        ideal_dcg = ideal_dcg_by_count[ideal_count]
        precision_sum = np.bincount(
            user_codes, weights=label * in_top_k * hits_so_far / rank, minlength=n_users
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            columns[f"hr@{k}"] = np.where(has_positive, (hits > 0).astype(np.float64), math.nan)
            columns[f"ndcg@{k}"] = np.where(has_positive, dcg / ideal_dcg, math.nan)
            columns[f"map@{k}"] = np.where(has_positive, precision_sum / ideal_count, math.nan)
    return pd.DataFrame(columns, index=pd.Index(users, name="user"))


def ranking_metrics(user_ids, labels, scores, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, NDCG@k and MAP@k from re-ranking each user's own rows by score (descending).

    Averaged over users with at least one positive row (``ranking_users``); users without a
    positive are skipped. Ties: negatives before positives (pessimistic). With rel_i = label at
    rank i (1-based) and P = the user's number of positives:

    - HR@k   = 1 if any of the top k rows is positive, else 0;
    - NDCG@k = sum_{i<=k} rel_i / log2(i+1)  divided by  sum_{i<=min(k,P)} 1 / log2(i+1);
    - MAP@k  = sum_{i<=k} rel_i * precision@i  divided by  min(k, P).
    """
    table = per_user_ranking(user_ids, labels, scores, ks)
    has_positive = table["positives"].to_numpy() > 0
    results: dict[str, float] = {"ranking_users": float(has_positive.sum())}
    for name in table.columns[1:]:
        results[name] = float(table[name].to_numpy()[has_positive].mean()) if has_positive.any() else math.nan
    return results


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names of the metrics in one group, in table order (counts last)."""
    names = ["auc", "uauc", "gauc"]
    for prefix in ("hr", "ndcg", "map"):
        names += [f"{prefix}@{k}" for k in ks]
    return names + ["n_rows", "n_users", "n_positive", "n_negative", "uauc_users", "ranking_users"]


def _group_metrics(user_ids, labels, scores, ks) -> dict[str, float]:
    n_rows = len(labels)
    n_positive = int(labels.sum())
    counts = {
        "n_rows": float(n_rows),
        "n_users": float(len(np.unique(user_ids))),
        "n_positive": float(n_positive),
        "n_negative": float(n_rows - n_positive),
    }
    if n_rows == 0:
        empty = {name: math.nan for name in metric_names(ks)}
        empty.update(counts, uauc_users=0.0, ranking_users=0.0)
        return empty
    results = {"auc": roc_auc(labels, scores)}
    results.update(user_auc_metrics(user_ids, labels, scores))
    results.update(ranking_metrics(user_ids, labels, scores, ks))
    results.update(counts)
    return {name: results[name] for name in metric_names(ks)}


def compute_metrics(user_ids, labels, scores, not_cold=None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """All metrics on all rows, and on warm (``not_cold == 1``) and cold rows when ``not_cold`` is given.

    Returns a flat dict: ``auc``, ``uauc``, ``gauc``, ``hr@k``, ``ndcg@k``, ``map@k``, the counts
    (``n_rows``, ``n_users``, ``n_positive``, ``n_negative``, ``uauc_users``, ``ranking_users``), and
    the same names prefixed ``warm/`` and ``cold/``. Single-class or empty groups give NaN (see the
    module docstring); the counts say which case it is.
    """
    user_ids, labels, scores, not_cold = _validate(user_ids, labels, scores, not_cold)
    results = _group_metrics(user_ids, labels, scores, ks)
    _warn_if_few_users(results)
    if not_cold is not None:
        for group, mask in (("warm", not_cold), ("cold", ~not_cold)):
            group_results = _group_metrics(user_ids[mask], labels[mask], scores[mask], ks)
            results.update({f"{group}/{name}": value for name, value in group_results.items()})
    return results


def _warn_if_few_users(results: dict[str, float]) -> None:
    """Log a warning when UAUC/GAUC or the ranking metrics rest on too few users to mean anything."""
    uauc_users, ranking_users = int(results["uauc_users"]), int(results["ranking_users"])
    if min(uauc_users, ranking_users) >= MIN_USERS_PER_USER_METRICS:
        return
    logger.warning(
        "per-user metrics on few users: UAUC/GAUC rest on %d users (with both labels) and HR/NDCG/MAP@k on %d users "
        "(with a positive) of %d rows; under %d users they are noise. Evaluate on more rows or whole users.",
        uauc_users, ranking_users, int(results["n_rows"]), MIN_USERS_PER_USER_METRICS,
    )


def format_metrics(metrics: dict[str, float], title: str | None = None) -> str:
    """A readable table: one row per metric, columns all / warm / cold (when present)."""
    groups = [""] + [f"{group}/" for group in GROUPS if f"{group}/n_rows" in metrics]
    names = [name for name in metrics if "/" not in name]
    header = ["metric", "all"] + [group.rstrip("/") for group in groups[1:]]
    lines = [] if title is None else [title]
    lines.append(f"{header[0]:<14}" + "".join(f"{column:>10}" for column in header[1:]))
    for name in names:
        cells = []
        for group in groups:
            value = metrics.get(group + name, math.nan)
            is_count = name.startswith("n_") or name.endswith("_users")
            cells.append(f"{int(value):>10d}" if is_count and not math.isnan(value) else f"{value:>10.4f}")
        lines.append(f"{name:<14}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ confidence intervals
#
# Rows of one user are not independent (one user's taste moves all of them), so intervals come from a
# bootstrap over users: a resample draws as many users as there are, with replacement, keeps every row
# of each drawn user (a user drawn twice counts twice) and recomputes the metric. A paired comparison
# recomputes both models on the same resamples, and the interval is the 2.5th-97.5th percentile of the
# difference. A resample is a vector of per-user draw counts, so no table is ever copied: per-user metrics
# (UAUC, GAUC, HR/NDCG/MAP@k) are computed once per user and averaged with the counts as weights, and the
# AUC over rows is the Mann-Whitney statistic with every row weighted by its user's count.

CI_RESAMPLES = 1000  # default, and the fewest resamples accepted: fewer make the 2.5% tails a handful of draws
CI_LEVEL = 0.95
_Z_CI = 1.959963984540054  # the standard normal's 97.5% quantile
PREDICTION_KEYS = ("UserID", "TargetItemID")
INTERVAL_METRICS = "auc, uauc, gauc, hr@k, ndcg@k, map@k"
_CHUNK_ELEMENTS = 1 << 21  # rows x resamples held at once by the row-weighted AUC


def parse_interval_metric(name: str) -> tuple[str, Optional[int]]:
    """``"ndcg@5"`` -> ``("ndcg", 5)``, ``"auc"`` -> ``("auc", None)``; an unknown name is an `InputError`."""
    base, at, k = name.strip().lower().partition("@")
    if base in ("auc", "uauc", "gauc") and not at:
        return base, None
    if base in ("hr", "ndcg", "map") and k.isdigit() and int(k) > 0:
        return base, int(k)
    raise InputError(f"unknown metric {name!r}: expected one of {INTERVAL_METRICS} (k a positive integer).")


def _metric_label(name: str) -> str:
    base, k = parse_interval_metric(name)
    return base if k is None else f"{base}@{k}"


def user_resample_counts(n_users: int, resamples: int = CI_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_users) draw counts: row r says how often each user is drawn in resample r, which draws
    `n_users` users with replacement (``np.random.default_rng(seed)``; each row sums to `n_users`)."""
    draws = np.random.default_rng(seed).integers(0, n_users, size=(resamples, n_users))
    flat = (draws + np.arange(resamples)[:, None] * n_users).ravel()
    return np.bincount(flat, minlength=resamples * n_users).reshape(resamples, n_users)


def _weighted_auc(codes: np.ndarray, labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC over rows for each resample in `counts`, each row weighted by its user's count: the weighted
    Mann-Whitney statistic (ties one half), equal to :func:`roc_auc` on the rows the resample copies."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    tie_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    row_codes, positive = codes[order], labels[order] == 1
    values = np.empty(len(counts))
    step = max(1, _CHUNK_ELEMENTS // max(1, len(order)))
    for begin in range(0, len(counts), step):
        weights = counts[begin:begin + step][:, row_codes].astype(np.float64)
        positives = np.add.reduceat(np.where(positive, weights, 0.0), tie_starts, axis=1)
        negatives = np.add.reduceat(np.where(positive, 0.0, weights), tie_starts, axis=1)
        below = np.cumsum(negatives, axis=1) - negatives  # negative weight strictly below each tie group
        pairs = positives.sum(axis=1) * negatives.sum(axis=1)
        wins = (positives * (below + 0.5 * negatives)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values[begin:begin + step] = np.where(pairs > 0, wins / pairs, math.nan)
    return values


def _weighted_user_mean(counts: np.ndarray, values: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean of the per-user `values` (NaN = user not counted) in each resample, users weighted by their draw
    count (times `weights`, e.g. row counts for GAUC)."""
    defined = ~np.isnan(values)
    weight = defined.astype(np.float64) * (1.0 if weights is None else np.asarray(weights, dtype=np.float64))
    total = counts @ weight
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (counts @ (np.where(defined, values, 0.0) * weight)) / total, math.nan)


def _check_resamples(resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < CI_RESAMPLES:
        raise InputError(f"resamples must be an integer of at least {CI_RESAMPLES}, got {resamples!r}: fewer leave the "
                         "interval's 2.5% tails to a handful of draws.")


def bootstrap_replicates(user_ids, labels, score_sets: Sequence, metrics: Sequence[str] = ("auc", "uauc"),
                         resamples: int = CI_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Each metric of each score set on the same user resamples: ``{metric: array (len(score_sets), resamples)}``.

    Resample r draws users as ``user_resample_counts(n_users, resamples, seed)[r]`` over the users in sorted
    order, so the result does not depend on the row order. NaN where a resample leaves a metric undefined
    (e.g. no drawn user with both labels).
    """
    _check_resamples(resamples)
    names = [_metric_label(name) for name in metrics]
    if len(score_sets) == 0:
        raise ValueError("score_sets: give at least one array of scores.")
    checked = [_validate(user_ids, labels, scores, None) for scores in score_sets]
    user_ids, labels = checked[0][:2]
    if len(labels) == 0:
        raise InputError("no rows to resample: the intervals need at least one row.")
    users, codes = np.unique(user_ids, return_inverse=True)
    counts = user_resample_counts(len(users), resamples, seed).astype(np.float64)
    ks = sorted({k for name in names for _, k in [parse_interval_metric(name)] if k is not None})
    results = {name: np.empty((len(checked), resamples)) for name in names}
    for index, (_, _, scores, _) in enumerate(checked):
        user_auc = per_user_auc(user_ids, labels, scores).reindex(users) if {"uauc", "gauc"} & set(names) else None
        ranking = per_user_ranking(user_ids, labels, scores, ks).reindex(users) if ks else None
        for name in names:
            if name == "auc":
                results[name][index] = _weighted_auc(codes, labels, scores, counts)
            elif name == "uauc":
                results[name][index] = _weighted_user_mean(counts, user_auc["auc"].to_numpy())
            elif name == "gauc":
                results[name][index] = _weighted_user_mean(counts, user_auc["auc"].to_numpy(), user_auc["rows"].to_numpy())
            else:
                results[name][index] = _weighted_user_mean(counts, ranking[name].to_numpy())
    return results


def _point_values(user_ids, labels, scores, names: Sequence[str]) -> dict[str, float]:
    """The metrics on the rows as given, by the same functions as :func:`compute_metrics`."""
    values = {"auc": roc_auc(labels, scores)}
    values.update(user_auc_metrics(user_ids, labels, scores))
    ks = sorted({k for name in names for _, k in [parse_interval_metric(name)] if k is not None})
    if ks:
        values.update(ranking_metrics(user_ids, labels, scores, ks))
    return {name: values[name] for name in names}


def percentile_interval(replicates: np.ndarray) -> list[float]:
    """The central 95% of the defined (non-NaN) replicates, ``[lo, hi]``; NaNs when none is defined."""
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return [math.nan, math.nan]
    tail = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_intervals(user_ids, labels, scores, metrics: Sequence[str] = ("auc", "uauc"), resamples: int = CI_RESAMPLES,
                        seed: int = 0) -> dict[str, dict]:
    """One model's metrics with a 95% interval from the bootstrap over users:
    ``{metric: {"value", "ci95": [lo, hi], "undefined_resamples"}}``."""
    names = [_metric_label(name) for name in metrics]
    replicates = bootstrap_replicates(user_ids, labels, [scores], names, resamples, seed)
    user_ids, labels, scores, _ = _validate(user_ids, labels, scores, None)
    points = _point_values(user_ids, labels, scores, names)
    return {name: {"value": points[name], "ci95": percentile_interval(replicates[name][0]),
                   "undefined_resamples": int(np.isnan(replicates[name][0]).sum())} for name in names}


def interval_fields(user_ids, labels, scores, resamples: int = CI_RESAMPLES, seed: int = 0) -> dict:
    """What a results file carries next to the metrics: ``auc_ci95`` and ``uauc_ci95`` (``[lo, hi]``, the
    bootstrap over users of :func:`bootstrap_intervals`), ``ci95_resamples`` and ``ci95_seed``."""
    intervals = bootstrap_intervals(user_ids, labels, scores, ("auc", "uauc"), resamples, seed)
    return {"auc_ci95": intervals["auc"]["ci95"], "uauc_ci95": intervals["uauc"]["ci95"], "ci95_resamples": int(resamples),
            "ci95_seed": int(seed)}


def paired_bootstrap(user_ids, labels, scores_a, scores_b, metrics: Sequence[str] = ("auc", "uauc"),
                     resamples: int = CI_RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """Two models on the same rows: ``{metric: {"a", "b", "delta", "ci95", "undefined_resamples"}}`` with
    delta = B - A on the rows as given and its 95% interval from the paired bootstrap over users (both
    models recomputed on each resample, percentiles of the difference)."""
    names = [_metric_label(name) for name in metrics]
    replicates = bootstrap_replicates(user_ids, labels, [scores_a, scores_b], names, resamples, seed)
    user_ids, labels, scores_a, _ = _validate(user_ids, labels, scores_a, None)
    scores_b = _validate(user_ids, labels, scores_b, None)[2]
    points_a, points_b = _point_values(user_ids, labels, scores_a, names), _point_values(user_ids, labels, scores_b, names)
    results = {}
    for name in names:
        differences = replicates[name][1] - replicates[name][0]
        results[name] = {"a": points_a[name], "b": points_b[name], "delta": points_b[name] - points_a[name],
                         "ci95": percentile_interval(differences), "undefined_resamples": int(np.isnan(differences).sum())}
    return results


def delong_test(labels, scores_a, scores_b) -> dict[str, float]:
    """DeLong's test for the difference of two correlated AUCs on the same rows (DeLong, DeLong and
    Clarke-Pearson 1988), computed with midranks (Sun and Xu 2014).

    With m positives and n negatives, a model's structural components are, for each positive, the share
    of negatives it beats (ties one half), V10, and for each negative the share of positives that beat
    it, V01; AUC is the mean of either. The covariance of the two AUCs is S10 / m + S01 / n, S10 and S01
    the 2 x 2 sample covariances of the components. Returns ``auc_a``, ``auc_b``, ``delta`` (B - A),
    ``se``, ``ci95`` (delta +- 1.96 se), ``z`` and the two-sided ``p_value``. It treats rows as independent,
    so it is narrower than the bootstrap over users when one user's rows move together. NaN (and a NaN
    interval) with fewer than two positives or two negatives.
    """
    labels = _as_1d(labels, "labels").astype(np.int64)
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    undefined = {"auc_a": math.nan, "auc_b": math.nan, "delta": math.nan, "se": math.nan, "ci95": [math.nan, math.nan],
                 "z": math.nan, "p_value": math.nan}
    if m < 2 or n < 2:
        return undefined
    components_10, components_01, aucs = [], [], []
    for scores in (scores_a, scores_b):
        scores = _validate(np.zeros(len(labels)), labels, scores, None)[2]  # the rows' users play no part here
        overall = _midranks(scores)
        within_positive, within_negative = _midranks(scores[positive]), _midranks(scores[~positive])
        components_10.append((overall[positive] - within_positive) / n)
        components_01.append(1.0 - (overall[~positive] - within_negative) / m)
        aucs.append(float(components_10[-1].mean()))
    covariance = np.cov(np.vstack(components_10)) / m + np.cov(np.vstack(components_01)) / n
    variance = max(float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]), 0.0)
    delta, se = aucs[1] - aucs[0], math.sqrt(variance)
    if se == 0:
        z = 0.0 if delta == 0 else math.copysign(math.inf, delta)
    else:
        z = delta / se
    return {"auc_a": aucs[0], "auc_b": aucs[1], "delta": delta, "se": se, "ci95": [delta - _Z_CI * se, delta + _Z_CI * se],
            "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def interval_sign(ci95: Sequence[float]) -> Optional[int]:
    """1 when an interval lies above 0, -1 below, 0 when it includes 0, None when it is undefined (NaN)."""
    lo, hi = ci95
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def interval_verdict(ci95: Sequence[float], name_a: str = "A", name_b: str = "B") -> str:
    """What an interval of B - A says: B better (above 0), A better (below 0), or no difference."""
    return {1: f"{name_b} better", -1: f"{name_a} better", 0: "no difference (interval includes 0)",
            None: "undefined"}[interval_sign(ci95)]


def compare_scores(user_ids, labels, scores_a, scores_b, metrics: Sequence[str] = ("auc", "uauc"),
                   resamples: int = CI_RESAMPLES, seed: int = 0, names: tuple[str, str] = ("A", "B")) -> dict:
    """A paired comparison of two models' scores on the same rows: every metric's values, delta = B - A, its 95%
    interval from the paired bootstrap over users and a verdict; with ``auc``, DeLong's test too. Counts of
    rows, users, resamples and the seed are part of the result, which is plain JSON (NaN aside)."""
    results = paired_bootstrap(user_ids, labels, scores_a, scores_b, metrics, resamples, seed)
    for entry in results.values():
        entry["verdict"] = interval_verdict(entry["ci95"], *names)
    comparison = {"rows": int(len(labels)), "users": int(len(np.unique(np.asarray(user_ids)))), "resamples": int(resamples),
                  "seed": int(seed), "level": CI_LEVEL, "metrics": results}
    if "auc" in results:
        delong = delong_test(labels, scores_a, scores_b)
        delong["verdict"] = interval_verdict(delong["ci95"], *names)
        comparison["delong"] = delong
    return comparison


def match_predictions(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str = "A", name_b: str = "B",
                      score_column_a: str = "score", score_column_b: str = "score",
                      keys: Sequence[str] = PREDICTION_KEYS) -> pd.DataFrame:
    """Two prediction tables' rows paired by `keys` (default (UserID, TargetItemID); a ranking file's rows by
    (PoolID, TargetItemID)): columns `keys`, UserID, label, score_a, score_b, sorted by the keys (the files'
    row order does not matter).

    An `InputError` names the file (`name_a` / `name_b`) and the first offending row (0-based, in file
    order) when a column is missing, a label is not 0/1, a score is not a finite number, a key repeats,
    a row of one file is missing from the other, or the two files' labels (or users, when UserID is not a
    key) differ."""
    keys = list(keys)
    carried = [] if "UserID" in keys else ["UserID"]
    checked = []
    for frame, name, score_column in ((frame_a, name_a, score_column_a), (frame_b, name_b, score_column_b)):
        missing = [column for column in (*keys, *carried, "label", score_column) if column not in frame.columns]
        if missing:
            raise InputError(f"{name}: missing column(s) {missing}; found {list(frame.columns)}.")
        table = pd.DataFrame({**{key: frame[key].to_numpy() for key in (*keys, *carried)},
                              "label": frame["label"].to_numpy(), "score": frame[score_column].to_numpy(), "row": np.arange(len(frame))})
        bad_label = ~table["label"].isin((0, 1)).to_numpy()
        if bad_label.any():
            position = int(np.flatnonzero(bad_label)[0])
            raise InputError(f"{name}: row {position} ({_key_text(table, position, keys)}) has label "
                             f"{_value(table, 'label', position)!r}; labels must be 0 or 1.")
        score = pd.to_numeric(table["score"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(score).all():
            position = int(np.flatnonzero(~np.isfinite(score))[0])
            raise InputError(f"{name}: row {position} ({_key_text(table, position, keys)}) has {score_column}="
                             f"{_value(table, 'score', position)!r}; scores must be finite numbers.")
        table["score"] = score
        repeated = table.duplicated(keys, keep="first").to_numpy()
        if repeated.any():
            position = int(np.flatnonzero(repeated)[0])
            same_key = np.logical_and.reduce([(table[key] == table[key].iloc[position]).to_numpy() for key in keys])
            raise InputError(f"{name}: row {position} repeats ({_key_text(table, position, keys)}) of row "
                             f"{int(np.flatnonzero(same_key)[0])}; each ({', '.join(keys)}) must appear once to pair the two "
                             "files' rows.")
        checked.append(table)
    table_a, table_b = checked
    for key in (*keys, *carried):
        kinds = [pd.api.types.is_numeric_dtype(table[key]) for table in checked]
        if kinds[0] != kinds[1]:
            raise InputError(f"{key} is {table_a[key].dtype} in {name_a} but {table_b[key].dtype} in {name_b}: "
                             "the files come from different records.")
    merged = table_a.merge(table_b, on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    for side, name, other, row_column in (("left_only", name_a, name_b, "row_a"), ("right_only", name_b, name_a, "row_b")):
        only = merged[(merged["_merge"] == side).to_numpy()].sort_values(row_column, ignore_index=True)
        if len(only):
            raise InputError(f"{name}: row {int(only[row_column].iloc[0])} ({_key_text(only, 0, keys)}) is not in {other}; "
                             f"{len(only)} row(s) of {name} are missing from {other}. Compare predictions of the same test rows.")
    for column in ("label", *carried):
        differ = merged[(merged[f"{column}_a"] != merged[f"{column}_b"]).to_numpy()].sort_values("row_a", ignore_index=True)
        if len(differ):
            raise InputError(f"{name_b}: row {int(differ['row_b'].iloc[0])} ({_key_text(differ, 0, keys)}) has {column} "
                             f"{_value(differ, column + '_b', 0)!r} but row {int(differ['row_a'].iloc[0])} of {name_a} has "
                             f"{column} {_value(differ, column + '_a', 0)!r}; the files come from different records.")
    merged = merged.sort_values(keys, kind="stable", ignore_index=True)
    return pd.DataFrame({**{key: merged[key] for key in keys},
                         **{column: merged[f"{column}_a"] for column in carried},
                         "label": merged["label_a"].astype(np.int64), "score_a": merged["score_a"], "score_b": merged["score_b"]})


def _value(table: pd.DataFrame, column: str, position: int):
    """The cell at `position` of `column` as the Python value it holds (messages read 7, not np.int64(7) or 7.0)."""
    value = table[column].iloc[position]
    return value.item() if isinstance(value, np.generic) else value


def _key_text(table: pd.DataFrame, position: int, keys: Sequence[str] = PREDICTION_KEYS) -> str:
    return ", ".join(f"{key}={_value(table, key, position)!r}" for key in keys)


def compare_prediction_frames(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str = "A", name_b: str = "B",
                              score_column_a: str = "score", score_column_b: str = "score",
                              metrics: Sequence[str] = ("auc", "uauc"), resamples: int = CI_RESAMPLES, seed: int = 0,
                              names: tuple[str, str] = ("A", "B")) -> dict:
    """:func:`compare_scores` on two prediction tables paired by :func:`match_predictions`."""
    rows = match_predictions(frame_a, frame_b, name_a, name_b, score_column_a, score_column_b)
    return compare_scores(rows["UserID"].to_numpy(), rows["label"].to_numpy(), rows["score_a"].to_numpy(),
                          rows["score_b"].to_numpy(), metrics, resamples, seed, names)


def compare_prediction_files(path_a, path_b, score_column_a: str = "score", score_column_b: str = "score",
                             metrics: Sequence[str] = ("auc", "uauc"), resamples: int = CI_RESAMPLES, seed: int = 0,
                             names: tuple[str, str] = ("A", "B")) -> dict:
    """:func:`compare_prediction_frames` on two prediction files (Parquet or JSON lines, e.g. the
    ``test_predictions.parquet`` of run_thinkrec.py or train_collaborative.py); a file that is missing or
    unreadable is an `InputError` naming it."""
    frames = [read_table_file(path, what="predictions file") for path in (path_a, path_b)]
    return compare_prediction_frames(*frames, str(path_a), str(path_b), score_column_a, score_column_b, metrics, resamples,
                                     seed, names)


def compare_against_references(sources: dict, references: dict, metrics: Sequence[str] = ("auc", "uauc"),
                               resamples: int = CI_RESAMPLES, seed: int = 0) -> dict[str, dict[str, dict]]:
    """Each model against each of its references, paired on the same test rows (a benchmark's deltas).

    `sources` maps a model's key to ``(predictions file, score column)``, `references` a model's key to the
    keys it is compared with. Returns ``{model: {reference: comparison}}``, each comparison a
    :func:`compare_scores` result of model - reference, or ``{"error": message}`` when the two cannot be
    compared (a file missing, rows that differ): one run's problem is reported, not raised.
    """
    results: dict[str, dict[str, dict]] = {}
    for model, model_references in references.items():
        for reference in model_references:
            (path_a, column_a), (path_b, column_b) = sources[reference], sources[model]
            try:
                comparison = compare_prediction_files(path_a, path_b, column_a, column_b, metrics, resamples, seed,
                                                      names=(reference, model))
            except InputError as error:
                comparison = {"error": str(error)}
            results.setdefault(model, {})[reference] = comparison
    return results


def comparison_summary(comparison: dict) -> dict:
    """The figures of a :func:`compare_scores` result a benchmark's JSON line keeps: for each metric its delta,
    ``ci95`` and verdict, and DeLong's ``delong_p`` when AUC was compared (an ``error`` entry as it is)."""
    if "error" in comparison:
        return {"error": comparison["error"]}
    summary = {name: {"delta": entry["delta"], "ci95": entry["ci95"], "verdict": entry["verdict"]}
               for name, entry in comparison["metrics"].items()}
    if "delong" in comparison:
        summary["delong_p"] = comparison["delong"]["p_value"]
    return summary


def summarise_deltas(deltas: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """:func:`comparison_summary` of every comparison of :func:`compare_against_references`, for a JSON line
    (strict JSON: an undefined figure is None)."""
    return strict_json({model: {reference: comparison_summary(comparison) for reference, comparison in compared.items()}
                        for model, compared in deltas.items()})


def format_delta_table(deltas: dict[str, dict[str, dict]], names: Optional[dict[str, str]] = None,
                       metrics: Sequence[str] = ("auc", "uauc")) -> str:
    """The differences of :func:`compare_against_references`, one line per model and reference: each metric's
    delta = model - reference with its 95% interval, DeLong's p for AUC, and the reading: "gain" / "loss" where
    the interval excludes 0, "no difference" where it includes it; a comparison that could not be made prints
    its error. `names` gives the printed name of each key (default: the key)."""
    names = names or {}
    labels = [_metric_label(name) for name in metrics]
    resamples = next((comparison["resamples"] for compared in deltas.values() for comparison in compared.values()
                      if "resamples" in comparison), CI_RESAMPLES)
    lines = [f"differences, model - reference (95% interval, paired bootstrap over users, {resamples:,} resamples; DeLong p for AUC):",
             f"{'model':<34}{'reference':<30}" + "".join(f"{'Δ' + name.upper() + ' [95%]':<28}" for name in labels)
             + f"{'DeLong p':>9}  reading"]
    readings = {1: "gain", -1: "loss", 0: "no difference", None: "n/a"}
    for model, compared in deltas.items():
        for reference, comparison in compared.items():
            start = f"{names.get(model, model):<34}{names.get(reference, reference):<30}"
            if "error" in comparison:
                lines.append(f"{start}n/a: {comparison['error']}")
                continue
            entries = [comparison["metrics"].get(name) for name in labels]
            cells = "".join(f"{'n/a' if entry is None else format_interval(entry['delta'], entry['ci95']):<28}" for entry in entries)
            p_value = comparison.get("delong", {}).get("p_value")
            reading = ", ".join(f"{name.upper()} {readings[None if entry is None else interval_sign(entry['ci95'])]}"
                                for name, entry in zip(labels, entries))
            lines.append(f"{start}{cells}{_p_cell(p_value):>9}  {reading}")
    return "\n".join(lines)


def _bounds(ci95: Sequence[Optional[float]]) -> str:
    """``[-0.0040, +0.0290]``; ``n/a`` for an undefined interval."""
    return "n/a" if interval_sign(ci95) is None else f"[{ci95[0]:+.4f}, {ci95[1]:+.4f}]"


def format_interval(value: Optional[float], ci95: Sequence[Optional[float]]) -> str:
    """``+0.0123 [-0.0040, +0.0290]``; ``n/a`` for an undefined value."""
    return "n/a" if value is None or math.isnan(value) else f"{value:+.4f} {_bounds(ci95)}"


def format_comparison(comparison: dict, title: Optional[str] = None) -> str:
    """A readable table of :func:`compare_scores` (or of the ranking protocol's ``compare_pool_scores``, counted in
    pools): metric, A, B, delta = B - A, 95% interval, verdict."""
    lines = [] if title is None else [title]
    counted = f"{comparison['pools']:,} pools" if "pools" in comparison else f"{comparison['rows']:,} rows"
    lines.append(f"{counted} of {comparison['users']:,} users; 95% intervals from a paired bootstrap over users "
                 f"({comparison['resamples']:,} resamples, seed {comparison['seed']})")
    lines.append(f"{'metric':<14}{'A':>9}{'B':>9}{'Δ = B − A':>11}  {'95% interval':<20}  verdict")
    for name, entry in comparison["metrics"].items():
        lines.append(f"{name:<14}{_cell(entry['a']):>9}{_cell(entry['b']):>9}{_cell(entry['delta'], '+'):>11}  "
                     f"{_bounds(entry['ci95']):<20}  {entry['verdict']}")
    if "delong" in comparison:
        delong = comparison["delong"]
        lines.append(f"{'auc (DeLong)':<14}{_cell(delong['auc_a']):>9}{_cell(delong['auc_b']):>9}{_cell(delong['delta'], '+'):>11}  "
                     f"{_bounds(delong['ci95']):<20}  {delong['verdict']}, p = {_p_cell(delong['p_value'])}")
    return "\n".join(lines)


def _cell(value: Optional[float], sign: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:{sign}.4f}"


def _p_cell(value: Optional[float]) -> str:
    """A p-value in four decimals, or in powers of ten below 0.0001 (not a misleading 0.0000)."""
    return _cell(value) if value is None or math.isnan(value) or value >= 1e-4 else f"{value:.1e}"
