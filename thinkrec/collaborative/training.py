"""Pointwise BCE training shared by MF, LightGCN and SASRec: data tensors, loop, batch scoring."""

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
    """Optimisation settings for :func:`train_pointwise`."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 1024
    max_epochs: int = 200
    patience: int = 10
    optimizer: str = "adam"
    seed: int = 42
    eval_batch_size: int = 8192


@dataclass
class FitResult:
    """What training found: best validation AUC and when, epochs run, wall-clock seconds."""

    best_valid_auc: float
    best_epoch: int
    epochs_run: int
    train_seconds: float
    valid_auc_history: list[float] = field(default_factory=list)


def _optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'adamw', found {config.optimizer!r}")


def train_pointwise(model: nn.Module, train: InteractionSplit, validation: InteractionSplit, config: FitConfig) -> FitResult:
    """Train with BCE on labels; keep the weights of the best validation-AUC epoch (early stopping).

    Raises FloatingPointError on a non-finite loss, naming the step and the learning rate.
    """
    num_users = getattr(model, "num_users", None)
    for split in (train, validation):
        check_split(split, num_users if num_users is not None else int(split.user_ids.max()) + 1, model.num_items)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(model, config)
    best_auc, best_epoch, best_state = -math.inf, 0, None
    history: list[float] = []
    step = 0
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for index in torch.randperm(len(train), generator=generator).split(config.batch_size):
            step += 1
            loss = F.binary_cross_entropy_with_logits(batch_logits(model, train, index), train.labels[index])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {step} (epoch {epoch}) with learning rate "
                    f"{config.learning_rate:g}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        valid_auc = roc_auc(validation.labels.numpy(), score_split(model, validation, config.eval_batch_size))
        history.append(valid_auc)
        logger.info("epoch %d: loss %.4f, valid AUC %.4f", epoch, loss.item(), valid_auc)
        if valid_auc > best_auc:
            best_auc, best_epoch = valid_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= config.patience:
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
    )
