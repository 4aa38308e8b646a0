"""Train one collaborative encoder (MF, LightGCN or SASRec) on prepared records.

    python train_collaborative.py examples/cf_mf.json
    python train_collaborative.py examples/cf_mf.json --output_dir outputs/cf_mf_try   # flags override the file
    python train_collaborative.py --records_dir outputs/ml100k --model_type sasrec --output_dir outputs/cf_sasrec

Prints validation and test AUC / UAUC / NDCG@5 (all, warm, cold), writes
``OUTPUT_DIR/test_predictions.parquet`` and ``OUTPUT_DIR/metrics.json``, and saves the checkpoint
(``model.safetensors`` + ``cf_config.json``) that the LLM loads with
``thinkrec.collaborative.models.load_cf_checkpoint``. With ``grid``, every combination is trained and the
best on validation AUC is kept; the test split is scored once, for the kept model only.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import pandas as pd
import torch

from thinkrec.collaborative.models import MODEL_TYPES, checkpoint_from_model, save_cf_checkpoint
from thinkrec.collaborative.training import FitConfig, FitResult, build_model, score_split, set_seed, split_from_records, train_pointwise
from thinkrec.data.preparation import SPLITS
from thinkrec.data.records import load_prepared
from thinkrec.evaluation.metrics import compute_metrics
from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import atomic_write, write_json


logger = logging.getLogger(__name__)


# Defaults that reproduce the published ML-1M (CoLLM split) numbers, chosen on validation AUC
# (benchmarks/reproduce_cf.py). A field left unset takes its model's value from here.
REPRODUCTION_DEFAULTS = {
    "mf": {"embedding_dim": 256, "learning_rate": 1e-3, "weight_decay": 1e-4, "batch_size": 256},
    "lightgcn": {"embedding_dim": 64, "learning_rate": 1e-3, "weight_decay": 1e-4, "batch_size": 1024},
    "sasrec": {"embedding_dim": 64, "learning_rate": 1e-3, "weight_decay": 1e-3, "batch_size": 1024},
}
GRID_KEYS = ("embedding_dim", "learning_rate", "weight_decay", "batch_size", "num_layers", "dropout", "num_blocks")


@dataclass
class DataArguments:
    records_dir: str = field(metadata={"help": "Prepared records folder written by prepare_data.py (docs/records.md)."})

    def __post_init__(self):
        path = os.path.join(self.records_dir, "metadata.json")
        if not os.path.isfile(path):
            raise MissingInputError(
                f"records_dir: expected {path} (see docs/records.md); run prepare_data.py --output_dir {self.records_dir} first"
            )


@dataclass
class ModelArguments:
    model_type: Literal["mf", "lightgcn", "sasrec"] = field(default="mf", metadata={"help": "Encoder: 'mf', 'lightgcn' or 'sasrec'."})
    embedding_dim: int | None = field(default=None, metadata={"help": "Table / hidden size. Default: 256 for mf, 64 for lightgcn and sasrec."})
    num_layers: int = field(default=2, metadata={"help": "LightGCN propagation layers."})
    num_blocks: int = field(default=2, metadata={"help": "SASRec self-attention blocks."})
    num_heads: int = field(default=1, metadata={"help": "SASRec attention heads."})
    max_len: int = field(default=25, metadata={"help": "SASRec: the last max_len positive history items are encoded."})
    dropout: float = field(default=0.2, metadata={"help": "SASRec dropout rate."})

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise InputError(f"model_type must be one of {MODEL_TYPES}, found {self.model_type!r}")
        if self.embedding_dim is None:
            self.embedding_dim = REPRODUCTION_DEFAULTS[self.model_type]["embedding_dim"]
        for name in ("embedding_dim", "num_layers", "num_blocks", "num_heads", "max_len"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), found {self.dropout}")


@dataclass
class CFTrainingArguments:
    output_dir: str = field(metadata={"help": "Where the checkpoint, test predictions and metrics are written."})
    learning_rate: float | None = field(default=None, metadata={"help": "Adam learning rate. Default: the model's reproduction value (1e-3)."})
    weight_decay: float | None = field(default=None, metadata={"help": "L2 weight decay. Default: the model's reproduction value."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size. Default: the model's reproduction value (1024)."})
    optimizer: Literal["adam", "adamw"] = field(default="adam", metadata={"help": "'adam' (L2 in the gradient, as CoLLM) or 'adamw' (decoupled)."})
    max_epochs: int = field(default=200, metadata={"help": "Upper bound on epochs; early stopping usually ends sooner."})
    patience: int = field(default=10, metadata={"help": "Stop after this many epochs without a better validation AUC."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation and shuffling."})
    eval_batch_size: int = field(default=8192, metadata={"help": "Rows per batch when scoring a whole split."})
    num_threads: int = field(
        default=1,
        metadata={"help": "CPU threads for torch. These models' ops are too small to gain from more, and on a shared "
                  "2-core machine a second thread made MF training 20x slower (0 = torch's default)."},
    )
    grid: dict | str | None = field(
        default=None,
        metadata={"help": f"Optional grid: a JSON object of lists over {list(GRID_KEYS)}, e.g. "
                  '\'{"learning_rate": [1e-3, 1e-2], "weight_decay": [1e-4, 1e-3]}\'. Best on validation AUC is kept.'},
    )

    def __post_init__(self):
        if isinstance(self.grid, str):
            try:
                self.grid = json.loads(self.grid)
            except json.JSONDecodeError as error:
                raise InputError(f"grid must be a JSON object of lists, could not parse {self.grid!r}: {error}") from error
        if self.grid is not None:
            if not isinstance(self.grid, dict) or not self.grid:
                raise InputError(f"grid must be a non-empty JSON object of lists, found {self.grid!r}")
            for key, values in self.grid.items():
                if key not in GRID_KEYS:
                    raise InputError(f"grid key {key!r} is not supported; expected one of {list(GRID_KEYS)}")
                if not isinstance(values, list) or not values:
                    raise InputError(f"grid[{key!r}] must be a non-empty list, found {values!r}")
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0, found {self.num_threads}")
        for name in ("max_epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.optimizer not in ("adam", "adamw"):
            raise InputError(f"optimizer must be 'adam' or 'adamw', found {self.optimizer!r}")


@dataclass
class TrainingOutcome:
    """A trained encoder with its settings, fit statistics and validation/test metrics."""

    model: torch.nn.Module
    model_args: ModelArguments
    fit_config: FitConfig
    fit: FitResult
    valid_metrics: dict
    test_metrics: dict
    test_scores: object
    test_not_cold: object
    grid_results: list


def fit_config_for(model_type: str, training_args: CFTrainingArguments) -> FitConfig:
    """FitConfig from the arguments, unset fields taken from the model's reproduction defaults."""
    defaults = REPRODUCTION_DEFAULTS[model_type]
    return FitConfig(
        learning_rate=training_args.learning_rate if training_args.learning_rate is not None else defaults["learning_rate"],
        weight_decay=training_args.weight_decay if training_args.weight_decay is not None else defaults["weight_decay"],
        batch_size=training_args.batch_size if training_args.batch_size is not None else defaults["batch_size"],
        max_epochs=training_args.max_epochs,
        patience=training_args.patience,
        optimizer=training_args.optimizer,
        seed=training_args.seed,
        eval_batch_size=training_args.eval_batch_size,
    )


def _grid_settings(grid: dict | None) -> list[dict]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def _split_metrics(model, split, batch_size) -> tuple[dict, object]:
    scores = score_split(model, split, batch_size)
    metrics = compute_metrics(split.user_ids.numpy(), split.labels.numpy(), scores, split.not_cold.numpy())
    return metrics, scores


def train_and_evaluate(
    frames: dict[str, pd.DataFrame],
    num_users: int,
    num_items: int,
    model_args: ModelArguments,
    training_args: CFTrainingArguments,
) -> TrainingOutcome:
    """Train (over the grid, if any), keep the best on validation AUC, then score validation and test."""
    max_len = model_args.max_len if model_args.model_type == "sasrec" else None
    splits = {name: split_from_records(frames[name], name, max_len) for name in SPLITS}
    base_fit = fit_config_for(model_args.model_type, training_args)
    best, grid_results = None, []
    for setting in _grid_settings(training_args.grid):
        run_model_args = replace(model_args, **{key: value for key, value in setting.items() if hasattr(model_args, key)})
        fit_config = replace(base_fit, **{key: value for key, value in setting.items() if hasattr(base_fit, key)})
        set_seed(fit_config.seed)
        model = build_model(
            run_model_args.model_type, num_users, num_items, run_model_args.embedding_dim, splits["train"],
            num_layers=run_model_args.num_layers, num_blocks=run_model_args.num_blocks,
            num_heads=run_model_args.num_heads, max_len=run_model_args.max_len, dropout=run_model_args.dropout,
        )
        fit = train_pointwise(model, splits["train"], splits["validation"], fit_config)
        logger.info("setting %s: valid AUC %.4f (epoch %d), %.1fs", setting, fit.best_valid_auc, fit.best_epoch, fit.train_seconds)
        grid_results.append({**setting, "valid_auc": fit.best_valid_auc, "best_epoch": fit.best_epoch, "train_seconds": fit.train_seconds})
        if best is None or fit.best_valid_auc > best[3].best_valid_auc:
            best = (model, run_model_args, fit_config, fit)
    model, run_model_args, fit_config, fit = best
    valid_metrics, _ = _split_metrics(model, splits["validation"], fit_config.eval_batch_size)
    test_metrics, test_scores = _split_metrics(model, splits["test"], fit_config.eval_batch_size)
    return TrainingOutcome(
        model, run_model_args, fit_config, fit, valid_metrics, test_metrics, test_scores,
        splits["test"].not_cold.numpy(), grid_results,
    )


def summary_table(valid_metrics: dict, test_metrics: dict) -> str:
    """AUC, UAUC and NDCG@5 for validation and test, all / warm / cold."""
    lines = [f"{'split':<11}{'metric':<8}{'all':>9}{'warm':>9}{'cold':>9}"]
    for split_name, metrics in (("validation", valid_metrics), ("test", test_metrics)):
        for name in ("auc", "uauc", "ndcg@5"):
            cells = "".join(f"{metrics.get(prefix + name, math.nan):>9.4f}" for prefix in ("", "warm/", "cold/"))
            lines.append(f"{split_name:<11}{name:<8}{cells}")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CFTrainingArguments]:
    """A `.json` file, flags, or both (flags override the file); unknown keys are an error."""
    return parse_args((ModelArguments, DataArguments, CFTrainingArguments), argv)


def main(argv: list[str] | None = None) -> TrainingOutcome:
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The thread count is process-wide: give it back, or an in-process caller (a benchmark training the
    # LLM next) would run on one thread.
    previous_threads = torch.get_num_threads()
    if training_args.num_threads:
        torch.set_num_threads(training_args.num_threads)
    try:
        return _train_and_save(model_args, data_args, training_args)
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_save(model_args, data_args, training_args) -> TrainingOutcome:
    records = load_prepared(data_args.records_dir)
    frames, metadata = records.splits, records.metadata
    outcome = train_and_evaluate(frames, int(metadata["num_users"]), int(metadata["num_items"]), model_args, training_args)
    print(summary_table(outcome.valid_metrics, outcome.test_metrics))
    print(f"train seconds: {outcome.fit.train_seconds:.1f} (best epoch {outcome.fit.best_epoch} of {outcome.fit.epochs_run})")

    os.makedirs(training_args.output_dir, exist_ok=True)
    test_frame = frames["test"]
    predictions = pd.DataFrame({
        "UserID": test_frame["UserID"].to_numpy(),
        "TargetItemID": test_frame["TargetItemID"].to_numpy(),
        "label": test_frame["label"].to_numpy(),
        "score": outcome.test_scores,
        "not_cold": outcome.test_not_cold,
    })
    atomic_write(os.path.join(training_args.output_dir, "test_predictions.parquet"), lambda temp: predictions.to_parquet(temp, index=False))
    results = {
        "valid": outcome.valid_metrics,
        "test": outcome.test_metrics,
        "best_epoch": outcome.fit.best_epoch,
        "train_seconds": outcome.fit.train_seconds,
        "grid_results": outcome.grid_results,
    }
    write_json(results, os.path.join(training_args.output_dir, "metrics.json"))
    hyper_parameters = {**asdict(outcome.model_args), **asdict(outcome.fit_config)}
    checkpoint_config = {
        "hyper_parameters": hyper_parameters,
        "metrics": {f"valid/{key}": value for key, value in outcome.valid_metrics.items() if "@" not in key}
        | {f"test/{key}": value for key, value in outcome.test_metrics.items() if "@" not in key},
        "records_dir": data_args.records_dir,
        "source": metadata.get("source"),
    }
    checkpoint = checkpoint_from_model(outcome.model, num_users=int(metadata["num_users"]), config=checkpoint_config)
    save_cf_checkpoint(checkpoint, training_args.output_dir)
    logger.info("saved checkpoint and predictions to %s", training_args.output_dir)
    return outcome


if __name__ == "__main__":
    run_command(main)
