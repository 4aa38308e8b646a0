"""Seeded subsets (of rows, or of whole users) that keep a split's own order, and the table cell used by
printed summaries."""

import math
from typing import Optional, TypeVar

import numpy as np


Rows = TypeVar("Rows")


def seeded_rows(total: int, size: Optional[int], seed: int) -> Optional[np.ndarray]:
    """Sorted positions of a seeded random subset of `size` of `total` rows (None: keep them all)."""
    if size is None or size >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def seeded_subset(rows: Rows, size: Optional[int], seed: int) -> Rows:
    """A seeded random subset of a pandas DataFrame or a `datasets.Dataset`, kept in its own order (so
    histories stay readable)."""
    return _take(rows, seeded_rows(len(rows), size, seed))


def seeded_user_rows(users: np.ndarray, size: Optional[int], seed: int) -> Optional[np.ndarray]:
    """Sorted positions of every row of a seeded random set of users: users are taken in a seeded order,
    each one whose rows still fit in `size` (a user too large to fit is passed over, so a few heavy
    users do not crowd out the rest; the first user is kept if none fits); None: keep them all."""
    if size is None or size >= len(users):
        return None
    unique, inverse, counts = np.unique(np.asarray(users), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = np.zeros(len(unique), dtype=bool)
    room = size
    for user in order:
        if counts[user] <= room:
            chosen[user] = True
            room -= counts[user]
            if room == 0:
                break
    if not chosen.any():
        chosen[order[0]] = True
    return np.flatnonzero(chosen[inverse.reshape(-1)])


def seeded_user_subset(rows: Rows, size: Optional[int], seed: int, user_column: str = "UserID") -> Rows:
    """Like `seeded_subset`, but by whole users: per-user metrics (UAUC, HR@k) need each user's rows
    together, and random rows of a leave-one-out split leave almost no user with both labels."""
    if size is None or size >= len(rows):
        return rows
    return _take(rows, seeded_user_rows(np.asarray(rows[user_column]), size, seed))


def _take(rows: Rows, positions: Optional[np.ndarray]) -> Rows:
    if positions is None:
        return rows
    if hasattr(rows, "iloc"):
        return rows.iloc[positions]
    return rows.select(positions)


def metric_cell(value: Optional[float]) -> str:
    """A metric as printed in tables: four decimals, `n/a` for a missing or NaN value."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
