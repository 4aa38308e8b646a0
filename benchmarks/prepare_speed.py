#!/usr/bin/env python
"""How fast does an ML-1M-sized log (1M interactions) become records?

The log is generated from MovieLens-100K statistics (user activity, item popularity and rating
distributions, scaled to 6,040 users x 3,706 items like ML-1M), then prepared with the default
options (temporal split, rating > 3, last 10 positives as history, 99-item candidate pools) and
written as Parquet with its dataset card. The baseline row is reading the same log back from
Parquet with pandas, measured in the same run, to put the preparation time in proportion.

    python benchmarks/prepare_speed.py [--interactions 1000000] [--output_dir DIR]

Last line: one JSON object with interactions, seconds, rows_per_second and the stage times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from thinkrec.data.preparation import RecordOptions, prepare_records
from thinkrec.data.readers import InteractionLog, read_ml100k
from thinkrec.data.records import save_prepared
from thinkrec.utils.environment import benchmark_environment


def synthetic_log(num_interactions: int, num_users: int, num_items: int, seed: int) -> InteractionLog:
    """A log with ML-100K's activity, popularity and rating shapes at the requested size."""
    source = read_ml100k()
    rng = np.random.default_rng(seed)
    activity = np.sort(source.interactions["user"].value_counts().to_numpy())[::-1].astype(np.float64)
    popularity = np.sort(source.interactions["item"].value_counts().to_numpy())[::-1].astype(np.float64)
    # Resample the empirical curves onto the target number of users / items.
    user_weight = np.interp(np.linspace(0, len(activity) - 1, num_users), np.arange(len(activity)), activity)
    item_weight = np.interp(np.linspace(0, len(popularity) - 1, num_items), np.arange(len(popularity)), popularity)
    oversample = int(num_interactions * 1.15)
    users = rng.choice(num_users, size=oversample, p=user_weight / user_weight.sum())
    items = rng.choice(num_items, size=oversample, p=item_weight / item_weight.sum())
    pairs = pd.DataFrame({"user": users, "item": items}).drop_duplicates().head(num_interactions)
    ratings = rng.choice(source.interactions["rating"].to_numpy(), size=len(pairs))
    start = int(source.interactions["timestamp"].min())
    timestamps = start + rng.integers(0, 3 * 365 * 86400, size=len(pairs))
    interactions = pd.DataFrame(
        {
            "user": pairs["user"].astype(str).to_numpy(),
            "item": pairs["item"].astype(str).to_numpy(),
            "timestamp": timestamps.astype(np.int64),
            "rating": ratings.astype(np.float64),
        }
    )
    titles = source.items["title"].to_numpy()
    items_table = pd.DataFrame(
        {
            "item": np.arange(num_items).astype(str),
            "title": [f"{titles[i % len(titles)]} #{i}" for i in range(num_items)],
            "genres": "",
            "description": "",
        }
    )
    return InteractionLog(interactions=interactions, items=items_table, source="synthetic-ml1m-size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=6_040)
    parser.add_argument("--items", type=int, default=3_706)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Where to write (default: a temporary folder).")
    args = parser.parse_args()

    log = synthetic_log(args.interactions, args.users, args.items, args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        output_dir = Path(args.output_dir or temporary)
        # Baseline: the cost of merely reading the raw log from Parquet.
        raw_path = output_dir / "raw.parquet"
        output_dir.mkdir(parents=True, exist_ok=True)
        log.interactions.to_parquet(raw_path)
        start = time.perf_counter()
        pd.read_parquet(raw_path)
        read_seconds = time.perf_counter() - start

        start = time.perf_counter()
        records = prepare_records(log, RecordOptions(num_candidates=99))
        prepare_seconds = time.perf_counter() - start
        start = time.perf_counter()
        save_prepared(records, output_dir / "records")
        write_seconds = time.perf_counter() - start

    total = prepare_seconds + write_seconds
    rows = sum(records.metadata["rows"].values())
    print(f"{'stage':<32}{'seconds':>10}{'rows/s':>14}")
    print(f"{'read raw Parquet (baseline)':<32}{read_seconds:>10.2f}{len(log.interactions) / read_seconds:>14,.0f}")
    print(f"{'prepare records':<32}{prepare_seconds:>10.2f}{rows / prepare_seconds:>14,.0f}")
    print(f"{'write Parquet + card':<32}{write_seconds:>10.2f}{rows / write_seconds:>14,.0f}")
    print(f"{'total (prepare + write)':<32}{total:>10.2f}{rows / total:>14,.0f}")
    print(f"interactions: {len(log.interactions):,}; records: {rows:,} ({records.metadata['rows']}); "
          f"candidate pools: {records.candidates.num_rows:,}; total / baseline read: {total / read_seconds:.1f}x")
    print(
        json.dumps(
            {
                "interactions": int(len(log.interactions)),
                "records": int(rows),
                "seconds": round(total, 3),
                "rows_per_second": round(rows / total, 1),
                "prepare_seconds": round(prepare_seconds, 3),
                "write_seconds": round(write_seconds, 3),
                "baseline_read_seconds": round(read_seconds, 3),
                "environment": benchmark_environment(),
            }
        )
    )


if __name__ == "__main__":
    main()
