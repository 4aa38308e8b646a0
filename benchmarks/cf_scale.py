"""Collaborative encoders at a real size: MF and SASRec with their default settings on a generated
implicit log of ~50k users, ~20k items and ~700k train rows.

    python benchmarks/cf_scale.py                      # MF and SASRec, full size
    python benchmarks/cf_scale.py --models mf --users 5000 --items 2000

The log is drawn from MovieLens-100K statistics (the bundled RecBole copy): each user's number of
interactions is a resampled ML-100K user count scaled to ``--mean_interactions``, item popularity a
resampled ML-100K item count (with log-normal jitter). Taste: items belong to one of
``--topics`` topics, each user has a concentrated Dirichlet preference over topics; an interaction
picks a topic from the user's preference (with probability ``--topic_share``, otherwise any item
by popularity) and then an item of that topic by popularity. Seeded. The records come from the
project's own pipeline (``thinkrec.data.preparation.prepare_records``): leave-one-out split, one
uniformly sampled unseen negative per positive, histories of 25 items.

Each encoder is trained by ``train_collaborative.train_and_evaluate`` with the defaults of
``train_collaborative.py`` (``REPRODUCTION_DEFAULTS``; only ``--max_epochs`` / ``--patience`` can be
lowered to bound the run, and SASRec is bounded by ``--sasrec_max_epochs``, 5 by default: at full
size one SASRec epoch takes minutes on 2 CPU cores, so its "epochs to best" is within that bound). Reported: seconds per epoch (optimisation only, mean over epochs),
epochs to the best validation AUC, and test AUC of the kept model. Unless ``--baseline_steps 0``,
the previous MF setting (dense Adam with weight_decay 1e-4 on whole tables, d 256, batch 256) is
run for that many steps first, for comparison: its seconds per epoch are extrapolated and its
validation AUC is measured after those steps.

The last printed line is one JSON object:
``{"mf": {"seconds_per_epoch": ..., "epochs_to_best": ..., "test_auc": ...}, "sasrec": {...}, "rows": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from thinkrec.collaborative.training import EncoderAtChanceError, build_model, score_split, set_seed, split_from_records
from thinkrec.data.preparation import RecordOptions, prepare_records
from thinkrec.data.readers import InteractionLog, read_ml100k
from thinkrec.evaluation.metrics import roc_auc
from thinkrec.utils.environment import benchmark_environment
from train_collaborative import MODEL_TYPES, CFTrainingArguments, ModelArguments, train_and_evaluate


def synthetic_implicit_log(
    num_users: int = 50_000,
    num_items: int = 22_000,
    mean_interactions: float = 9.0,
    num_topics: int = 40,
    topic_share: float = 0.7,
    topic_concentration: float = 0.1,
    seed: int = 0,
) -> InteractionLog:
    """An implicit log (user, item, timestamp; every row a positive) shaped by ML-100K statistics.

    ``num_items`` items are drawn from; the rarest may never be picked (the records count only
    interacted items). Each user gets at least 3 distinct interactions (leave-one-out needs them).
    """
    rng = np.random.default_rng(seed)
    reference = read_ml100k().interactions
    user_counts = reference.groupby("user").size().to_numpy(np.float64)
    item_counts = reference.groupby("item").size().to_numpy(np.float64)
    scale = mean_interactions / user_counts.mean()
    per_user = rng.choice(user_counts, size=num_users) * scale * rng.uniform(0.75, 1.25, num_users)
    per_user = np.maximum(3, np.round(per_user)).astype(np.int64)
    popularity = rng.choice(item_counts, size=num_items) * rng.lognormal(0.0, 0.3, num_items)
    item_topic = rng.integers(0, num_topics, num_items)
    preference = rng.dirichlet(np.full(num_topics, topic_concentration), size=num_users)

    user_of = np.repeat(np.arange(num_users), per_user)
    # Topic of each interaction from the user's preference (inverse CDF), then an item of that topic by popularity.
    cumulative = preference.cumsum(axis=1)
    topic = np.minimum((cumulative[user_of] < rng.random(len(user_of))[:, None]).sum(axis=1), num_topics - 1)
    items = np.empty(len(user_of), dtype=np.int64)
    for code in range(num_topics):
        rows = np.flatnonzero(topic == code)
        members = np.flatnonzero(item_topic == code)
        if len(rows):
            items[rows] = rng.choice(members, size=len(rows), p=popularity[members] / popularity[members].sum())
    untasted = rng.random(len(user_of)) >= topic_share
    items[untasted] = rng.choice(num_items, size=int(untasted.sum()), p=popularity / popularity.sum())
    # Top up users whose repeated picks left fewer than 3 distinct items.
    pairs = pd.DataFrame({"user": user_of, "item": items}).drop_duplicates()
    distinct = np.bincount(pairs["user"].to_numpy(), minlength=num_users)
    short = np.flatnonzero(distinct < 3)
    if len(short):
        extra = pd.DataFrame({"user": np.repeat(short, 3), "item": rng.choice(num_items, size=3 * len(short))})
        pairs = pd.concat([pairs, extra]).drop_duplicates()
    pairs = pairs.reset_index(drop=True)
    interactions = pd.DataFrame({
        "user": pairs["user"].astype(str),
        "item": pairs["item"].astype(str),
        # Distinct times in a random order: the order of a user's picks carries no signal of its own.
        "timestamp": (1_000_000_000 + rng.permutation(len(pairs))).astype(np.int64),
    })
    item_ids = np.arange(num_items)
    item_table = pd.DataFrame({
        "item": item_ids.astype(str),
        "title": [f"Item {i}" for i in item_ids],
        "genres": [f"topic {code}" for code in item_topic],
        "description": "",
    })
    return InteractionLog(interactions=interactions, items=item_table, source="synthetic-implicit")


def prepare_frames(log: InteractionLog, seed: int, max_history: int = 25):
    """Leave-one-out records with one sampled negative per positive, as pandas frames."""
    options = RecordOptions(split_mode="leave_one_out", negatives_per_positive=1, max_history=max_history, seed=seed)
    prepared = prepare_records(log, options)
    frames = {split: table.to_pandas() for split, table in prepared.splits.items()}
    return frames, prepared.metadata


def previous_mf_setting(frames, num_users: int, num_items: int, steps: int, seed: int) -> dict:
    """The MF setting before batch-row regularisation, for comparison: dense Adam(weight_decay=1e-4)
    over whole tables, d 256, batch 256, the previous initialisation; ``steps`` steps timed."""
    train = split_from_records(frames["train"], "train")
    validation = split_from_records(frames["validation"], "validation")
    set_seed(seed)
    model = build_model("mf", num_users, num_items, 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    batch_size = 256
    batches = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).split(batch_size)[:steps]
    started = time.perf_counter()
    for index in batches:
        loss = F.binary_cross_entropy_with_logits(model(train.user_ids[index], train.item_ids[index]), train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    steps_per_epoch = -(-len(train) // batch_size)
    return {
        "steps": len(batches),
        "steps_per_epoch": steps_per_epoch,
        "seconds_per_epoch": seconds / len(batches) * steps_per_epoch,
        "valid_auc": roc_auc(validation.labels.numpy(), score_split(model, validation)),
        "loss": float(loss.item()),
    }


def run_model(model_type: str, frames, num_users: int, num_items: int, args) -> dict:
    """Train one encoder with the command's defaults (bounded by --max_epochs / --patience)."""
    model_args = ModelArguments(model_type=model_type)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = CFTrainingArguments(
            output_dir=scratch, seed=args.seed, patience=args.patience, num_threads=args.num_threads,
            max_epochs=args.sasrec_max_epochs if model_type == "sasrec" else args.max_epochs,
        )
        try:
            outcome = train_and_evaluate(frames, num_users, num_items, model_args, training_args)
        except EncoderAtChanceError as error:
            print(f"{model_type}: {error}", flush=True)
            return {"seconds_per_epoch": None, "epochs_to_best": None, "test_auc": None, "stopped": "validation AUC at chance"}
    fit, config = outcome.fit, outcome.fit_config
    return {
        "seconds_per_epoch": round(float(np.mean(fit.epoch_seconds)), 2),
        "epochs_to_best": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "valid_auc": round(fit.best_valid_auc, 4),
        "test_auc": round(outcome.test_metrics["auc"], 4),
        "test_uauc": round(outcome.test_metrics["uauc"], 4),
        "train_seconds": round(fit.train_seconds, 1),
        "settings": {
            "embedding_dim": outcome.model_args.embedding_dim,
            "learning_rate": config.learning_rate,
            "embedding_l2": config.embedding_l2,
            "weight_decay": config.weight_decay,
            "batch_size": config.batch_size,
        },
    }


def results_table(results: dict, baseline: dict | None) -> str:
    header = (f"{'model':<8} {'setting':<38} {'s/epoch':>8} {'epochs to best':>14} {'epochs run':>10} "
              f"{'valid AUC':>9} {'test AUC':>9} {'test UAUC':>9}")
    lines = [header, "-" * len(header)]
    if baseline is not None:
        setting = "previous: d256 Adam(wd 1e-4) b256"
        lines.append(
            f"{'mf':<8} {setting:<38} {baseline['seconds_per_epoch']:>8.1f} {'-':>14} "
            f"{baseline['steps'] / baseline['steps_per_epoch']:>10.2f} {baseline['valid_auc']:>9.4f} {'-':>9} {'-':>9}"
        )
    for model_type, row in results.items():
        if row["test_auc"] is None:
            lines.append(f"{model_type:<8} stopped: {row['stopped']}")
            continue
        settings = row["settings"]
        setting = (f"d{settings['embedding_dim']} lr {settings['learning_rate']:g} l2 {settings['embedding_l2']:g} "
                   f"b{settings['batch_size']}")
        lines.append(
            f"{model_type:<8} {setting:<38} {row['seconds_per_epoch']:>8.1f} {row['epochs_to_best']:>14} {row['epochs_run']:>10} "
            f"{row['valid_auc']:>9.4f} {row['test_auc']:>9.4f} {row['test_uauc']:>9.4f}"
        )
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50_000, help="Users in the generated log.")
    parser.add_argument("--items", type=int, default=22_000, help="Items to draw from (the rarest may go unused).")
    parser.add_argument("--mean_interactions", type=float, default=9.0, help="Mean positives per user (ML-100K shape, rescaled).")
    parser.add_argument("--topics", type=int, default=40, help="Taste topics.")
    parser.add_argument("--topic_share", type=float, default=0.7, help="Share of picks that follow the user's topics.")
    parser.add_argument("--models", default="mf,sasrec", help=f"Comma-separated subset of {MODEL_TYPES}.")
    parser.add_argument("--max_epochs", type=int, default=200, help="Upper bound on epochs (the command's default: 200).")
    parser.add_argument("--sasrec_max_epochs", type=int, default=5,
                        help="Upper bound on SASRec's epochs: one takes ~3-4 minutes on 2 shared cores at full size.")
    parser.add_argument("--patience", type=int, default=10, help="Early-stopping patience (the command's default: 10).")
    parser.add_argument("--baseline_steps", type=int, default=300,
                        help="Steps of the previous MF setting to time for comparison (0 = skip).")
    parser.add_argument("--seed", type=int, default=42, help="Seed for the log, the negatives and training.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (0 = torch's default).")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODEL_TYPES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODEL_TYPES)}")
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    previous_threads = torch.get_num_threads()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        started = time.perf_counter()
        log = synthetic_implicit_log(args.users, args.items, args.mean_interactions, args.topics, args.topic_share, seed=args.seed)
        frames, metadata = prepare_frames(log, args.seed)
        num_users, num_items = int(metadata["num_users"]), int(metadata["num_items"])
        rows = {name: len(frame) for name, frame in frames.items()}
        print(f"log: {num_users - 1} users, {num_items - 1} items, rows {rows} "
              f"(generated and prepared in {time.perf_counter() - started:.0f}s)", flush=True)
        baseline = None
        if args.baseline_steps > 0 and "mf" in args.models:
            baseline = previous_mf_setting(frames, num_users, num_items, args.baseline_steps, args.seed)
            print(f"previous MF setting: {baseline['steps']} steps -> {baseline['seconds_per_epoch']:.0f}s/epoch, "
                  f"valid AUC {baseline['valid_auc']:.4f}", flush=True)
        results = {}
        for model_type in args.models:
            results[model_type] = run_model(model_type, frames, num_users, num_items, args)
            print(f"{model_type}: {results[model_type]['seconds_per_epoch']:.1f}s/epoch, "
                  f"test AUC {results[model_type]['test_auc']:.4f}", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    print(results_table(results, baseline))
    summary = {
        model_type: {key: row[key] for key in ("seconds_per_epoch", "epochs_to_best", "test_auc")}
        for model_type, row in results.items()
    }
    summary["rows"] = rows
    if baseline is not None:
        summary["previous_mf"] = {"seconds_per_epoch": round(baseline["seconds_per_epoch"], 1), "valid_auc": round(baseline["valid_auc"], 4),
                                  "steps": baseline["steps"]}
    print(json.dumps({**summary, "environment": benchmark_environment()}))
    return {"results": results, "baseline": baseline, "rows": rows, "num_users": num_users, "num_items": num_items}


if __name__ == "__main__":
    main()
