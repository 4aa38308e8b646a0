"""The ranking protocol (docs/ranking.md): each test positive ranked among its candidate pool, the pool's
target first and then sampled items the user never interacted with (``prepare_data.py`` with
``num_candidates``).

Rows: :func:`candidate_rows` turns the pools into one record per (pool, candidate), scored like any test
row. Metrics, plain numpy over flat rows (``pool_ids``, ``labels``, ``scores``; one positive per pool):
:func:`target_ranks`, :func:`candidate_ranks`, :func:`pool_metrics` (HR@k, NDCG@k, MRR).

Ties are broken pessimistically: a candidate scoring exactly the target's score ranks above it, so the
target's rank is 1 + the number of other candidates scoring at least as high, and a constant scorer gets
rank N (the worst), never 1. HR@k and NDCG@k come from :func:`thinkrec.evaluation.metrics.per_user_ranking`
with each pool as one group (its ties are broken the same way).

Intervals: :func:`pool_intervals` and :func:`compare_pool_scores` resample users, not pools (a user's pools
share a history and move together): each resample draws the users with replacement and averages the
metric over every pool of each drawn user, as `thinkrec.evaluation.metrics` does for the CTR metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pandas as pd

from thinkrec.data.readers import DataFormatError
from thinkrec.data.records import RECORD_FEATURES
from thinkrec.evaluation.metrics import (
    CI_LEVEL,
    CI_RESAMPLES,
    _bounds,
    _cell,
    _check_resamples,
    interval_verdict,
    match_predictions,
    per_user_ranking,
    percentile_interval,
    user_resample_counts,
)
from thinkrec.utils.errors import InputError


logger = logging.getLogger(__name__)

DEFAULT_RANKING_KS = (1, 5, 10, 20)
POOL_COLUMN = "PoolID"
POOL_COLUMNS = ("UserID", "TargetItemID", "CandidateItemIDs")
TIES = "pessimistic: a candidate scoring equal to the target ranks above it"
# Record columns that describe the pool's target and are wrong for its other candidates: not copied.
TARGET_ONLY_COLUMNS = ("not_cold",)


# ---------------------------------------------------------------------------------------------- rows


def _pool_text(pools: pd.DataFrame, index: int) -> str:
    return f"pool {index} (UserID {int(pools['UserID'].iloc[index])}, TargetItemID {int(pools['TargetItemID'].iloc[index])})"


def _candidate_lists(pools: pd.DataFrame, source: str) -> list[np.ndarray]:
    """Each pool's candidate ids as an int64 array; a cell that is not a list of integer ids is refused."""
    lists = []
    for index, value in enumerate(pools["CandidateItemIDs"]):
        array = None if value is None or isinstance(value, (str, bytes)) else np.asarray(value)
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise DataFormatError(f"{source}: {_pool_text(pools, index)}: CandidateItemIDs must be a list of integer "
                                  f"item ids, found {value!r}.")
        lists.append(array.astype(np.int64))
    return lists


def check_pools(pools: pd.DataFrame, item_ids: np.ndarray, source: str = "candidates") -> tuple[np.ndarray, np.ndarray]:
    """Stop on a pool the protocol cannot rank, naming it (its row in `source`, user and target): a missing
    column, a pool without candidates, a candidate not in the item table (`item_ids`), a candidate listed
    twice, a target that is not the pool's first candidate, pools of different sizes. Returns the
    candidates of all pools, flat, and each pool's size."""
    missing = [name for name in POOL_COLUMNS if name not in pools.columns]
    if missing:
        raise DataFormatError(f"{source}: missing column(s) {missing}; candidate pools need {list(POOL_COLUMNS)}, "
                              f"found {list(pools.columns)}.")
    if len(pools) == 0:
        raise DataFormatError(f"{source}: no candidate pools.")
    lists = _candidate_lists(pools, source)
    sizes = np.array([len(candidates) for candidates in lists], dtype=np.int64)
    if (sizes == 0).any():
        raise DataFormatError(f"{source}: {_pool_text(pools, int(np.flatnonzero(sizes == 0)[0]))} has no candidates.")
    flat = np.concatenate(lists)
    pool_of = np.repeat(np.arange(len(pools)), sizes)
    unknown = ~np.isin(flat, np.asarray(item_ids, dtype=np.int64))
    if unknown.any():
        position = int(np.flatnonzero(unknown)[0])
        raise InputError(f"{source}: {_pool_text(pools, int(pool_of[position]))}: candidate item {int(flat[position])} is not "
                         f"in the item table ({int(unknown.sum())} candidate(s) of {int(len(np.unique(pool_of[unknown])))} "
                         "pool(s) are not); the pools and the records come from different preparations.")
    order = np.lexsort((flat, pool_of))
    repeated = (pool_of[order][1:] == pool_of[order][:-1]) & (flat[order][1:] == flat[order][:-1])
    if repeated.any():
        first = int(np.min(pool_of[order][1:][repeated]))
        item = int(flat[order][1:][repeated & (pool_of[order][1:] == first)][0])
        raise InputError(f"{source}: {_pool_text(pools, first)} lists candidate item {item} twice; a pool holds distinct "
                         "items (a repeated negative would count twice against the target).")
    targets = pools["TargetItemID"].to_numpy().astype(np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    not_first = flat[starts] != targets
    if not_first.any():
        index = int(np.flatnonzero(not_first)[0])
        where = ("is not in its CandidateItemIDs" if not (lists[index] == targets[index]).any()
                 else f"is its candidate {int(np.flatnonzero(lists[index] == targets[index])[0])}, not its first")
        raise InputError(f"{source}: {_pool_text(pools, index)}: the target {where}; a pool lists its target first, then "
                         "the sampled candidates (docs/records.md).")
    other_size = sizes != sizes[0]
    if other_size.any():
        index = int(np.flatnonzero(other_size)[0])
        raise InputError(f"{source}: {_pool_text(pools, index)} has {int(sizes[index])} candidates but pool 0 has "
                         f"{int(sizes[0])}; the protocol ranks pools of one size (prepare_data.py writes num_candidates + 1 each).")
    return flat, sizes


def positive_rows(pools: pd.DataFrame, test: pd.DataFrame, source: str = "candidates", test_source: str = "test split") -> np.ndarray:
    """For each pool, the position in `test` of its positive row (same user and target, label 1).

    The j-th pool of a (user, target) is paired with the j-th positive row of that user and item in test
    order, which is how prepare_data.py writes them (one pool per positive test row, in order); a pool whose
    positive row is missing, or a (user, target) with a different number of pools and positive rows, is an
    `InputError` naming the pool."""
    keys = ["UserID", "TargetItemID"]
    labels = test["label"].to_numpy()
    positives = pd.DataFrame({key: test[key].to_numpy().astype(np.int64) for key in keys})[labels == 1]
    positives["position"] = np.flatnonzero(labels == 1)
    positives["occurrence"] = positives.groupby(keys).cumcount()
    wanted = pd.DataFrame({key: pools[key].to_numpy().astype(np.int64) for key in keys})
    wanted["occurrence"] = wanted.groupby(keys).cumcount()
    wanted["pool"] = np.arange(len(wanted))
    paired = wanted.merge(positives, on=[*keys, "occurrence"], how="left", sort=False).sort_values("pool", kind="stable")
    test_counts = positives.groupby(keys).size()
    pool_counts = wanted.groupby(keys).size()
    key_index = pd.MultiIndex.from_frame(wanted[keys])
    in_test = test_counts.reindex(key_index, fill_value=0).to_numpy()
    in_pools = pool_counts.reindex(key_index).to_numpy()
    missing = in_test == 0
    if missing.any():
        index = int(np.flatnonzero(missing)[0])
        user, item = int(wanted["UserID"].iloc[index]), int(wanted["TargetItemID"].iloc[index])
        negative = bool(((test["UserID"].to_numpy() == user) & (test["TargetItemID"].to_numpy() == item)).any())
        hint = " (it is there with label 0 only)" if negative else ""
        raise InputError(f"{source}: {_pool_text(pools, index)}: no positive row of this user and item in the {test_source}"
                         f"{hint}; {int(missing.sum())} pool(s) have none. The pools and the splits come from different "
                         "preparations: prepare the folder again.")
    ambiguous = in_test != in_pools
    if ambiguous.any():
        index = int(np.flatnonzero(ambiguous)[0])
        raise InputError(f"{source}: {_pool_text(pools, index)}: the {test_source} has {int(in_test[index])} positive rows of "
                         f"this user and item but the pools {int(in_pools[index])}; which history goes with which pool is "
                         "ambiguous (pools are paired with positive rows in order only when the counts agree, as "
                         "prepare_data.py writes them: one pool per positive test row).")
    return paired["position"].to_numpy().astype(np.int64)


def candidate_rows(pools: pd.DataFrame, test: pd.DataFrame, items: pd.DataFrame, source: str = "candidates",
                   test_source: str = "test split") -> pd.DataFrame:
    """One record per (pool, candidate): the pool's positive test row (user, history, mode, timestamp) with
    TargetItemID = the candidate, TargetItemTitle = its title in the item table and label 1 for the pool's
    target, 0 for the others, plus `PoolID` (the pool's row in `source`). Rows come pool by pool, the target
    first. The record columns of `test` (docs/records.md) are kept except `not_cold`, which describes the
    target only; keywords are attached afterwards, like for the test rows. Bad pools stop with the pool
    named (`check_pools`, `positive_rows`)."""
    flat, sizes = check_pools(pools, items["ItemID"].to_numpy(), source)
    positions = positive_rows(pools, test, source, test_source)
    titles = pd.Series(items["title"].to_numpy(), index=items["ItemID"].to_numpy().astype(np.int64))
    titles = titles[~titles.index.duplicated()]
    target_titles = titles.reindex(pools["TargetItemID"].to_numpy().astype(np.int64)).to_numpy()
    differ = int((test["TargetItemTitle"].to_numpy()[positions] != target_titles).sum()) if "TargetItemTitle" in test else 0
    if differ:
        logger.warning("ranking: %d pool target(s) have another title in the %s than in the item table; every candidate "
                       "is shown with its item-table title", differ, test_source)
    columns = [name for name in RECORD_FEATURES if name in test.columns and name not in TARGET_ONLY_COLUMNS]
    rows = test.iloc[np.repeat(positions, sizes)][columns].reset_index(drop=True)
    within = np.arange(len(flat)) - np.repeat(np.r_[0, np.cumsum(sizes)[:-1]], sizes)
    rows["TargetItemID"] = flat
    rows["TargetItemTitle"] = titles.reindex(flat).to_numpy().astype(str)
    rows["label"] = (within == 0).astype(np.int64)
    rows.insert(0, POOL_COLUMN, np.repeat(np.arange(len(pools), dtype=np.int64), sizes))
    return rows


def describe_pools(rows: pd.DataFrame) -> dict[str, int]:
    """Counts of candidate rows: pools, users, candidates per pool, and pools whose user has no history
    (rendered with the template's empty-history text, as the test rows are)."""
    first = rows.groupby(POOL_COLUMN, sort=True).head(1)
    return {
        "n_pools": int(len(first)),
        "n_users": int(first["UserID"].nunique()),
        "pool_size": int(len(rows) // max(len(first), 1)),
        "pools_without_history": int((first["HisItemIDs"].map(len) == 0).sum()),
    }


def resolve_ks(requested: Optional[Sequence[int]], pool_size: int) -> tuple[int, ...]:
    """The cut-offs to report: `requested`, every one at most `pool_size` (a larger k would give HR@k = 1
    for every pool: an `InputError`), or by default those of DEFAULT_RANKING_KS that fit (the rest are
    logged as left out)."""
    if requested is None:
        ks = tuple(k for k in DEFAULT_RANKING_KS if k <= pool_size) or (1,)
        left_out = [k for k in DEFAULT_RANKING_KS if k > pool_size]
        if left_out:
            logger.info("ranking: k = %s left out of the default cut-offs: the pools hold %d candidates", left_out, pool_size)
        return ks
    too_large = sorted(k for k in requested if k > pool_size)
    if too_large:
        raise InputError(f"ranking_ks {too_large} larger than the pools' {pool_size} candidates (HR@k would be 1 for every "
                         f"pool): use k <= {pool_size}, or prepare the records with num_candidates >= {too_large[-1] - 1}.")
    return tuple(requested)


# ------------------------------------------------------------------------------------------- metrics


def _flat_inputs(pool_ids, labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pool_ids, labels, scores = np.asarray(pool_ids), np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if not (pool_ids.ndim == labels.ndim == scores.ndim == 1) or not len(pool_ids) == len(labels) == len(scores):
        raise ValueError(f"pool_ids, labels and scores must be 1-D of one length, found shapes {pool_ids.shape}, "
                         f"{labels.shape}, {scores.shape}.")
    if not np.isin(labels, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise ValueError(f"labels must be 0 or 1, found {labels[row].item()!r} at row {row}.")
    if not np.isfinite(scores).all():
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores must be finite, found {scores[row].item()!r} at row {row} (pool {pool_ids[row].item()!r}).")
    return pool_ids, labels.astype(np.int64), scores


def target_ranks(pool_ids, labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pools, ranks, sizes): each pool's id (sorted), the 1-based rank of its one positive among its rows,
    ties pessimistic (1 + the number of negatives scoring at least as high), and its number of rows. A pool
    with no positive or more than one is a `ValueError` naming it."""
    pool_ids, labels, scores = _flat_inputs(pool_ids, labels, scores)
    pools, codes = np.unique(pool_ids, return_inverse=True)
    codes = codes.reshape(-1)
    positives = np.bincount(codes, weights=labels, minlength=len(pools))
    if (positives != 1).any():
        index = int(np.flatnonzero(positives != 1)[0])
        raise ValueError(f"pool {pools[index].item()!r} has {int(positives[index])} positive rows; a pool ranks exactly one target.")
    target_score = np.empty(len(pools))
    target_score[codes[labels == 1]] = scores[labels == 1]
    above = (labels == 0) & (scores >= target_score[codes])
    ranks = 1 + np.bincount(codes, weights=above, minlength=len(pools)).astype(np.int64)
    return pools, ranks, np.bincount(codes, minlength=len(pools))


def candidate_ranks(pool_ids, scores) -> np.ndarray:
    """Each row's 1-based rank within its pool by score, descending; tied rows share the worst of their ranks
    (1 + the number of other rows of the pool scoring at least as high), so a target's rank here is its
    :func:`target_ranks` rank."""
    frame = pd.DataFrame({"pool": np.asarray(pool_ids), "score": np.asarray(scores, dtype=np.float64)})
    return frame.groupby("pool", sort=False)["score"].rank(method="max", ascending=False).to_numpy().astype(np.int64)


def pool_metrics(pool_ids, labels, scores, ks: Sequence[int] = DEFAULT_RANKING_KS) -> dict[str, float | int]:
    """HR@k, NDCG@k (k in `ks`) and MRR averaged over pools, ties pessimistic, and ``n_pools``. With r the
    target's rank in its pool: HR@k = [r <= k], NDCG@k = [r <= k] / log2(r + 1), MRR = mean 1 / r (over the
    whole pool, no cut-off). A k larger than the smallest pool is an `InputError` (HR@k would be 1)."""
    pools, ranks, sizes = target_ranks(pool_ids, labels, scores)
    too_large = [k for k in ks if k > sizes.min()]
    if too_large:
        index = int(np.argmin(sizes))
        raise InputError(f"k = {too_large} larger than pool {pools[index].item()!r}, which holds {int(sizes[index])} "
                         "candidates (HR@k would be 1 for every pool).")
    table = per_user_ranking(pool_ids, labels, scores, ks)
    results: dict[str, float | int] = {}
    for prefix in ("hr", "ndcg"):
        for k in ks:
            results[f"{prefix}@{k}"] = float(table[f"{prefix}@{k}"].mean())
    results["mrr"] = float(np.mean(1.0 / ranks))
    results["n_pools"] = int(len(pools))
    return results


def format_ranking(metrics: dict, baseline: Optional[dict] = None, names: tuple[str, str] = ("this model", "CF alone")) -> str:
    """A readable table of :func:`pool_metrics` results: one row per metric, a column for `baseline` too, each
    value with its 95% interval when the results carry one (``ci95``)."""
    sides = [metrics] + ([baseline] if baseline is not None else [])
    width = 32 if any("ci95" in side for side in sides) else 14
    lines = [f"ranking: {int(metrics['n_pools']):,} pools of {int(metrics['pool_size'])} candidates (the test positive and "
             f"{int(metrics['pool_size']) - 1} sampled items its user never interacted with); ties {TIES}",
             f"{'metric':<10}" + "".join(f"{label:>{width}}" for label in names[:len(sides)])]
    for name in [*(f"{p}@{k}" for p in ("hr", "ndcg") for k in metrics["ks"]), "mrr"]:
        cells = []
        for side in sides:
            cell = _cell(side[name])
            if "ci95" in side:
                cell += f" {_bounds(side['ci95'][name])}"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ intervals

POOL_METRICS = "hr@k, ndcg@k, mrr"


def pool_metric_names(names: Sequence[str], ks: Sequence[int] = ()) -> list[str]:
    """Checked metric names of the ranking protocol: ``hr@k``, ``ndcg@k`` (k a positive integer) and ``mrr``;
    none given: HR@k and NDCG@k for `ks`, then MRR. Another name is an `InputError`."""
    if not names:
        return [f"{prefix}@{k}" for prefix in ("hr", "ndcg") for k in ks] + ["mrr"]
    checked = []
    for name in names:
        base, at, k = name.strip().lower().partition("@")
        if not ((base == "mrr" and not at) or (base in ("hr", "ndcg") and k.isdigit() and int(k) > 0)):
            raise InputError(f"unknown ranking metric {name!r}: expected one of {POOL_METRICS} (k a positive integer).")
        checked.append(name.strip().lower())
    return checked


def _pool_values(pool_ids, labels, scores, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pools sorted, {metric: per-pool value}) with the definitions of :func:`pool_metrics`."""
    pools, ranks, sizes = target_ranks(pool_ids, labels, scores)
    values = {}
    for name in names:
        base, _, k = name.partition("@")
        if base == "mrr":
            values[name] = 1.0 / ranks
            continue
        if int(k) > sizes.min():
            index = int(np.argmin(sizes))
            raise InputError(f"k = {int(k)} larger than pool {pools[index].item()!r}, which holds {int(sizes[index])} "
                             "candidates (HR@k would be 1 for every pool).")
        hit = ranks <= int(k)
        values[name] = hit.astype(np.float64) if base == "hr" else np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    return pools, values


def _pool_users(pool_ids, user_ids, pools: np.ndarray) -> np.ndarray:
    """The user of each pool in `pools` (sorted pool ids); a pool whose rows name two users is a `ValueError`."""
    frame = pd.DataFrame({"pool": np.asarray(pool_ids), "user": np.asarray(user_ids)})
    users = frame.groupby("pool", sort=True)["user"].agg(["first", "nunique"])
    if (users["nunique"] > 1).any():
        pool = users.index[users["nunique"] > 1][0]
        raise ValueError(f"pool {pool.item() if isinstance(pool, np.generic) else pool!r} has rows of more than one user.")
    return users["first"].reindex(pools).to_numpy()


def _user_replicates(values: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The mean over pools of `values` in each resample of `counts` (resamples x users), each pool weighted by
    its user's draw count."""
    sums = np.bincount(codes, weights=values, minlength=counts.shape[1])
    pools_per_user = np.bincount(codes, minlength=counts.shape[1]).astype(np.float64)
    return (counts @ sums) / (counts @ pools_per_user)


def compare_pool_scores(pool_ids, user_ids, labels, scores_a, scores_b, metrics: Sequence[str] = (),
                        ks: Sequence[int] = DEFAULT_RANKING_KS, resamples: int = CI_RESAMPLES, seed: int = 0,
                        names: tuple[str, str] = ("A", "B")) -> dict:
    """Two models ranking the same pools: each metric's value for A and B, delta = B - A, the 95% interval of
    each (``ci95_a``, ``ci95_b``) and of the delta from a paired bootstrap over users (both models on the same
    resamples; ``user_resample_counts`` over the users in sorted order), and a verdict. `metrics` default to
    HR@k / NDCG@k for `ks` and MRR. Plain JSON (NaN aside), with the counts of pools and users."""
    _check_resamples(resamples)
    metric_names = pool_metric_names(metrics, ks)
    pools, values_a = _pool_values(pool_ids, labels, scores_a, metric_names)
    _, values_b = _pool_values(pool_ids, labels, scores_b, metric_names)
    pool_users = _pool_users(pool_ids, user_ids, pools)
    users, codes = np.unique(pool_users, return_inverse=True)
    counts = user_resample_counts(len(users), resamples, seed).astype(np.float64)
    results = {}
    for name in metric_names:
        replicates_a = _user_replicates(values_a[name], counts, codes)
        replicates_b = _user_replicates(values_b[name], counts, codes)
        a, b = float(values_a[name].mean()), float(values_b[name].mean())
        interval = percentile_interval(replicates_b - replicates_a)
        results[name] = {"a": a, "b": b, "delta": b - a, "ci95": interval, "verdict": interval_verdict(interval, *names),
                         "ci95_a": percentile_interval(replicates_a), "ci95_b": percentile_interval(replicates_b)}
    return {"pools": int(len(pools)), "users": int(len(users)), "resamples": int(resamples), "seed": int(seed),
            "level": CI_LEVEL, "metrics": results}


def pool_intervals(pool_ids, user_ids, labels, scores, metrics: Sequence[str] = (), ks: Sequence[int] = DEFAULT_RANKING_KS,
                   resamples: int = CI_RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """One model's 95% interval of each ranking metric, ``{metric: [lo, hi]}``, from the bootstrap over users
    (the same resamples as :func:`compare_pool_scores` with that seed)."""
    compared = compare_pool_scores(pool_ids, user_ids, labels, scores, scores, metrics, ks, resamples, seed)
    return {name: entry["ci95_b"] for name, entry in compared["metrics"].items()}


def compare_ranking_frames(frame_a: pd.DataFrame, frame_b: pd.DataFrame, name_a: str = "A", name_b: str = "B",
                           score_column_a: str = "score", score_column_b: str = "score", metrics: Sequence[str] = (),
                           resamples: int = CI_RESAMPLES, seed: int = 0, names: tuple[str, str] = ("A", "B")) -> dict:
    """:func:`compare_pool_scores` on two ``ranking_predictions.parquet`` tables, rows paired by (PoolID,
    TargetItemID) with `match_predictions` (a row missing from one file, a repeated key, a label or user that
    differs: an `InputError` naming the file and row). Default metrics: HR@k / NDCG@k for the default cut-offs
    that fit the pools, and MRR."""
    rows = match_predictions(frame_a, frame_b, name_a, name_b, score_column_a, score_column_b, keys=(POOL_COLUMN, "TargetItemID"))
    smallest = int(rows.groupby(POOL_COLUMN).size().min())
    ks = tuple(k for k in DEFAULT_RANKING_KS if k <= smallest) or (1,)
    comparison = compare_pool_scores(rows[POOL_COLUMN].to_numpy(), rows["UserID"].to_numpy(), rows["label"].to_numpy(),
                                     rows["score_a"].to_numpy(), rows["score_b"].to_numpy(), metrics, ks, resamples, seed, names)
    return {"rows": int(len(rows)), **comparison}
