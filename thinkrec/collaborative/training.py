"""Pointwise BCE training shared by MF, LightGCN and SASRec: data tensors, loop, batch scoring.

Regularisation and updates scale with the rows a batch reads, not with the size of the tables
(the CoLLM / RecBole way): the loss carries ``embedding_l2 * (sum of squared norms of the embedding
rows the batch looks up) / batch rows``, and tables whose rows are looked up (MF's user and item
tables, SASRec's item table) get sparse gradients and :class:`torch.optim.SparseAdam`, so a row
that is in no batch is never changed. LightGCN's propagation reads every row of both tables at
every step, so its gradients are dense by nature and its tables use Adam (without weight decay);
the L2 term still covers only the batch's layer-0 rows. ``weight_decay`` applies to dense
parameters only (SASRec's attention, feed-forward, norm and position weights).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from thinkrec.collaborative.models import PADDING_ID, LightGCN, MatrixFactorization, SASRec
from thinkrec.evaluation.metrics import roc_auc
from thinkrec.utils.errors import InputError


logger = logging.getLogger(__name__)


@dataclass
class InteractionSplit:
    """One split as tensors; ``history_ids`` [N, max_len] is left-padded (SASRec input) or None."""

    name: str
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    labels: torch.Tensor
    not_cold: torch.Tensor
    history_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def history_matrix(histories: Sequence, history_labels: Sequence | None, max_len: int) -> torch.Tensor:
    """Left-padded [N, max_len] matrix of each row's last ``max_len`` positive history items.

    ``histories`` holds one id list per row (oldest first); when ``history_labels`` is given only
    items labelled 1 are kept.
    """
    num_rows = len(histories)
    lengths = np.fromiter((len(history) for history in histories), dtype=np.int64, count=num_rows)
    matrix = np.zeros((num_rows, max_len), dtype=np.int64)
    if lengths.sum() == 0:
        return torch.from_numpy(matrix)
    flat_items = np.concatenate([np.asarray(history, dtype=np.int64) for history in histories])
    row_of = np.repeat(np.arange(num_rows), lengths)
    if history_labels is not None:
        flat_labels = np.concatenate([np.asarray(labels, dtype=np.int64) for labels in history_labels])
        if len(flat_labels) != len(flat_items):
            raise ValueError(
                f"HisItemLabels has {len(flat_labels)} entries in total but HisItemIDs has {len(flat_items)}; "
                "they must be aligned row by row"
            )
        keep = flat_labels == 1
        flat_items, row_of = flat_items[keep], row_of[keep]
    kept_per_row = np.bincount(row_of, minlength=num_rows)
    row_start = np.cumsum(kept_per_row) - kept_per_row
    position_from_end = kept_per_row[row_of] - 1 - (np.arange(len(flat_items)) - row_start[row_of])
    recent = position_from_end < max_len
    matrix[row_of[recent], max_len - 1 - position_from_end[recent]] = flat_items[recent]
    return torch.from_numpy(matrix)


def split_from_records(frame: pd.DataFrame, name: str, max_len: int | None = None) -> InteractionSplit:
    """Tensors from a prepared-records split (docs/records.md); histories only when ``max_len`` is set."""
    required = ["UserID", "TargetItemID", "label"] + (["HisItemIDs"] if max_len else [])
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"split {name!r}: missing column(s) {missing}; found {list(frame.columns)}")
    not_cold = frame["not_cold"].to_numpy(np.int64) if "not_cold" in frame else np.ones(len(frame), np.int64)
    history_ids = None
    if max_len:
        history_labels = frame["HisItemLabels"].tolist() if "HisItemLabels" in frame else None
        history_ids = history_matrix(frame["HisItemIDs"].tolist(), history_labels, max_len)
    return InteractionSplit(
        name=name,
        user_ids=torch.tensor(frame["UserID"].to_numpy(np.int64)),
        item_ids=torch.tensor(frame["TargetItemID"].to_numpy(np.int64)),
        labels=torch.tensor(frame["label"].to_numpy(np.float32)),
        not_cold=torch.tensor(not_cold),
        history_ids=history_ids,
    )


def check_split(split: InteractionSplit, num_users: int, num_items: int) -> None:
    """Raise ValueError for an empty split, a single class, or ids outside the tables."""
    if len(split) == 0:
        raise ValueError(f"{split.name} split is empty: training and early stopping on AUC need rows")
    for column, ids, size in (
        ("UserID", split.user_ids, num_users),
        ("TargetItemID", split.item_ids, num_items),
        ("HisItemIDs", split.history_ids, num_items),
    ):
        if ids is None or ids.numel() == 0:
            continue
        largest, smallest = int(ids.max()), int(ids.min())
        if largest >= size or smallest < 0:
            raise ValueError(
                f"{split.name} split, column {column}: ids must be in 0..{size - 1} (table of {size} rows); "
                f"found min {smallest}, max {largest}"
            )
    if bool((split.user_ids == PADDING_ID).any()) or bool((split.item_ids == PADDING_ID).any()):
        row = int(torch.nonzero((split.user_ids == PADDING_ID) | (split.item_ids == PADDING_ID))[0])
        raise ValueError(f"{split.name} split, row {row}: UserID/TargetItemID 0 is the padding id, not a real id")
    positives = int(split.labels.sum())
    if positives in (0, len(split)):
        raise ValueError(
            f"{split.name} split: column 'label' has one class only ({positives} positive of {len(split)} rows); "
            "AUC and BCE training need both 0 and 1"
        )


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    model_type: str,
    num_users: int,
    num_items: int,
    embedding_dim: int,
    train: InteractionSplit | None = None,
    num_layers: int = 2,
    num_blocks: int = 2,
    num_heads: int = 1,
    max_len: int = 25,
    dropout: float = 0.2,
) -> nn.Module:
    """A fresh encoder; LightGCN gets its graph from the positive rows of ``train``."""
    if model_type == "mf":
        return MatrixFactorization(num_users, num_items, embedding_dim)
    if model_type == "lightgcn":
        if train is None:
            raise ValueError("LightGCN needs the train split to build its interaction graph")
        model = LightGCN(num_users, num_items, embedding_dim, num_layers=num_layers)
        positive = train.labels > 0.5
        model.set_graph(train.user_ids[positive], train.item_ids[positive])
        return model
    if model_type == "sasrec":
        return SASRec(num_items, hidden_size=embedding_dim, num_blocks=num_blocks, num_heads=num_heads, max_len=max_len, dropout=dropout)
    raise ValueError(f"model_type must be 'mf', 'lightgcn' or 'sasrec', found {model_type!r}")


def batch_logits(model: nn.Module, split: InteractionSplit, index: torch.Tensor) -> torch.Tensor:
    """Logits of the rows ``index`` of ``split`` (training path: LightGCN propagates here)."""
    if isinstance(model, SASRec):
        if split.history_ids is None:
            raise ValueError(f"{split.name} split has no history_ids; SASRec needs them (set max_len when loading)")
        return model(split.history_ids[index], split.item_ids[index])
    return model(split.user_ids[index], split.item_ids[index])


@torch.no_grad()
def score_split(model: nn.Module, split: InteractionSplit, batch_size: int = 8192) -> np.ndarray:
    """Logits for every row of ``split``, batched; tables (LightGCN propagation) computed once."""
    was_training = model.training
    model.eval()
    scores = []
    if isinstance(model, SASRec):
        for start in range(0, len(split), batch_size):
            index = torch.arange(start, min(start + batch_size, len(split)))
            scores.append(batch_logits(model, split, index))
    else:
        user_table, item_table = model.tables()
        for start in range(0, len(split), batch_size):
            users = split.user_ids[start : start + batch_size]
            items = split.item_ids[start : start + batch_size]
            scores.append((user_table[users] * item_table[items]).sum(-1))
    model.train(was_training)
    return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


@dataclass
class FitConfig:
    """Optimisation settings for :func:`train_pointwise`.

    ``embedding_l2``: coefficient of the L2 term on the embedding rows each batch looks up (summed,
    divided by the batch's rows). ``weight_decay``: Adam(W) weight decay on dense parameters only
    (SASRec's layers); MF and LightGCN have none, and a non-zero value for them is an error.
    ``chance_epochs``: stop with :class:`EncoderAtChanceError` when validation AUC stays within
    ``chance_margin`` of 0.5 for each of the first ``chance_epochs`` epochs (0 turns the check off).
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 200
    patience: int = 10
    optimizer: str = "adam"
    seed: int = 42
    eval_batch_size: int = 8192
    embedding_l2: float = 0.0
    chance_epochs: int = 3
    chance_margin: float = 0.01


@dataclass
class FitResult:
    """What training found: best validation AUC and when, epochs run, wall-clock seconds.

    ``train_seconds`` covers the whole fit (validation scoring included); ``epoch_seconds`` holds
    each epoch's optimisation time alone, ``loss_history`` each epoch's mean train BCE (L2 term excluded).
    """

    best_valid_auc: float
    best_epoch: int
    epochs_run: int
    train_seconds: float
    valid_auc_history: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    loss_history: list[float] = field(default_factory=list)


class EncoderAtChanceError(InputError):
    """Validation AUC stayed at chance for the first epochs: the settings do not let the encoder learn."""

    def __init__(self, message: str, valid_auc_history: list[float] | None = None):
        super().__init__(message)
        self.valid_auc_history = list(valid_auc_history or [])


def sparse_tables(model: nn.Module) -> list[nn.Embedding]:
    """The embedding tables that only batch rows should touch (sparse gradients, SparseAdam).

    LightGCN has none: its propagation reads whole tables, so every row connected to a batch row
    in the graph gets a gradient.
    """
    if isinstance(model, MatrixFactorization):
        return [model.user_embedding, model.item_embedding]
    if isinstance(model, SASRec):
        return [model.item_embedding]
    return []


def _has_dense_weights(model: nn.Module) -> bool:
    return isinstance(model, SASRec)


def _optimizer(model: nn.Module, config: FitConfig) -> list[torch.optim.Optimizer]:
    """SparseAdam over the tables of :func:`sparse_tables`, Adam / AdamW over every other parameter.

    Weight decay goes to the dense parameters of SASRec only; the tables are regularised by the
    batch-row L2 term of the loss instead.
    """
    if config.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', found {config.optimizer!r}")
    if config.weight_decay and not _has_dense_weights(model):
        raise InputError(
            f"weight_decay={config.weight_decay:g} has nothing to act on: {type(model).__name__} has only embedding "
            "tables, which are regularised through embedding_l2 (the L2 term on the rows of each batch). "
            "Set weight_decay to 0 and use embedding_l2."
        )
    sparse_ids = {id(table.weight) for table in sparse_tables(model)}
    sparse = [parameter for parameter in model.parameters() if id(parameter) in sparse_ids]
    dense = [parameter for parameter in model.parameters() if id(parameter) not in sparse_ids]
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))
    if dense:
        # LightGCN's tables are dense parameters with no decay (weight_decay is 0 for it, checked above).
        dense_type = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        optimizers.append(dense_type(dense, lr=config.learning_rate, weight_decay=config.weight_decay))
    return optimizers


def batch_embedding_penalty(model: nn.Module, split: InteractionSplit, index: torch.Tensor) -> torch.Tensor:
    """Sum of the squared L2 norms of the embedding rows the batch ``index`` looks up.

    MF and LightGCN: the users' and target items' (layer-0) rows; SASRec: the target items' rows and
    the history items' rows (padding rows are zero). Repeated rows count once per occurrence.
    """
    if isinstance(model, SASRec):
        history = split.history_ids[index][:, -model.max_len :]
        rows = (model.item_embedding(history), model.item_embedding(split.item_ids[index]))
    else:
        rows = (model.user_embedding(split.user_ids[index]), model.item_embedding(split.item_ids[index]))
    return sum(table_rows.pow(2).sum() for table_rows in rows)


@torch.no_grad()
def zero_untrained_rows(model: nn.Module, train: InteractionSplit) -> dict[str, int]:
    """Set to zero the table rows of ids that never occur in ``train``; return how many per table.

    Training never reads those rows, so they still hold their random initial values. As vectors for
    the LLM (a user or item unseen in training) zero says "no information", as the padding row does;
    whole-table weight decay used to drive them to ~0 as a side effect. MF/LightGCN: user ids and
    target item ids; SASRec: target and history item ids.
    """
    if isinstance(model, SASRec):
        history = train.history_ids if train.history_ids is not None else torch.zeros(0, dtype=torch.long)
        tables = {"item_embedding": (model.item_embedding.weight, torch.cat([train.item_ids, history.flatten()]))}
    else:
        tables = {
            "user_embedding": (model.user_embedding.weight, train.user_ids),
            "item_embedding": (model.item_embedding.weight, train.item_ids),
        }
    zeroed = {}
    for name, (weight, ids) in tables.items():
        untrained = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        untrained[ids.to(weight.device)] = False
        untrained[PADDING_ID] = False
        weight[untrained] = 0.0
        zeroed[name] = int(untrained.sum())
    return zeroed


def _at_chance_message(model: nn.Module, config: FitConfig, history: list[float], losses: list[float]) -> str:
    model_name = {MatrixFactorization: "mf", LightGCN: "lightgcn", SASRec: "sasrec"}.get(type(model), type(model).__name__)
    dimension = getattr(model, "embedding_dim", None) or getattr(model, "hidden_size", None)
    aucs = ", ".join(f"{auc:.4f}" for auc in history)
    loss_text = f"; mean train BCE {losses[-1]:.4f}" + (" (ln 2 = 0.6931: the scores carry nothing)" if abs(losses[-1] - math.log(2)) < 2e-3 else "")
    return (
        f"the {model_name} encoder is not learning: validation AUC stayed within {config.chance_margin:g} of 0.5 for "
        f"the first {len(history)} epoch(s) ({aucs}{loss_text}), so training stops and no checkpoint is saved. "
        f"Change the settings: learning_rate (now {config.learning_rate:g}; try 3-10x higher), "
        f"embedding_l2 (now {config.embedding_l2:g}) and weight_decay (now {config.weight_decay:g}) (try lower or 0), "
        f"batch_size (now {config.batch_size}; try smaller), embedding_dim (now {dimension}; try 64). "
        "If the data itself has no signal (labels independent of users and items), no setting will help. "
        "chance_epochs 0 turns this check off."
    )


def train_pointwise(model: nn.Module, train: InteractionSplit, validation: InteractionSplit, config: FitConfig) -> FitResult:
    """Train with BCE on labels (+ the batch-row L2 term); keep the weights of the best validation-AUC
    epoch (early stopping).

    Raises FloatingPointError on a non-finite loss, naming the step and the learning rate, and
    :class:`EncoderAtChanceError` when validation AUC stays at chance for the first
    ``config.chance_epochs`` epochs (or for every epoch, when fewer are run).
    """
    num_users = getattr(model, "num_users", None)
    for split in (train, validation):
        check_split(split, num_users if num_users is not None else int(split.user_ids.max()) + 1, model.num_items)
    if isinstance(model, SASRec) and train.history_ids is None:
        raise ValueError(f"{train.name} split has no history_ids; SASRec needs them (set max_len when loading)")
    generator = torch.Generator().manual_seed(config.seed)
    tables = sparse_tables(model)
    was_sparse = [table.sparse for table in tables]
    for table in tables:
        table.sparse = True  # gradients only for the rows looked up; restored below
    try:
        optimizers = _optimizer(model, config)
        return _fit(model, train, validation, config, optimizers, generator)
    finally:
        for table, sparse in zip(tables, was_sparse):
            table.sparse = sparse


def _fit(model, train, validation, config, optimizers, generator) -> FitResult:
    best_auc, best_epoch, best_state = -math.inf, 0, None
    history: list[float] = []
    epoch_seconds: list[float] = []
    losses: list[float] = []
    step = 0
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        epoch_started = time.perf_counter()
        loss_sum, batches = 0.0, 0
        for index in torch.randperm(len(train), generator=generator).split(config.batch_size):
            step += 1
            bce = F.binary_cross_entropy_with_logits(batch_logits(model, train, index), train.labels[index])
            loss = bce
            if config.embedding_l2:
                loss = bce + config.embedding_l2 * batch_embedding_penalty(model, train, index) / len(index)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {step} (epoch {epoch}) with learning rate "
                    f"{config.learning_rate:g}; lower the learning rate"
                )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            loss_sum += bce.item()
            batches += 1
        epoch_seconds.append(time.perf_counter() - epoch_started)
        losses.append(loss_sum / max(batches, 1))
        valid_auc = roc_auc(validation.labels.numpy(), score_split(model, validation, config.eval_batch_size))
        history.append(valid_auc)
        logger.info("epoch %d: mean train BCE %.4f, valid AUC %.4f, %.1fs", epoch, losses[-1], valid_auc, epoch_seconds[-1])
        if valid_auc > best_auc:
            best_auc, best_epoch = valid_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
        stopping = epoch - best_epoch >= config.patience or epoch == config.max_epochs
        if config.chance_epochs and (epoch == config.chance_epochs or (stopping and epoch < config.chance_epochs)):
            if all(abs(auc - 0.5) < config.chance_margin for auc in history):
                raise EncoderAtChanceError(_at_chance_message(model, config, history, losses), history)
        if stopping:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        best_valid_auc=float(best_auc),
        best_epoch=best_epoch,
        epochs_run=epoch,
        train_seconds=time.perf_counter() - started,
        valid_auc_history=history,
        epoch_seconds=epoch_seconds,
        loss_history=losses,
    )
