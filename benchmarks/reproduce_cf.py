"""Reproduce the published collaborative baselines (MF, LightGCN, SASRec) on ML-1M (CoLLM split) and ML-100K.

    python benchmarks/reproduce_cf.py                       # both datasets, all three encoders
    python benchmarks/reproduce_cf.py --datasets ml1m-collm --models mf

Every encoder runs with the defaults of ``train_collaborative.py`` (``REPRODUCTION_DEFAULTS``:
chosen on validation AUC here and on the large implicit log of ``benchmarks/cf_scale.py``; batch-row
L2 and sparse updates; test is scored once, for the kept model). The baseline is the published CoLLM
test AUC / UAUC on the same ML-1M split; the table shows the difference. The ML-1M folder is
``../shared/data/ml1m-collm`` next to the repository (``--ml1m_dir`` or ``ML1M_COLLM_DIR``
override it); that part is skipped with a message when the folder is absent. ML-100K is the
bundled RecBole copy, prepared by ``thinkrec.data.preparation.prepare_records`` with default options
(temporal 80/10/10 split, rating > 3 positive).

The last printed line is one JSON object:
``{"ml1m-collm": {"mf": {"test_auc": ..., "test_uauc": ..., "train_seconds": ...}, ...}, "ml-100k": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from thinkrec.collaborative.models import checkpoint_from_model, save_cf_checkpoint
from thinkrec.utils.environment import benchmark_environment
from train_collaborative import MODEL_TYPES, CFTrainingArguments, ModelArguments, train_and_evaluate


REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ML1M_DIR = REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"
DATASETS = ("ml1m-collm", "ml-100k")
# Published test AUC / UAUC on the ML-1M CoLLM split (CoLLM paper, Table 2).
PUBLISHED_ML1M = {"mf": (0.6482, 0.6361), "lightgcn": (0.5959, 0.6499), "sasrec": (0.7078, 0.6884)}


def load_ml1m_collm(folder: Path, max_history: int):
    """Records frames and table sizes from the CoLLM split, through the project's reader."""
    from thinkrec.data.preparation import records_from_collm
    from thinkrec.data.readers import read_collm_splits

    prepared = records_from_collm(read_collm_splits(folder), max_history=max_history)
    return prepared


def load_ml100k(max_history: int):
    """Records from the bundled ML-100K with the default preparation options."""
    from thinkrec.data.preparation import RecordOptions, prepare_records
    from thinkrec.data.readers import read_ml100k

    return prepare_records(read_ml100k(), RecordOptions(max_history=max_history))


def run_dataset(name: str, prepared, models: list[str], seed: int, output_dir: Path | None) -> dict:
    """Train every encoder with its reproduction defaults; one result dict per model."""
    frames = {split: table.to_pandas() for split, table in prepared.splits.items()}
    num_users, num_items = int(prepared.metadata["num_users"]), int(prepared.metadata["num_items"])
    results = {}
    for model_type in models:
        model_args = ModelArguments(model_type=model_type)
        with tempfile.TemporaryDirectory() as scratch:
            training_args = CFTrainingArguments(output_dir=scratch, seed=seed)
            outcome = train_and_evaluate(frames, num_users, num_items, model_args, training_args)
        if output_dir is not None:
            config = {"metrics": {f"test/{key}": value for key, value in outcome.test_metrics.items() if "@" not in key}}
            checkpoint = checkpoint_from_model(outcome.model, num_users=num_users, config=config)
            save_cf_checkpoint(checkpoint, str(output_dir / name / model_type))
        results[model_type] = {
            "valid_auc": outcome.valid_metrics["auc"],
            "test_auc": outcome.test_metrics["auc"],
            "test_uauc": outcome.test_metrics["uauc"],
            "warm_auc": outcome.test_metrics["warm/auc"],
            "cold_auc": outcome.test_metrics["cold/auc"],
            "test_ndcg@5": outcome.test_metrics["ndcg@5"],
            "best_epoch": outcome.fit.best_epoch,
            "train_seconds": outcome.fit.train_seconds,
            "hyper_parameters": {
                "embedding_dim": outcome.model_args.embedding_dim,
                "learning_rate": outcome.fit_config.learning_rate,
                "embedding_l2": outcome.fit_config.embedding_l2,
                "weight_decay": outcome.fit_config.weight_decay,
                "batch_size": outcome.fit_config.batch_size,
            },
        }
        print(f"[{name}] {model_type}: test AUC {results[model_type]['test_auc']:.4f}, "
              f"{results[model_type]['train_seconds']:.1f}s", flush=True)
    return results


def results_table(all_results: dict) -> str:
    """Dataset, model, valid/test AUC, UAUC, warm/cold AUC, seconds, and the gap to the published ML-1M numbers."""
    header = (f"{'dataset':<11} {'model':<9} {'valid AUC':>9} {'test AUC':>9} {'UAUC':>7} {'warm AUC':>9} "
              f"{'cold AUC':>9} {'train s':>8} {'published AUC/UAUC':>19} {'AUC gap':>8}")
    lines = [header, "-" * len(header)]
    for dataset, results in all_results.items():
        for model_type, row in results.items():
            published = PUBLISHED_ML1M.get(model_type) if dataset == "ml1m-collm" else None
            published_text = f"{published[0]:.4f}/{published[1]:.4f}" if published else "-"
            gap_text = f"{row['test_auc'] - published[0]:+.4f}" if published else "-"
            lines.append(
                f"{dataset:<11} {model_type:<9} {row['valid_auc']:>9.4f} {row['test_auc']:>9.4f} {row['test_uauc']:>7.4f} "
                f"{row['warm_auc']:>9.4f} {row['cold_auc']:>9.4f} {row['train_seconds']:>8.1f} {published_text:>19} {gap_text:>8}"
            )
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ml1m_dir", default=os.environ.get("ML1M_COLLM_DIR", str(DEFAULT_ML1M_DIR)),
                        help="Folder with the CoLLM ML-1M split (train/valid/test parquet). Env: ML1M_COLLM_DIR.")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"Comma-separated subset of {DATASETS}.")
    parser.add_argument("--models", default=",".join(MODEL_TYPES), help=f"Comma-separated subset of {MODEL_TYPES}.")
    parser.add_argument("--seed", type=int, default=42, help="Seed for initialisation and shuffling.")
    parser.add_argument("--max_history", type=int, default=25,
                        help="History items kept per row; SASRec reads the last 25 (CoLLM's max_len).")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default); one is fastest for these small models on shared CPUs.")
    parser.add_argument("--output_dir", default=None, help="Also save each checkpoint to OUTPUT_DIR/<dataset>/<model>.")
    args = parser.parse_args(argv)
    args.datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    for value, allowed, what in ((args.datasets, DATASETS, "datasets"), (args.models, MODEL_TYPES, "models")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"--{what}: unknown {unknown}; choose from {list(allowed)}")
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir) if args.output_dir else None
    all_results = {}
    for dataset in args.datasets:
        if dataset == "ml1m-collm":
            folder = Path(args.ml1m_dir)
            if not (folder / "train.parquet").is_file():
                print(f"skipping ml1m-collm: no CoLLM split at {folder} (set --ml1m_dir or ML1M_COLLM_DIR)")
                continue
            prepared = load_ml1m_collm(folder, args.max_history)
        else:
            prepared = load_ml100k(args.max_history)
        all_results[dataset] = run_dataset(dataset, prepared, args.models, args.seed, output_dir)
    print(results_table(all_results))
    summary = {
        dataset: {
            model_type: {key: round(row[key], 4) for key in ("test_auc", "test_uauc", "train_seconds")}
            for model_type, row in results.items()
        }
        for dataset, results in all_results.items()
    }
    print(json.dumps({**summary, "environment": benchmark_environment()}))
    return all_results


if __name__ == "__main__":
    main()
