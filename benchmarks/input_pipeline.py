#!/usr/bin/env python
"""How fast do records become model inputs: tokenised once (Dataset.map, cached) against the collator
that rendered and tokenised every batch of every epoch?

10,000 training rows of ML-1M (the CoLLM split in ../shared/data/ml1m-collm, prepared with
`prepare_data.py --source collm` into a temporary folder and read with `datasets.load_dataset`) go
through a shuffled DataLoader (batch 8, the stage-2 prompts: collaborative / reflection templates,
512-token budget) three ways, in the same run:

- baseline: today's collator (tests/_reference_collator.py, the collator before this change) renders
  and tokenises inside every batch, so every epoch costs the same;
- pipeline, first epoch: `tokenize_dataset` (Dataset.map, batched) writes the cache, then the
  collator only pads and stacks;
- pipeline, cached epoch: the same call finds the cache; the collator only pads and stacks.

It also reports the share of scored tokens that are padding in evaluation batches, in dataset order
and grouped by length (the order ThinkRecTrainer scores tokenised rows in).

    python benchmarks/input_pipeline.py [--rows 10000] [--batch_size 8] [--data_path ../shared/data/ml1m-collm]

Last line: one JSON object with rows, rows/s of each way, the speedup of the cached epoch over the
baseline, and the padding shares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import _reference_collator as reference  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from data_collator import METRIC_COLUMNS, ThinkRecCollator, build_processor, tokenize_dataset  # noqa: E402
from modeling_thinkrec import add_slot_tokens  # noqa: E402
from thinkrec.data.records import load_records_dataset  # noqa: E402
from thinkrec.training.backbones import smollm2_tokenizer_dir  # noqa: E402
from thinkrec.training.trainer import length_order  # noqa: E402
from thinkrec.utils.environment import benchmark_environment  # noqa: E402
from thinkrec.utils.subsets import seeded_subset  # noqa: E402


SETTINGS = {"template": "collaborative", "reason_template": "reflection", "max_prompt_tokens": 512, "seed": 0,
            "item_noun": "movie", "item_noun_plural": "movies"}


def epoch_seconds(dataset: datasets.Dataset, collate, batch_size: int, seed: int) -> float:
    """Seconds to draw every batch of one shuffled epoch through a DataLoader, as Trainer does."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def padding_share(prompt_lengths: np.ndarray, answer_lengths: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Share of the scored tokens (rows x (longest prompt + longest answer) per batch) that are padding."""
    total = padded = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = prompt_lengths[rows].max() + answer_lengths[rows].max()
        total += len(rows) * width
        padded += len(rows) * width - (prompt_lengths[rows] + answer_lengths[rows]).sum()
    return float(padded / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--data_path", default=str(REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"))
    args = parser.parse_args()
    if not (Path(args.data_path) / "train.parquet").is_file():
        print(f"skipped: no ML-1M CoLLM split at {args.data_path} (train.parquet missing); pass --data_path.")
        return

    with tempfile.TemporaryDirectory() as temporary:
        records_dir = Path(temporary) / "records"
        subprocess.run([sys.executable, str(REPO_ROOT / "prepare_data.py"), "--source", "collm", "--data_path", args.data_path,
                        "--output_dir", str(records_dir)], check=True, capture_output=True, text=True)
        # A private datasets cache: the first epoch really tokenises, the second really reads the cache.
        os.environ["HF_DATASETS_CACHE"] = str(Path(temporary) / "cache")
        datasets.config.HF_DATASETS_CACHE = Path(temporary) / "cache"
        splits, metadata = load_records_dataset(records_dir)
        rows = seeded_subset(splits["train"], args.rows, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        add_slot_tokens(tokenizer, "<|user_slot|>", "<|item_slot|>")

        baseline_seconds = epoch_seconds(rows, reference.ThinkRecCollator(tokenizer, **SETTINGS), args.batch_size, seed=1)

        processor = build_processor(tokenizer, **SETTINGS)
        collator = ThinkRecCollator(processor=processor)
        start = time.perf_counter()
        encoded = tokenize_dataset(rows, processor, keep_columns=METRIC_COLUMNS)
        map_seconds = time.perf_counter() - start
        first_seconds = map_seconds + epoch_seconds(encoded, collator, args.batch_size, seed=1)
        start = time.perf_counter()
        cached = tokenize_dataset(rows, processor, keep_columns=METRIC_COLUMNS)
        cache_seconds = time.perf_counter() - start
        cached_seconds = cache_seconds + epoch_seconds(cached, collator, args.batch_size, seed=2)

        # Evaluation batches: the same rows scored in dataset order, then grouped by length.
        prompt_lengths = np.asarray(encoded["prompt_length"])
        answer_lengths = np.asarray(encoded["answer_length"])
        sequential = padding_share(prompt_lengths, answer_lengths, np.arange(len(encoded)), args.batch_size)
        grouped = padding_share(prompt_lengths, answer_lengths, length_order(encoded), args.batch_size)

    count = len(rows)
    table = [
        ("today's collator (renders + tokenises every batch), any epoch", baseline_seconds),
        ("pipeline, first epoch (Dataset.map + pad)", first_seconds),
        ("  of which Dataset.map (render + tokenise, write cache)", map_seconds),
        ("pipeline, cached epoch (read cache + pad)", cached_seconds),
    ]
    print(f"input pipeline: {count:,} ML-1M train rows ({metadata['source']}), batch {args.batch_size}, "
          f"templates {SETTINGS['template']}/{SETTINGS['reason_template']}, budget {SETTINGS['max_prompt_tokens']} tokens; "
          f"prompts {prompt_lengths.min()}-{prompt_lengths.max()} tokens (mean {prompt_lengths.mean():.1f})")
    print(f"{'way':<66} {'seconds':>8} {'rows/s':>10} {'vs baseline':>12}")
    for name, seconds in table:
        print(f"{name:<66} {seconds:>8.2f} {count / seconds:>10,.0f} {baseline_seconds / seconds:>11.1f}x")
    print(f"padding share of scored tokens, evaluation batches of {args.batch_size}: dataset order {sequential:.1%}, "
          f"grouped by length {grouped:.1%}")
    print(json.dumps({
        "environment": benchmark_environment(),
        "rows": count,
        "collator_rows_per_second": round(count / baseline_seconds, 1),
        "pipeline_first_epoch_rows_per_second": round(count / first_seconds, 1),
        "pipeline_cached_rows_per_second": round(count / cached_seconds, 1),
        "speedup_cached": round(baseline_seconds / cached_seconds, 2),
        "padding_share_sequential": round(sequential, 4),
        "padding_share_grouped": round(grouped, 4),
    }))


if __name__ == "__main__":
    main()
