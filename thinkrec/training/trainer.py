"""The Trainer pieces ThinkRec needs: loss-part logging, score-only evaluation, metrics from scores,
and per-row interleaving of reasoning and recommendation rows."""

from __future__ import annotations

import math
import os
from typing import Optional

import datasets
import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import EvalPrediction, Trainer
from transformers.utils import logging

from prefix_thinkrec import common_length
from thinkrec.evaluation.metrics import compute_metrics
from thinkrec.training.loading import check_safetensors


logger = logging.get_logger(__name__)


class ThinkRecTrainer(Trainer):
    """`Trainer` that logs the BCE and LM parts of the mixed loss and evaluates from per-row scores.

    Evaluation never gathers vocabulary logits: `prediction_step` returns the per-row score logits
    (one float per row) and the 0/1 targets; `compute_metrics` turns them into AUC / UAUC / NDCG.
    Tokenised evaluation rows (`prompt_length` / `answer_length` columns) are scored longest first, so a
    batch holds rows of similar length; predictions come back, and metrics see them, in dataset order.
    The model sets `accepts_loss_kwargs = False`, so gradient accumulation divides its per-batch
    mean loss by the number of accumulation steps (tests/test_modeling.py proves the equivalence).

    `prediction_fields` names the per-row outputs a prediction returns: ("scores",) by default; with
    more (e.g. "cf_scores", "routing_weights"), predictions are a dict of the ones the model returns,
    computed in the model's forward on every rank and gathered like the scores.
    """

    prediction_fields: tuple[str, ...] = ("scores",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_part_sums = {"bce_loss": 0.0, "lm_loss": 0.0}
        self._loss_part_count = 0
        self._eval_orders: dict = {}

    def _load_trained_weights_from(self, folder: str) -> bool:
        """Apply a small checkpoint's trained weights (thinkrec_weights.safetensors) if `folder` has one."""
        from modeling_thinkrec import TRAINED_WEIGHTS_NAME

        if not os.path.isfile(os.path.join(folder, TRAINED_WEIGHTS_NAME)) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        check_safetensors(os.path.join(folder, TRAINED_WEIGHTS_NAME))
        self.accelerator.unwrap_model(self.model).load_trained_weights(folder)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Checkpoints hold only what the base does not: resume applies them to the model in place.
        if model is None and self._load_trained_weights_from(resume_from_checkpoint):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self):
        if not self._load_trained_weights_from(self.state.best_model_checkpoint):
            super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            # Averaged over the logging window and reported next to the total loss.
            self._loss_part_sums["bce_loss"] += float(outputs.bce_loss.detach().mean())
            self._loss_part_sums["lm_loss"] += float(outputs.lm_loss.detach().mean())
            self._loss_part_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._loss_part_count:
            for name, total in self._loss_part_sums.items():
                logs[name] = round(total / self._loss_part_count, 4)
            self._loss_part_sums = dict.fromkeys(self._loss_part_sums, 0.0)
            self._loss_part_count = 0
        super().log(logs, start_time)

    @property
    def shares_prefixes(self) -> bool:
        """Whether evaluation and prediction score rows from shared prompt prefixes (see prefix_thinkrec.py)."""
        return bool(getattr(self.args, "shared_prefix_scoring", False))

    def _eval_order(self, dataset) -> Optional[np.ndarray]:
        """The evaluation order of `dataset`, computed once per dataset (the sampler and the evaluation loop
        both need it, at every evaluation)."""
        key = (getattr(dataset, "_fingerprint", None), self.shares_prefixes)
        if key[0] is None:
            return prefix_order(dataset) if self.shares_prefixes else length_order(dataset)
        if key not in self._eval_orders:
            self._eval_orders[key] = prefix_order(dataset) if self.shares_prefixes else length_order(dataset)
        return self._eval_orders[key]

    def _get_eval_sampler(self, eval_dataset):
        order = self._eval_order(eval_dataset)
        return LengthSortedSampler(order) if order is not None else super()._get_eval_sampler(eval_dataset)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        # The sampler's order, recomputed from the same columns: a cached dataloader keeps its sampler.
        order = self._eval_order(getattr(dataloader, "dataset", None))
        if order is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        restore = np.argsort(order, kind="stable")
        compute_metrics = self.compute_metrics
        if compute_metrics is not None:
            self.compute_metrics = lambda prediction: compute_metrics(EvalPrediction(
                predictions=_in_dataset_order(prediction.predictions, restore),
                label_ids=_in_dataset_order(prediction.label_ids, restore),
                inputs=prediction.inputs,
                losses=prediction.losses,
            ))
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics
        return output._replace(predictions=_in_dataset_order(output.predictions, restore),
                               label_ids=_in_dataset_order(output.label_ids, restore))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        extra = not prediction_loss_only and self.prediction_fields != ("scores",)
        if extra and "cf_scores" in self.prediction_fields and self.accelerator.unwrap_model(model).config.cf_model_type != "none":
            inputs = {**inputs, "return_cf_scores": True}
        if self.shares_prefixes and not prediction_loss_only:
            # Scores only (no eval loss): the rows' shared prompt prefixes are encoded once.
            inputs = {**inputs, "shared_prefix": True}
        with torch.no_grad():
            outputs = model(**inputs)
        loss = outputs.loss.detach() if outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        if extra:
            predictions = {name: outputs[name].detach().float() for name in self.prediction_fields if outputs.get(name) is not None}
        else:
            predictions = outputs.scores.detach().float()
        return loss, predictions, inputs["target_labels"].detach().float()


class LengthSortedSampler(Sampler):
    """Yields the given row order (evaluation rows sorted by length: batches of similar rows pad less)."""

    def __init__(self, order: np.ndarray):
        self.order = order

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


def length_order(dataset) -> Optional[np.ndarray]:
    """Rows of a tokenised dataset by prompt length, then answer length, longest first (ties keep their
    order); None for a dataset without those columns (raw records)."""
    if not isinstance(dataset, datasets.Dataset) or not {"prompt_length", "answer_length"} <= set(dataset.column_names):
        return None
    prompt_length = np.asarray(dataset["prompt_length"], dtype=np.int64)
    answer_length = np.asarray(dataset["answer_length"], dtype=np.int64)
    return np.lexsort((-answer_length, -prompt_length))


def prefix_order(dataset) -> Optional[np.ndarray]:
    """Rows of a tokenised dataset in token order of their prompts, so that rows sharing a prompt prefix
    (a user's candidates) fall into one batch and are scored from one encoding of it; None for raw
    records. Logs how much of the prompts neighbouring rows share."""
    if not isinstance(dataset, datasets.Dataset) or "prompt_ids" not in dataset.column_names:
        return None
    prompts = dataset["prompt_ids"]
    order = np.array(sorted(range(len(prompts)), key=prompts.__getitem__), dtype=np.int64)
    if len(prompts):
        total = sum(len(prompt) for prompt in prompts)
        shared = sum(common_length(prompts[a], prompts[b]) for a, b in zip(order[:-1], order[1:]))
        share = shared / max(total, 1)
        logger.info("shared-prefix scoring: %d rows, %.0f%% of their prompt tokens repeat the row before them "
                    "(at most %.1fx fewer tokens to encode than scoring each prompt).", len(prompts), 100 * share,
                    1 / max(1 - share, 1e-9))
        if share < 0.2:
            logger.warning("shared-prefix scoring: these rows share little of their prompts (%.0f%%); does the template "
                           "put target text before the user's history? Scores stay exact, but near per-row speed.", 100 * share)
    return order


def _in_dataset_order(values, restore: np.ndarray):
    """Per-row arrays gathered in sampler order, put back in dataset order (other values as they are)."""
    if isinstance(values, dict):
        return {name: _in_dataset_order(value, restore) for name, value in values.items()}
    if isinstance(values, np.ndarray) and values.ndim >= 1 and len(values) == len(restore):
        return values[restore]
    return values


# What evaluation during training logs; the full table (every k, counts) is written at predict time.
LOGGED_METRICS = ("auc", "uauc", "gauc", "ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "map@5",
                  "warm/auc", "warm/uauc", "cold/auc", "cold/uauc", "n_rows")
# The names Trainer logs them under (eval_<name>): metric_for_best_model must be one of these.
REPORTED_METRICS = {name: name.replace("@", "_at_").replace("/", "_") for name in LOGGED_METRICS}


def metrics_for(dataset: datasets.Dataset, ks=(1, 3, 5, 10)):
    """A `compute_metrics` for Trainer bound to one evaluation dataset (its user ids and cold flags).

    Trainer keeps the dataset order when it gathers predictions (also across ranks, after dropping
    the padding of the last batch), so row i of the predictions is row i of `dataset`.
    """
    user_ids = np.asarray(dataset["UserID"])
    not_cold = np.asarray(dataset["not_cold"]) if "not_cold" in dataset.column_names else None
    labels = np.asarray(dataset["label"], dtype=np.float64)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions
        scores = np.asarray(predictions["scores"] if isinstance(predictions, dict) else predictions, dtype=np.float64).reshape(-1)
        targets = np.asarray(prediction.label_ids, dtype=np.float64).reshape(-1)
        if len(scores) != len(user_ids):
            raise ValueError(f"evaluation returned {len(scores)} scores for {len(user_ids)} rows.")
        if not np.array_equal(targets, labels):
            raise ValueError("evaluation rows came back in another order than the dataset's; metrics would be wrong.")
        metrics = compute_metrics(user_ids, labels, scores, not_cold=not_cold, ks=ks)
        return {
            REPORTED_METRICS[name]: metrics[name]
            for name in LOGGED_METRICS
            if name in metrics and not _is_nan(metrics[name])
        }

    return compute


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def interleave_reasoning_rows(
    rec_rows: datasets.Dataset,
    reason_rows: Optional[datasets.Dataset],
    reasoning_share: float,
    seed: int,
) -> datasets.Dataset:
    """Mix reasoning rows into recommendation rows row by row: each position holds a reasoning row with
    probability `reasoning_share` (the published 0.2), until every recommendation row is used once.
    Reasoning rows cycle through a shuffled order, so they are reused when there are too few."""
    if reason_rows is None or len(reason_rows) == 0 or reasoning_share <= 0:
        return rec_rows
    if not 0 < reasoning_share < 1:
        raise ValueError(f"reasoning_share must be in [0, 1), got {reasoning_share}.")
    columns = [c for c in rec_rows.column_names if c in reason_rows.column_names]
    missing = sorted(set(rec_rows.column_names) - set(columns))
    if missing:
        raise ValueError(f"reasoning rows lack the record column(s) {missing} that recommendation rows have.")
    rec_rows = rec_rows.select_columns(columns)
    reason_rows = reason_rows.select_columns(columns).cast(rec_rows.features)
    rng = np.random.default_rng(seed)
    n_rec = len(rec_rows)
    # Enough Bernoulli draws to place every recommendation row (with a wide margin), then cut there.
    draws = rng.random(int(n_rec / (1 - reasoning_share) * 1.5) + 64) < reasoning_share
    end = int(np.searchsorted(np.cumsum(~draws), n_rec)) + 1
    is_reason = draws[:end]
    n_reason = int(is_reason.sum())
    cycle = np.concatenate([rng.permutation(len(reason_rows)) for _ in range(n_reason // len(reason_rows) + 1)])[:n_reason]
    order = np.empty(end, dtype=np.int64)
    order[~is_reason] = np.arange(n_rec)
    order[is_reason] = n_rec + cycle
    return datasets.concatenate_datasets([rec_rows, reason_rows]).select(order)
