"""Seeded subsets that keep a split's own order, and the table cell used by printed summaries."""

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
    positions = seeded_rows(len(rows), size, seed)
    if positions is None:
        return rows
    if hasattr(rows, "iloc"):
        return rows.iloc[positions]
    return rows.select(positions)


def metric_cell(value: Optional[float]) -> str:
    """A metric as printed in tables: four decimals, `n/a` for a missing or NaN value."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
