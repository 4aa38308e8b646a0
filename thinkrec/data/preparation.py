"""Labels, splits, histories, negatives and cold flags: interaction logs in, ThinkRec records out.

Everything here is vectorised (numpy / pyarrow) and seeded; no Python loop runs over rows.
The record schema is documented in ``docs/records.md``; :func:`prepare_records` builds it from
an :class:`~thinkrec.data.readers.InteractionLog`, :func:`records_from_collm` from already split
CoLLM/ThinkRec tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns
from thinkrec.data.readers import DataFormatError, InteractionLog, PresplitRecords
from thinkrec.utils.errors import InputError


logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass
class RecordOptions:
    """How interactions become records (labels, split, histories, negatives, filters)."""

    rating_threshold: float = field(
        default=3.0, metadata={"help": "Explicit ratings strictly above this are positive (MovieLens: rating > 3)."}
    )
    negatives_per_positive: int = field(
        default=1,
        metadata={"help": "Implicit logs only (no rating/label): sampled negatives per observed positive."},
    )
    negative_sampling: str = field(
        default="uniform", metadata={"help": "How negatives are drawn: 'uniform' over items or 'popularity'."}
    )
    split_mode: str = field(
        default="temporal",
        metadata={"help": "'temporal' (global time windows, the CoLLM protocol) or 'leave_one_out' (per user)."},
    )
    split_ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1],
        metadata={"help": "Temporal mode: shares of observed rows (ordered by time) in train / validation / test; "
                  "sampled negatives follow their positive."},
    )
    split_timestamps: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Temporal mode: two unix times [t1, t2]; train < t1 <= validation < t2 <= test. Overrides split_ratios."},
    )
    max_history: int = field(default=10, metadata={"help": "Keep the last N earlier items of the user (10 in all published configs)."})
    history_mode: str = field(
        default="positives",
        metadata={"help": "'positives': earlier liked items only (CoLLM); 'all': every earlier item with its label (ThinkRec)."},
    )
    min_count: int = field(
        default=1, metadata={"help": "not_cold = 1 when user and item both occur in train at least this many times."}
    )
    min_user_interactions: int = field(
        default=0, metadata={"help": "Drop users with fewer observed interactions (0 = keep all). Counts are reported."}
    )
    min_item_interactions: int = field(
        default=0, metadata={"help": "Drop items with fewer observed interactions (0 = keep all). Counts are reported."}
    )
    duplicates: str = field(
        default="error",
        metadata={"help": "Rows with the same (user, item, timestamp): 'error' (stop and show them) or 'drop' (keep the first, report the count)."},
    )
    missing_titles: str = field(
        default="error",
        metadata={"help": "Items without a title (or missing from item_path): 'error', 'drop' (their rows are removed and "
                  "counted) or 'use_id' (title = 'Item <id>'). An item file that holds none of the ids is always an error."},
    )
    num_candidates: int = field(
        default=0,
        metadata={"help": "Ranking pools: sampled negatives per test positive (0 = no pools). Pools never hold items the user interacted with."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for negative sampling and candidate pools."})
    item_noun: Optional[str] = field(
        default=None,
        metadata={"help": f"What one item is, as prompts and reasons name it ('game', 'product', 'book'). Default "
                  f"{DEFAULT_ITEM_NOUN!r} for the MovieLens sources; prepare_data.py asks for it with recbole and table sources."},
    )
    item_noun_plural: Optional[str] = field(
        default=None, metadata={"help": "The plural of item_noun ('games', 'products'); set both or neither."}
    )

    def __post_init__(self):
        choices = {
            "negative_sampling": ("uniform", "popularity"),
            "split_mode": ("temporal", "leave_one_out"),
            "history_mode": ("positives", "all"),
            "duplicates": ("error", "drop"),
            "missing_titles": ("error", "drop", "use_id"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        ratios = self.split_ratios
        if len(ratios) != 3:
            raise InputError(f"split_ratios must be three shares (train, validation, test), found {len(ratios)}: {ratios}.")
        if any(r < 0 for r in ratios):
            raise InputError(f"split_ratios must be shares >= 0, found {ratios}.")
        if not np.isclose(sum(ratios), 1.0):
            raise InputError(f"split_ratios must sum to 1, found {ratios} (sum {sum(ratios):g}).")
        if self.split_timestamps is not None and (
            len(self.split_timestamps) != 2 or self.split_timestamps[0] > self.split_timestamps[1]
        ):
            raise InputError(f"split_timestamps must be [t1, t2] with t1 <= t2, got {self.split_timestamps}.")
        if self.max_history < 0:
            raise InputError(f"max_history must be >= 0, got {self.max_history}.")
        if self.negatives_per_positive < 1:
            raise InputError(f"negatives_per_positive must be >= 1, got {self.negatives_per_positive}.")
        if self.num_candidates < 0 or self.min_count < 0:
            raise InputError(f"num_candidates and min_count must be >= 0, got {self.num_candidates} and {self.min_count}.")
        if (self.item_noun is None) != (self.item_noun_plural is None):
            raise InputError(
                f"set item_noun and item_noun_plural together (e.g. 'game' and 'games'), found {self.item_noun!r} "
                f"and {self.item_noun_plural!r}."
            )
        if self.item_noun is not None:
            check_item_nouns(self.item_noun, self.item_noun_plural, "RecordOptions")

    def item_nouns(self) -> dict[str, str]:
        """`item_noun` / `item_noun_plural` as set, else the MovieLens default."""
        if self.item_noun is None:
            return {"item_noun": DEFAULT_ITEM_NOUN, "item_noun_plural": DEFAULT_ITEM_NOUN_PLURAL}
        return check_item_nouns(self.item_noun, self.item_noun_plural, "RecordOptions")


@dataclass
class PreparedRecords:
    """Records for each split (Arrow tables in the ``docs/records.md`` schema) plus side tables."""

    splits: dict[str, pa.Table]
    items: pd.DataFrame  # ItemID, original_id, title, genres, description
    users: pd.DataFrame  # UserID, original_id
    metadata: dict
    candidates: Optional[pa.Table] = None


# --------------------------------------------------------------------------------------------
# Vectorised building blocks
# --------------------------------------------------------------------------------------------


def gather_ragged(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``values[starts[i]:starts[i]+lengths[i]]`` for all i; return (flat values, offsets)."""
    lengths = lengths.astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts.astype(np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return values[index], offsets


def _list_array(values: np.ndarray | pa.Array, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def dense_ids(original: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Map original ids to 1..n (0 stays free for padding); numeric ids keep their numeric order."""
    unique = pd.unique(original)
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if numeric.notna().all():
        order = np.argsort(numeric.to_numpy(), kind="stable")
    else:
        order = np.argsort(unique.astype(str), kind="stable")
    vocabulary = unique[order]
    lookup = pd.Index(vocabulary)
    return lookup.get_indexer(original).astype(np.int64) + 1, vocabulary


def sample_unseen_items(
    users: np.ndarray,
    count: int,
    num_items: int,
    seen_keys: np.ndarray,
    rng: np.random.Generator,
    probabilities: Optional[np.ndarray] = None,
    distinct: bool = False,
) -> np.ndarray:
    """Draw ``count`` items per entry of ``users`` among items 1..num_items-1 the user never saw.

    ``seen_keys`` is the sorted array of ``user * num_items + item`` for every observed pair.
    Rejection sampling, vectorised; ``distinct`` also redraws repeats within a user's draw.
    """
    draws = np.zeros((len(users), count), dtype=np.int64)
    todo = np.ones(draws.shape, dtype=bool)
    candidates = np.arange(1, num_items, dtype=np.int64)
    for _ in range(200):
        rows, cols = np.nonzero(todo)
        if len(rows) == 0:
            return draws
        if probabilities is None:
            picked = rng.integers(1, num_items, size=len(rows))
        else:
            picked = rng.choice(candidates, size=len(rows), p=probabilities)
        keys = users[rows] * num_items + picked
        position = np.searchsorted(seen_keys, keys)
        position = np.minimum(position, len(seen_keys) - 1)
        accepted = seen_keys[position] != keys
        draws[rows[accepted], cols[accepted]] = picked[accepted]
        todo[rows[accepted], cols[accepted]] = False
        if distinct and count > 1:
            # Mark the later copy of any value repeated within a row for another draw; pending
            # cells get unique negative placeholders so they never count as repeats.
            filled = np.where(todo, -np.arange(todo.size).reshape(todo.shape) - 1, draws)
            order = np.argsort(filled, axis=1, kind="stable")
            ordered = np.take_along_axis(filled, order, axis=1)
            repeat_rows, repeat_cols = np.nonzero(ordered[:, 1:] == ordered[:, :-1])
            todo[repeat_rows, order[repeat_rows, repeat_cols + 1]] = True
    raise DataFormatError(
        "Could not sample enough unseen items: some users interacted with (almost) every item. "
        "Lower negatives_per_positive / num_candidates or filter those users."
    )


def candidate_pools(test: pa.Table, num_candidates: int, num_items: int, seen_keys: np.ndarray,
                    rng: np.random.Generator, probabilities: Optional[np.ndarray] = None) -> Optional[pa.Table]:
    """Ranking pools (None for 0 candidates): one per positive test row, its target first, then
    `num_candidates` distinct items the user never interacted with (`seen_keys`, see sample_unseen_items)."""
    if num_candidates <= 0:
        return None
    labels = test["label"].to_numpy()
    users = test["UserID"].to_numpy()[labels == 1].astype(np.int64)
    targets = test["TargetItemID"].to_numpy()[labels == 1].astype(np.int64)
    pool = sample_unseen_items(users, num_candidates, num_items, seen_keys, rng, probabilities, distinct=True)
    flat = np.concatenate([targets[:, None], pool], axis=1)
    return pa.table(
        {
            "UserID": pa.array(users, pa.int64()),
            "TargetItemID": pa.array(targets, pa.int64()),
            "CandidateItemIDs": _list_array(pa.array(flat.reshape(-1), pa.int64()), np.arange(len(flat) + 1) * flat.shape[1]),
        }
    )


def _block_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """For rows sorted by a key, the index of the first row of each row's block."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new_block = np.empty(n, dtype=bool)
    new_block[0] = True
    new_block[1:] = sorted_keys[1:] != sorted_keys[:-1]
    block_id = np.cumsum(new_block) - 1
    return np.flatnonzero(new_block)[block_id]


def build_histories(
    users: np.ndarray,
    items: np.ndarray,
    labels: np.ndarray,
    eligible: np.ndarray,
    max_history: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histories for rows already sorted by (user, time): the last ``max_history`` eligible rows
    of the same user strictly before each row. Returns (item values, label values, offsets)."""
    eligible = eligible.astype(np.int64)
    before = np.cumsum(eligible) - eligible  # eligible rows strictly before, over the whole table
    user_start = _block_starts(users)
    count_before = before - before[user_start]
    lengths = np.minimum(count_before, max_history)
    eligible_rows = np.flatnonzero(eligible)
    rows, offsets = gather_ragged(eligible_rows, before - lengths, lengths)
    return items[rows], labels[rows], offsets


# --------------------------------------------------------------------------------------------
# The pipeline for raw interaction logs
# --------------------------------------------------------------------------------------------


def _check_duplicates(interactions: pd.DataFrame, policy: str, source: str, report: dict) -> pd.DataFrame:
    duplicated = interactions.duplicated(["user", "item", "timestamp"], keep="first")
    if not duplicated.any():
        return interactions
    sample = interactions[duplicated].iloc[0]
    if policy == "error":
        raise DataFormatError(
            f"{source}: {int(duplicated.sum())} duplicate (user, item, timestamp) row(s), e.g. user={sample['user']!r} "
            f"item={sample['item']!r} timestamp={int(sample['timestamp'])}. Set duplicates='drop' to keep the first of each."
        )
    report["duplicate_rows_dropped"] = int(duplicated.sum())
    logger.warning("%s: dropped %d duplicate (user, item, timestamp) rows", source, int(duplicated.sum()))
    return interactions[~duplicated]


def _check_item_file(log: InteractionLog, interactions: pd.DataFrame, policy: str, report: dict) -> None:
    """Item ids of the interactions that a separate item file lacks are a join that failed (ids written two ways,
    '12.0' and '12'; the wrong id column): an `InputError` naming both files, unless `policy` ('drop', 'use_id')
    accepts items without metadata, then a count in the log and the report. None found at all is always an error."""
    if log.item_path is None:
        return
    used = pd.Index(pd.unique(interactions["item"]))
    known = pd.Index(log.items["item"])
    absent = used[~used.isin(known)]
    if len(absent) == 0:
        return
    unused = known[~known.isin(used)]
    sample = f"the item file has e.g. {(unused if len(unused) else known)[0]!r}" if len(known) else "the item file has no ids"
    found = f"{len(absent)} of {len(used)} item ids of {log.path or log.source} are not in {log.item_path} (e.g. {absent[0]!r}; {sample})"
    if len(absent) == len(used) or policy == "error":
        nothing = " (none of them: the files do not share their ids)" if len(absent) == len(used) else ""
        accept = "" if nothing else ", or set missing_titles='drop' or 'use_id' to accept items without metadata"
        raise InputError(f"{found}{nothing}. Check that both files write the ids the same way and that the item file's id "
                         f"column is the right one (table source: item_file_item_column){accept}.")
    report["items_not_in_item_file"] = int(len(absent))
    logger.warning("%s; missing_titles=%r: they are treated as items without a title.", found, policy)


def _attach_titles(interactions: pd.DataFrame, items: pd.DataFrame, policy: str, source: str, report: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Restrict the item table to interacted items and make sure every one has a title."""
    used = pd.DataFrame({"item": pd.unique(interactions["item"])})
    table = used.merge(items, on="item", how="left")
    for column in ("title", "genres", "description"):
        table[column] = table[column].fillna("").astype(str)
    untitled = table["title"].str.strip() == ""
    if untitled.any():
        sample = table.loc[untitled, "item"].head(3).tolist()
        if policy == "error":
            raise DataFormatError(
                f"{source}: {int(untitled.sum())} item(s) have no title, e.g. item ids {sample}. Prompts need titles; "
                "set missing_titles='drop' (removes their rows) or 'use_id' (title 'Item <id>')."
            )
        if policy == "drop":
            dropped = interactions["item"].isin(table.loc[untitled, "item"])
            report["untitled_items_dropped"] = int(untitled.sum())
            report["rows_dropped_for_untitled_items"] = int(dropped.sum())
            logger.warning("%s: dropped %d untitled items (%d rows)", source, int(untitled.sum()), int(dropped.sum()))
            interactions = interactions[~dropped]
            table = table[~untitled]
        else:
            table.loc[untitled, "title"] = "Item " + table.loc[untitled, "item"].astype(str)
            report["untitled_items_named_by_id"] = int(untitled.sum())
    return interactions, table.reset_index(drop=True)


def _check_both_classes(log: InteractionLog, interactions: pd.DataFrame, labels: np.ndarray, threshold: float) -> None:
    """Refuse a rating or label column that puts every row on one side: records need positives and negatives."""
    if len(np.unique(labels)) != 1:
        return
    where, column = log.path or log.source, log.feedback_column or log.feedback
    side = "positive" if labels[0] == 1 else "negative"
    if log.feedback == "label":
        raise InputError(
            f"{where}: column {column!r} holds only the label {int(labels[0])} (all rows {side}); records need positives "
            "and negatives. A log of positives only is implicit: read it without its label column and negatives are sampled."
        )
    ratings = interactions["rating"]
    low, high = ratings.min(), ratings.max()
    if low == high:
        values, hint = f"all {low:g}", "a log with one rating value is implicit: read it without its rating column and negatives are sampled"
    elif ratings.isin([0.0, 1.0]).all():
        values, hint = f"{low:g}..{high:g}", "for 0/1 labels use label_column"
    else:
        values, hint = f"{low:g}..{high:g}", f"set rating_threshold to at least {low:g} and below {high:g}"
    raise InputError(
        f"{where}: column {column!r} cannot split positives from negatives at rating_threshold {threshold}: its values "
        f"are {values} (all rows {side}); {hint}."
    )


def _filter_counts(interactions: pd.DataFrame, options: RecordOptions, report: dict) -> pd.DataFrame:
    """Iteratively drop users/items below the minimum counts (k-core), reporting what went."""
    if options.min_user_interactions <= 1 and options.min_item_interactions <= 1:
        return interactions
    start_rows, start_users, start_items = len(interactions), interactions["user"].nunique(), interactions["item"].nunique()
    while True:
        user_counts = interactions["user"].map(interactions["user"].value_counts())
        item_counts = interactions["item"].map(interactions["item"].value_counts())
        keep = (user_counts >= options.min_user_interactions) & (item_counts >= options.min_item_interactions)
        if keep.all():
            break
        interactions = interactions[keep]
    report["min_count_filter"] = {
        "rows_removed": start_rows - len(interactions),
        "users_removed": start_users - interactions["user"].nunique(),
        "items_removed": start_items - interactions["item"].nunique(),
    }
    logger.info("count filter removed %s", report["min_count_filter"])
    return interactions


def _temporal_cuts(observed_timestamps: np.ndarray, options: RecordOptions) -> list[int]:
    """[t1, t2]: train < t1 <= validation < t2 <= test, from the options or the observed rows' shares."""
    if options.split_timestamps is not None:
        return [int(t) for t in options.split_timestamps]
    ordered = np.sort(observed_timestamps)
    n = len(ordered)
    first = min(int(round(n * options.split_ratios[0])), n - 1)
    second = min(int(round(n * (options.split_ratios[0] + options.split_ratios[1]))), n - 1)
    return [int(ordered[first]), int(ordered[second])]


def _temporal_split(timestamps: np.ndarray, cuts: list[int]) -> np.ndarray:
    return np.where(timestamps < cuts[0], 0, np.where(timestamps < cuts[1], 1, 2)).astype(np.int8)


def _leave_one_out_split(users: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Rows sorted by (user, time): the user's last observed row -> test, second-to-last -> validation."""
    observed_int = observed.astype(np.int64)
    after = np.cumsum(observed_int[::-1])[::-1] - observed_int  # observed rows strictly after, global
    # Reverse block ends: rows of the next users must not count.
    block_end = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1]
    block_id = np.searchsorted(block_end, np.arange(len(users)))
    end_row = block_end[block_id]
    after_in_user = after - (after[end_row])
    split = np.zeros(len(users), dtype=np.int8)
    split[after_in_user == 0] = 2
    split[after_in_user == 1] = 1
    return split


def _observed_train_rows(users: np.ndarray, timestamps: np.ndarray, cuts: Optional[list[int]]) -> np.ndarray:
    """Which observed rows (input order) will be train rows, known before any negative is sampled."""
    if cuts is not None:
        return timestamps < cuts[0]
    sort = np.lexsort((np.arange(len(users)), timestamps, users))
    sorted_users = users[sort]
    per_user = np.bincount(users)
    # Leave-one-out drops users with fewer than three rows; they count nowhere.
    train_sorted = (_leave_one_out_split(sorted_users, np.ones(len(users), dtype=bool)) == 0) & (per_user[sorted_users] >= 3)
    train = np.zeros(len(users), dtype=bool)
    train[sort] = train_sorted
    return train


def prepare_records(log: InteractionLog, options: RecordOptions) -> PreparedRecords:
    """Turn an interaction log into train / validation / test records (see docs/records.md)."""
    report: dict = {"input_rows": int(len(log.interactions))}
    interactions = log.interactions
    if len(interactions) == 0:
        raise DataFormatError(f"{log.source}: the interaction table is empty.")
    interactions = _check_duplicates(interactions, options.duplicates, log.source, report)
    _check_item_file(log, interactions, options.missing_titles, report)
    interactions, items = _attach_titles(interactions, log.items, options.missing_titles, log.source, report)
    interactions = _filter_counts(interactions, options, report)

    feedback = log.feedback
    if feedback == "rating":
        labels = (interactions["rating"].to_numpy() > options.rating_threshold).astype(np.int64)
    elif feedback == "label":
        labels = interactions["label"].to_numpy().astype(np.int64)
    else:
        labels = np.ones(len(interactions), dtype=np.int64)
    if feedback != "implicit":
        _check_both_classes(log, interactions, labels, options.rating_threshold)

    user_ids, user_vocab = dense_ids(interactions["user"])
    item_ids, item_vocab = dense_ids(interactions["item"])
    items_by_id = items.set_index("item").loc[item_vocab]
    num_users, num_items = len(user_vocab) + 1, len(item_vocab) + 1
    timestamps = interactions["timestamp"].to_numpy().astype(np.int64)
    # Order key keeps the input order for ties; sampled negatives get key - 0.5 so that they sit
    # just before their positive and share its history (they never see the positive itself).
    order = np.arange(len(interactions), dtype=np.float64)
    observed = np.ones(len(interactions), dtype=bool)
    rng = np.random.default_rng(options.seed)
    seen_keys = np.unique(user_ids * num_items + item_ids)

    cuts = _temporal_cuts(timestamps, options) if options.split_mode == "temporal" else None
    if feedback == "implicit":
        probabilities = None
        if options.negative_sampling == "popularity":
            # Popularity as known at training time: counting later rows would leak the future into negatives.
            train_rows = _observed_train_rows(user_ids, timestamps, cuts)
            counts = np.bincount(item_ids[train_rows], minlength=num_items)[1:].astype(np.float64)
            if counts.sum() == 0:
                raise DataFormatError(
                    f"{log.source}: no observed row falls in the train split, so popularity negatives have no counts; "
                    "adjust split_ratios / split_timestamps."
                )
            probabilities = counts / counts.sum()
        negatives = sample_unseen_items(user_ids, options.negatives_per_positive, num_items, seen_keys, rng, probabilities)
        k = options.negatives_per_positive
        user_ids = np.r_[user_ids, np.repeat(user_ids, k)]
        item_ids = np.r_[item_ids, negatives.reshape(-1)]
        timestamps = np.r_[timestamps, np.repeat(timestamps, k)]
        order = np.r_[order, np.repeat(order, k) - 0.5]
        observed = np.r_[observed, np.zeros(len(negatives) * k, dtype=bool)]
        labels = np.r_[labels, np.zeros(len(negatives) * k, dtype=np.int64)]
        report["sampled_negatives"] = int(len(negatives) * k)

    # Sort by user, then time, then input order: histories and leave-one-out read this order.
    sort = np.lexsort((order, timestamps, user_ids))
    user_ids, item_ids, timestamps, labels, observed = (a[sort] for a in (user_ids, item_ids, timestamps, labels, observed))
    if options.split_mode == "temporal":
        split = _temporal_split(timestamps, cuts)
        report["split_timestamps"] = cuts
    else:
        observed_per_user = np.bincount(user_ids, weights=observed, minlength=num_users)
        too_short = observed_per_user[user_ids] < 3
        if too_short.any():
            short_users = int(np.count_nonzero((observed_per_user < 3) & (observed_per_user > 0)))
            report["leave_one_out_users_dropped"] = short_users
            report["leave_one_out_rows_dropped"] = int(too_short.sum())
            logger.warning("leave_one_out: dropped %d users with fewer than 3 interactions (%d rows)", short_users, int(too_short.sum()))
            keep = ~too_short
            user_ids, item_ids, timestamps, labels, observed = (a[keep] for a in (user_ids, item_ids, timestamps, labels, observed))
        # Sampled negatives follow the split of the positive right after them.
        split = _leave_one_out_split(user_ids, observed)
        if not observed.all():
            next_observed = np.flatnonzero(observed)
            position = np.searchsorted(next_observed, np.arange(len(observed)))
            split = split[next_observed[np.minimum(position, len(next_observed) - 1)]]

    eligible = observed & (labels == 1) if options.history_mode == "positives" else observed
    history_items, history_labels, offsets = build_histories(user_ids, item_ids, labels, eligible, options.max_history)
    titles = np.r_[[""], items_by_id["title"].to_numpy().astype(object)]

    # Sampled negatives are not occurrences: an item seen only in test stays cold even if drawn in train.
    train = (split == 0) & observed
    user_train_counts = np.bincount(user_ids[train], minlength=num_users)
    item_train_counts = np.bincount(item_ids[train], minlength=num_items)
    not_cold = ((user_train_counts[user_ids] >= options.min_count) & (item_train_counts[item_ids] >= options.min_count)).astype(np.int64)
    if options.min_count == 0:
        not_cold[:] = 1

    full = pa.table(
        {
            "UserID": pa.array(user_ids, pa.int64()),
            "HisItemIDs": _list_array(pa.array(history_items, pa.int64()), offsets),
            "HisItemTitles": _list_array(pa.array(titles[history_items], pa.string()), offsets),
            "HisItemLabels": _list_array(pa.array(history_labels, pa.int64()), offsets),
            "TargetItemID": pa.array(item_ids, pa.int64()),
            "TargetItemTitle": pa.array(titles[item_ids], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "reason": pa.array(np.full(len(labels), "", dtype=object), pa.string()),
            "mode": pa.array(np.full(len(labels), "rec", dtype=object), pa.string()),
            "not_cold": pa.array(not_cold, pa.int64()),
            "timestamp": pa.array(timestamps, pa.int64()),
        }
    )
    # Within a split, rows are in time order (ties: by user), the order a streaming reader expects.
    time_order = np.lexsort((user_ids, timestamps))
    splits = {}
    for code, name in enumerate(SPLITS):
        rows = time_order[split[time_order] == code]
        if len(rows) == 0:
            raise DataFormatError(
                f"{log.source}: the {name} split is empty after filtering ({report}). "
                "Adjust split_ratios / split_timestamps or the filters."
            )
        splits[name] = full.take(pa.array(rows))

    candidates = candidate_pools(splits["test"], options.num_candidates, num_items, seen_keys, rng)

    item_table = pd.DataFrame(
        {
            "ItemID": np.arange(1, num_items, dtype=np.int64),
            "original_id": item_vocab.astype(str),
            "title": titles[1:].astype(str),
            "genres": items_by_id["genres"].to_numpy().astype(str),
            "description": items_by_id["description"].to_numpy().astype(str),
        }
    )
    user_table = pd.DataFrame({"UserID": np.arange(1, num_users, dtype=np.int64), "original_id": user_vocab.astype(str)})
    report["users_with_one_interaction"] = int(np.count_nonzero(np.bincount(user_ids[observed], minlength=num_users) == 1))
    metadata = {
        "source": log.source,
        "feedback": feedback,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "padding_id": 0,
        "max_history": options.max_history,
        "history_mode": options.history_mode,
        "split_mode": options.split_mode,
        **options.item_nouns(),
        "rows": {name: table.num_rows for name, table in splits.items()},
        "positive_rate": {name: float(np.mean(table["label"].to_numpy())) for name, table in splits.items()},
        "report": report,
    }
    return PreparedRecords(splits=splits, items=item_table, users=user_table, metadata=metadata, candidates=candidates)


# --------------------------------------------------------------------------------------------
# Already split CoLLM / ThinkRec tables
# --------------------------------------------------------------------------------------------


def _collm_split_to_records(frame: pd.DataFrame, max_history: int, name: str) -> pa.Table:
    """Convert one CoLLM split; ``his`` starts with the padding id 0, which is dropped."""
    his = pa.array(frame["his"].map(lambda a: np.asarray(a, dtype=np.int64)), type=pa.list_(pa.int64()))
    his_title = pa.array(frame["his_title"].map(list), type=pa.list_(pa.string())) if "his_title" in frame else None
    values = his.values.to_numpy()
    list_offsets = his.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(list_offsets)
    starts_with_padding = (lengths > 0) & (values[np.minimum(list_offsets[:-1], max(len(values) - 1, 0))] == 0)
    real_lengths = lengths - starts_with_padding
    if np.count_nonzero(values == 0) != np.count_nonzero(starts_with_padding):
        raise DataFormatError(f"CoLLM {name} split: 'his' holds the padding id 0 after its first position.")
    keep = np.minimum(real_lengths, max_history)
    history_items, offsets = gather_ragged(values, list_offsets[:-1] + lengths - keep, keep)
    if his_title is not None:
        history_titles, _ = gather_ragged(his_title.values.to_numpy(zero_copy_only=False), list_offsets[:-1] + lengths - keep, keep)
    else:
        history_titles = np.full(len(history_items), "", dtype=object)
    n = len(frame)
    not_cold = frame["not_cold"].to_numpy().astype(np.int64) if "not_cold" in frame else np.ones(n, dtype=np.int64)
    labels = frame["label"].to_numpy().astype(np.int64)
    if not np.isin(labels, [0, 1]).all():
        raise DataFormatError(f"CoLLM {name} split: column 'label' must be 0/1, found {sorted(set(labels.tolist()))[:5]}.")
    return pa.table(
        {
            "UserID": pa.array(frame["uid"].to_numpy().astype(np.int64)),
            "HisItemIDs": _list_array(pa.array(history_items, pa.int64()), offsets),
            "HisItemTitles": _list_array(pa.array(history_titles, pa.string()), offsets),
            "HisItemLabels": _list_array(pa.array(np.ones(len(history_items), dtype=np.int64)), offsets),
            "TargetItemID": pa.array(frame["iid"].to_numpy().astype(np.int64)),
            "TargetItemTitle": pa.array(frame["title"].astype(str).to_numpy(), pa.string()),
            "label": pa.array(labels),
            "reason": pa.array(np.full(n, "", dtype=object), pa.string()),
            "mode": pa.array(np.full(n, "rec", dtype=object), pa.string()),
            "not_cold": pa.array(not_cold),
            "timestamp": pa.array(frame["timestamp"].to_numpy().astype(np.int64)),
        }
    )


def records_from_collm(
    presplit: PresplitRecords,
    max_history: int = 10,
    item_noun: str = DEFAULT_ITEM_NOUN,
    item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL,
    num_candidates: int = 0,
    seed: int = 42,
) -> PreparedRecords:
    """Records from CoLLM/ThinkRec tables, keeping the published ids, labels, order and ``not_cold``.
    `num_candidates` > 0 adds ranking pools for the test positives (see `candidate_pools`), drawn among
    items the user has no row of in any split and no history entry."""
    nouns = check_item_nouns(item_noun, item_noun_plural, presplit.source)
    splits = {name: _collm_split_to_records(frame, max_history, name) for name, frame in presplit.splits.items()}
    for name, table in splits.items():
        if table.num_rows == 0:
            raise DataFormatError(f"{presplit.source}: the {name} split is empty.")
        for column in ("UserID", "TargetItemID"):
            smallest = int(np.min(table[column].to_numpy()))
            if smallest < 1:
                raise DataFormatError(f"{presplit.source}/{name}: column {column} holds id {smallest}; ids start at 1 (0 is padding).")
    items = presplit.items.copy()
    items["ItemID"] = items["item"].astype(np.int64)
    max_item = max(int(items["ItemID"].max()), *(int(np.max(t["TargetItemID"].to_numpy())) for t in splits.values()))
    max_user = max(int(np.max(t["UserID"].to_numpy())) for t in splits.values())
    item_table = pd.DataFrame(
        {
            "ItemID": items["ItemID"],
            "original_id": items["item"].astype(str),
            "title": items["title"],
            "genres": items["genres"],
            "description": items["description"],
        }
    ).sort_values("ItemID", ignore_index=True)
    user_ids = np.unique(np.concatenate([t["UserID"].to_numpy() for t in splits.values()]))
    user_table = pd.DataFrame({"UserID": user_ids, "original_id": user_ids.astype(str)})
    metadata = {
        "source": presplit.source,
        "feedback": "label",
        "num_users": max_user + 1,
        "num_items": max_item + 1,
        "padding_id": 0,
        "max_history": max_history,
        "history_mode": "positives",
        "split_mode": "presplit",
        **nouns,
        "rows": {name: table.num_rows for name, table in splits.items()},
        "positive_rate": {name: float(np.mean(table["label"].to_numpy())) for name, table in splits.items()},
        "report": {"input_rows": {name: int(len(f)) for name, f in presplit.splits.items()}},
    }
    candidates = None
    if num_candidates > 0:
        num_items = max_item + 1
        seen = [table["UserID"].to_numpy().astype(np.int64) * num_items + table["TargetItemID"].to_numpy() for table in splits.values()]
        for table in splits.values():
            lengths = pc.list_value_length(table["HisItemIDs"]).to_numpy(zero_copy_only=False)
            history_users = np.repeat(table["UserID"].to_numpy().astype(np.int64), lengths)
            seen.append(history_users * num_items + pc.list_flatten(table["HisItemIDs"]).to_numpy().astype(np.int64))
        seen_keys = np.unique(np.concatenate(seen))
        # Only items of the item table (they have titles) are drawn.
        listed = np.zeros(num_items, dtype=np.float64)
        listed[item_table["ItemID"].to_numpy()] = 1.0
        probabilities = None if listed[1:].all() else listed[1:] / listed[1:].sum()
        candidates = candidate_pools(splits["test"], num_candidates, num_items, seen_keys, np.random.default_rng(seed),
                                     probabilities)
        metadata["num_candidates"] = num_candidates
    return PreparedRecords(splits=splits, items=item_table, users=user_table, metadata=metadata, candidates=candidates)
