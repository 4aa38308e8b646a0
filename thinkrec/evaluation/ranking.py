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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pandas as pd

from thinkrec.data.readers import DataFormatError
from thinkrec.data.records import RECORD_FEATURES
from thinkrec.evaluation.metrics import per_user_ranking
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
    """A readable table of :func:`pool_metrics` results: one row per metric, a column for `baseline` too."""
    lines = [f"ranking: {int(metrics['n_pools']):,} pools of {int(metrics['pool_size'])} candidates (the test positive and "
             f"{int(metrics['pool_size']) - 1} sampled items its user never interacted with); ties {TIES}",
             f"{'metric':<10}{names[0]:>14}" + (f"{names[1]:>14}" if baseline is not None else "")]
    for name in [*(f"{p}@{k}" for p in ("hr", "ndcg") for k in metrics["ks"]), "mrr"]:
        cells = [metrics[name]] + ([baseline[name]] if baseline is not None else [])
        lines.append(f"{name:<10}" + "".join("{:>14}".format("n/a" if math.isnan(v) else f"{v:.4f}") for v in cells))
    return "\n".join(lines)
