"""Train one collaborative encoder (MF, LightGCN or SASRec) on prepared records.

    python train_collaborative.py examples/cf_mf.json
    python train_collaborative.py examples/cf_mf.json --output_dir outputs/cf_mf_try   # flags override the file
    python train_collaborative.py --records_dir outputs/ml100k --model_type sasrec --output_dir outputs/cf_sasrec

Prints validation and test AUC / UAUC / NDCG@5 (all, warm, cold), writes
``OUTPUT_DIR/test_predictions.parquet`` and ``OUTPUT_DIR/metrics.json``, and saves the checkpoint
(``model.safetensors`` + ``cf_config.json``) that the LLM loads with
``thinkrec.collaborative.models.load_cf_checkpoint``. With ``grid``, every combination is trained and the
best on validation AUC is kept; the test split is scored once, for the kept model only.

Regularisation touches only the rows a batch reads (``embedding_l2``; sparse updates for MF's and
SASRec's tables), so the defaults (``REPRODUCTION_DEFAULTS``, printed by ``--help``) work on ML-1M
and on logs of 50k users alike. An encoder whose validation AUC stays at chance for the first
``chance_epochs`` epochs stops with a message naming the settings to change, and nothing is saved.
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
from thinkrec.collaborative.training import (
    EncoderAtChanceError,
    FitConfig,
    FitResult,
    build_model,
    score_split,
    set_seed,
    split_from_records,
    train_pointwise,
    zero_untrained_rows,
)
from thinkrec.data.preparation import SPLITS
from thinkrec.data.records import load_prepared, records_fingerprint
from thinkrec.evaluation.metrics import compute_metrics
from thinkrec.training.run_folder import RunFolder
from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import atomic_write, check_not_inside, output_lock, write_json


logger = logging.getLogger(__name__)


# Defaults per encoder, chosen on validation AUC so that each learns both on the ML-1M CoLLM split
# (benchmarks/reproduce_cf.py, against the published numbers) and on a ~50k-user implicit log
# (benchmarks/cf_scale.py). A field left unset takes its model's value from here, and --help prints
# these values. embedding_l2: the L2 term on the embedding rows of each batch; weight_decay: dense
# parameters only (SASRec's layers; MF and LightGCN have none).
REPRODUCTION_DEFAULTS = {
    "mf": {"embedding_dim": 256, "learning_rate": 3e-3, "embedding_l2": 5e-2, "weight_decay": 0.0, "batch_size": 1024},
    "lightgcn": {"embedding_dim": 64, "learning_rate": 1e-3, "embedding_l2": 1e-3, "weight_decay": 0.0, "batch_size": 1024},
    "sasrec": {"embedding_dim": 64, "learning_rate": 1e-3, "embedding_l2": 0.2, "weight_decay": 1e-3, "batch_size": 1024},
}
GRID_KEYS = ("embedding_dim", "learning_rate", "embedding_l2", "weight_decay", "batch_size", "num_layers", "dropout", "num_blocks")


def _per_model_default(name: str) -> str:
    """'unset (None) = the model's default: mf 256, lightgcn 64, sasrec 64', from REPRODUCTION_DEFAULTS."""
    values = ", ".join(f"{model_type} {REPRODUCTION_DEFAULTS[model_type][name]:g}" for model_type in MODEL_TYPES)
    return f"Unset (None) takes the model's default: {values}."


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
    embedding_dim: int | None = field(default=None, metadata={"help": "Table / hidden size. " + _per_model_default("embedding_dim")})
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
    learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate (SparseAdam for looked-up tables, Adam for the rest). " + _per_model_default("learning_rate")}
    )
    embedding_l2: float | None = field(
        default=None,
        metadata={"help": "L2 on the embedding rows each batch looks up (users, target items, SASRec history items): "
                  "coefficient x sum of their squared norms / batch rows. Rows outside the batch are not touched. "
                  + _per_model_default("embedding_l2")},
    )
    weight_decay: float | None = field(
        default=None,
        metadata={"help": "Adam(W) weight decay on dense parameters only (SASRec's attention, feed-forward, norm and position "
                  "weights); MF and LightGCN have none (a non-zero value is an error). " + _per_model_default("weight_decay")},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size. " + _per_model_default("batch_size")})
    optimizer: Literal["adam", "adamw"] = field(
        default="adam", metadata={"help": "Optimizer of the dense parameters: 'adam' (L2 in the gradient) or 'adamw' (decoupled)."}
    )
    max_epochs: int = field(default=200, metadata={"help": "Upper bound on epochs; early stopping usually ends sooner."})
    patience: int = field(default=10, metadata={"help": "Stop after this many epochs without a better validation AUC."})
    chance_epochs: int = field(
        default=3,
        metadata={"help": "Stop with an error, saving nothing, when validation AUC stays within 0.01 of 0.5 for each of the "
                  "first chance_epochs epochs (the settings do not let the encoder learn). 0 = never."},
    )
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
        if self.chance_epochs < 0:
            raise InputError(f"chance_epochs must be >= 0, found {self.chance_epochs}")
        for name in ("learning_rate", "embedding_l2", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (name == "learning_rate" and value == 0)):
                raise InputError(f"{name} must be {'> 0' if name == 'learning_rate' else '>= 0'}, found {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, found {self.batch_size}")
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

    def pick(name):
        value = getattr(training_args, name)
        return defaults[name] if value is None else value

    return FitConfig(
        learning_rate=pick("learning_rate"),
        embedding_l2=pick("embedding_l2"),
        weight_decay=pick("weight_decay"),
        batch_size=pick("batch_size"),
        max_epochs=training_args.max_epochs,
        patience=training_args.patience,
        optimizer=training_args.optimizer,
        seed=training_args.seed,
        eval_batch_size=training_args.eval_batch_size,
        chance_epochs=training_args.chance_epochs,
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
    best, grid_results, at_chance = None, [], []
    settings = _grid_settings(training_args.grid)
    for setting in settings:
        run_model_args = replace(model_args, **{key: value for key, value in setting.items() if hasattr(model_args, key)})
        fit_config = replace(base_fit, **{key: value for key, value in setting.items() if hasattr(base_fit, key)})
        set_seed(fit_config.seed)
        model = build_model(
            run_model_args.model_type, num_users, num_items, run_model_args.embedding_dim, splits["train"],
            num_layers=run_model_args.num_layers, num_blocks=run_model_args.num_blocks,
            num_heads=run_model_args.num_heads, max_len=run_model_args.max_len, dropout=run_model_args.dropout,
        )
        try:
            fit = train_pointwise(model, splits["train"], splits["validation"], fit_config)
        except EncoderAtChanceError as error:
            if len(settings) == 1:
                raise
            # In a grid, a setting that does not learn is reported and skipped; all of them failing is an error.
            logger.warning("setting %s: %s", setting, error)
            at_chance.append((setting, error))
            grid_results.append({**setting, "valid_auc": max(error.valid_auc_history, default=0.5), "stopped": "validation AUC at chance"})
            continue
        logger.info("setting %s: valid AUC %.4f (epoch %d), %.1fs", setting, fit.best_valid_auc, fit.best_epoch, fit.train_seconds)
        grid_results.append({**setting, "valid_auc": fit.best_valid_auc, "best_epoch": fit.best_epoch, "train_seconds": fit.train_seconds})
        if best is None or fit.best_valid_auc > best[3].best_valid_auc:
            best = (model, run_model_args, fit_config, fit)
    if best is None:
        raise EncoderAtChanceError(
            f"every grid setting stayed at chance ({[setting for setting, _ in at_chance]}); the last one: {at_chance[-1][1]}"
        )
    model, run_model_args, fit_config, fit = best
    # Ids absent from train kept their random initial rows: zero them ("no information") before
    # scoring and saving, so metrics, predictions and the checkpoint describe the same tables.
    zeroed = zero_untrained_rows(model, splits["train"])
    logger.info("rows of ids absent from train set to zero: %s", zeroed)
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
    check_not_inside(training_args.output_dir, [data_args.records_dir])
    try:
        # One run per folder; its files are staged and moved in together, so a stopped run leaves the earlier one whole.
        with output_lock(training_args.output_dir, "train_collaborative.py"):
            folder = RunFolder(training_args.output_dir, owner="train_collaborative")
            folder.begin()
            try:
                outcome = _train_and_save(model_args, data_args, training_args, folder.staging)
            except BaseException:
                folder.discard()
                raise
            folder.publish()
            logger.info("saved checkpoint and predictions to %s", training_args.output_dir)
            return outcome
    finally:
        torch.set_num_threads(previous_threads)


def _train_and_save(model_args, data_args, training_args, output_dir) -> TrainingOutcome:
    """Train, evaluate and write the checkpoint, metrics and test predictions into `output_dir`."""
    records = load_prepared(data_args.records_dir)
    frames, metadata = records.splits, records.metadata
    outcome = train_and_evaluate(frames, int(metadata["num_users"]), int(metadata["num_items"]), model_args, training_args)
    print(summary_table(outcome.valid_metrics, outcome.test_metrics))
    print(f"train seconds: {outcome.fit.train_seconds:.1f} (best epoch {outcome.fit.best_epoch} of {outcome.fit.epochs_run})")

    test_frame = frames["test"]
    predictions = pd.DataFrame({
        "UserID": test_frame["UserID"].to_numpy(),
        "TargetItemID": test_frame["TargetItemID"].to_numpy(),
        "label": test_frame["label"].to_numpy(),
        "score": outcome.test_scores,
        "not_cold": outcome.test_not_cold,
    })
    atomic_write(os.path.join(output_dir, "test_predictions.parquet"), lambda temp: predictions.to_parquet(temp, index=False))
    results = {
        "valid": outcome.valid_metrics,
        "test": outcome.test_metrics,
        "best_epoch": outcome.fit.best_epoch,
        "train_seconds": outcome.fit.train_seconds,
        "grid_results": outcome.grid_results,
    }
    write_json(results, os.path.join(output_dir, "metrics.json"))
    hyper_parameters = {**asdict(outcome.model_args), **asdict(outcome.fit_config)}
    checkpoint_config = {
        "hyper_parameters": hyper_parameters,
        "metrics": {f"valid/{key}": value for key, value in outcome.valid_metrics.items() if "@" not in key}
        | {f"test/{key}": value for key, value in outcome.test_metrics.items() if "@" not in key},
        "records_dir": data_args.records_dir,
        "records_fingerprint": records_fingerprint(metadata),
        "source": metadata.get("source"),
    }
    checkpoint = checkpoint_from_model(outcome.model, num_users=int(metadata["num_users"]), config=checkpoint_config)
    save_cf_checkpoint(checkpoint, str(output_dir))
    return outcome


if __name__ == "__main__":
    run_command(main)
