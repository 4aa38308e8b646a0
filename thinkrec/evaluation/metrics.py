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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd


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


def roc_auc(labels, scores) -> float:
    """AUC over all rows (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    if n_positive == 0 or n_negative == 0:
        return math.nan
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    rank_sum = ranks[labels == 1].sum()
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


def ranking_metrics(user_ids, labels, scores, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, NDCG@k and MAP@k from re-ranking each user's own rows by score (descending).

    Averaged over users with at least one positive row (``ranking_users``); users without a
    positive are skipped. Ties: negatives before positives (pessimistic). With rel_i = label at
    rank i (1-based) and P = the user's number of positives:

    - HR@k   = 1 if any of the top k rows is positive, else 0;
    - NDCG@k = sum_{i<=k} rel_i / log2(i+1)  divided by  sum_{i<=min(k,P)} 1 / log2(i+1);
    - MAP@k  = sum_{i<=k} rel_i * precision@i  divided by  min(k, P).
    """
    frame = pd.DataFrame({"user": user_ids, "label": labels, "score": scores})
    # Sort by user, then score descending, then label ascending (negatives first among ties).
    frame = frame.sort_values(["user", "score", "label"], ascending=[True, False, True], kind="stable")
    user_codes, _ = pd.factorize(frame["user"], sort=False)
    n_users = int(user_codes.max()) + 1 if len(user_codes) else 0
    label = frame["label"].to_numpy(dtype=np.float64)
    rank = frame.groupby("user", sort=False).cumcount().to_numpy() + 1  # 1-based within user
    hits_so_far = frame.groupby("user", sort=False)["label"].cumsum().to_numpy(dtype=np.float64)
    n_positive = np.bincount(user_codes, weights=label, minlength=n_users)
    has_positive = n_positive > 0
    results: dict[str, float] = {"ranking_users": float(has_positive.sum())}
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
        if not has_positive.any():
            results.update({f"hr@{k}": math.nan, f"ndcg@{k}": math.nan, f"map@{k}": math.nan})
            continue
        results[f"hr@{k}"] = float((hits[has_positive] > 0).mean())
        results[f"ndcg@{k}"] = float((dcg[has_positive] / ideal_dcg[has_positive]).mean())
        results[f"map@{k}"] = float((precision_sum[has_positive] / ideal_count[has_positive]).mean())
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
