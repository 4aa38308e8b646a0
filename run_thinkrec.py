#!/usr/bin/env python
"""Train, evaluate, predict and publish a ThinkRec recommender.

    accelerate launch run_thinkrec.py args.json            # one .json file with every argument
    accelerate launch run_thinkrec.py args.json --learning_rate 5e-4   # the file, flags override it
    accelerate launch run_thinkrec.py --records_dir ... --output_dir ... --stage lora --do_train

Stages are configuration, each starting from the previous stage's output directory
(`init_from`): `lora` trains a LoRA adapter on text-only prompts (TALLRec-style, stage 1),
`projector` trains the projector that turns collaborative vectors into soft tokens with the LoRA
frozen (CoLLM-style, stage 2), `joint` trains both, `experts` clusters the training users by their
CF vectors and turns the LoRA of the last layers into one expert per cluster plus a general expert,
all trained in one run and mixed per row (stage 3). Reasoning rows (`mode="reason"`) are mixed
into the recommendation rows row by row at `reasoning_share`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from accelerate import PartialState
from transformers import (
    AutoConfig,
    EarlyStoppingCallback,
    SchedulerType,
    TrainingArguments,
    set_seed,
)

from configuration_thinkrec import ROUTING_RULES, SCORE_TYPES, ThinkRecConfig
from data_collator import METRIC_COLUMNS, ThinkRecCollator, build_processor, input_errors, load_templates, raw_record, tokenize_dataset
from modeling_thinkrec import TRAINING_STAGES, ThinkRecForCausalLM
from thinkrec.collaborative.models import load_cf_checkpoint
from thinkrec.collaborative.training import history_matrix
from thinkrec.data.keywords import attach_keywords_to_dataset, item_keywords
from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.data.records import check_same_records, load_candidates, load_items, load_records_dataset
from thinkrec.evaluation.metrics import (
    CI_RESAMPLES,
    compare_scores,
    compute_metrics,
    format_comparison,
    format_interval,
    format_metrics,
    interval_fields,
)
from thinkrec.evaluation.ranking import (
    POOL_COLUMN,
    TIES,
    candidate_ranks,
    candidate_rows,
    compare_pool_scores,
    describe_pools,
    format_ranking,
    pool_intervals,
    pool_metrics,
    resolve_ks,
)
from thinkrec.evaluation.reporting import model_card, plot_roc_curves, plot_training_curves, reason_body, verdict_of
from thinkrec.experts.clusters import CLUSTER_METHODS, fit_user_clusters, train_user_vectors
from thinkrec.training.backbones import hub_reference
from thinkrec.training.loading import DTYPE_CHOICES, load_checkpoint, load_kwargs, load_language_model, load_tokenizer, model_source
from thinkrec.training.resume import RunArgumentsCallback, check_resumable, last_complete_checkpoint, remove_checkpoints, run_arguments
from thinkrec.training.run_folder import RunFolder, save_metrics
from thinkrec.training.trainer import REPORTED_METRICS, ThinkRecTrainer, interleave_reasoning_rows, metrics_for
from thinkrec.utils.arguments import parse_args as parse_command_args
from thinkrec.utils.arguments import run_command
from thinkrec.utils.distributed import from_main_process, map_over_ranks, synced_generation
from thinkrec.utils.errors import ExistingOutputError, InputError, MissingInputError
from thinkrec.utils.files import LOCK_NAME, MANIFEST_NAME, atomic_write, check_not_inside, output_lock, strict_json, write_json
from thinkrec.utils.subsets import seeded_subset, seeded_user_subset


logger = logging.getLogger("run_thinkrec")

BUNDLED_BACKBONE = "smollm2"
# The experts stage keeps the prompt of the model it starts from (see default_templates).
STAGE_TEMPLATES = {"lora": "text_only", "projector": "collaborative", "joint": "collaborative"}
# Reasoning rows (and generated reasons) use a prompt that asks for the verdict *and* the explanation.
STAGE_REASON_TEMPLATES = {"lora": "reflection_text_only", "projector": "reflection", "joint": "reflection"}
SLOT_PLACEHOLDERS = ("<UserID>", "<TargetItemID>")
SCORE_PROMPTS = ("recommendation", "reason")
EVAL_PROTOCOLS = ("ctr", "ranking")
LOSS_WEIGHTS = ("reason_bce_weight", "reason_lm_weight", "rec_bce_weight", "rec_lm_weight")


@dataclass
class ModelArguments:
    """Which backbone, which collaborative model, which adapter."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Backbone: any HF causal LM id or path, or 'smollm2' for the bundled SmolLM2-135M-Instruct "
                  "(the default when starting fresh). With init_from it is only checked against the checkpoint."},
    )
    init_from: Optional[str] = field(
        default=None, metadata={"help": "Output directory of the previous stage (a ThinkRec checkpoint) to start from."}
    )
    cf_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "train_collaborative.py output folder: frozen user/item tables for the id slots "
                  "(needed by the projector and joint stages when init_from has none)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": f"Backbone weights: one of {list(DTYPE_CHOICES)}; auto = bfloat16 on a GPU that supports it, float32 on "
                  "CPU (projector, LoRA, experts and CF tables stay float32)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the backbone 4-bit (NF4) through bitsandbytes."})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "e.g. 'sdpa', 'eager', 'flash_attention_2'."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Backbone modules that get a LoRA adapter."}
    )
    score_type: str = field(
        default="yes_logit", metadata={"help": "'yes_logit' (published: raw logit of 'Yes') or 'yes_no_log_odds'."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for the backbone."})
    num_clusters: Optional[int] = field(
        default=None, metadata={"help": "experts: user clusters G (one expert each, plus a general one); None = chosen by silhouette over 2..10."}
    )
    cluster_method: str = field(default="kmeans", metadata={"help": f"experts: one of {CLUSTER_METHODS} (on standardised CF user vectors)."})
    expert_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "experts: decoder layers whose LoRA becomes experts (negative = from the end); default the last 8 (published)."}
    )
    routing_rule: str = field(default="thinkrec", metadata={"help": f"experts: one of {ROUTING_RULES}, applied per row."})
    train_general_expert: bool = field(
        default=True, metadata={"help": "experts: every training row also trains the general expert (the batch runs twice)."}
    )
    experts_train_projector: bool = field(default=False, metadata={"help": "experts: train the projector jointly (else frozen)."})

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}.")
        if self.score_type not in SCORE_TYPES:
            raise InputError(f"score_type must be one of {SCORE_TYPES}, got {self.score_type!r}.")
        if self.routing_rule not in ROUTING_RULES:
            raise InputError(f"routing_rule must be one of {ROUTING_RULES}, got {self.routing_rule!r}.")
        if self.cluster_method not in CLUSTER_METHODS:
            raise InputError(f"cluster_method must be one of {CLUSTER_METHODS}, got {self.cluster_method!r}.")


@dataclass
class DataArguments:
    """Which records, which prompts, how many rows."""

    records_dir: str = field(metadata={"help": "Prepared records folder (prepare_data.py output)."})
    reason_records: Optional[str] = field(
        default=None,
        metadata={"help": "Parquet or JSON-lines file of reasoning rows (record columns, mode='reason', non-empty reason), "
                  "e.g. reflect.py output; mixed into training at reasoning_share."},
    )
    template: Optional[str] = field(
        default=None,
        metadata={"help": "Prompt template name in templates/ or a file path (default: text_only for stage lora, "
                  "collaborative for projector/joint)."},
    )
    reason_template: Optional[str] = field(
        default=None,
        metadata={"help": "Prompt of reasoning rows and of generated reasons: asks for 'Yes.'/'No.' and an explanation "
                  "(default: reflection_text_only for stage lora, reflection for projector/joint)."},
    )
    history_item_slots: bool = field(default=False, metadata={"help": "Put an item id slot after every history title."})
    max_prompt_tokens: Optional[int] = field(
        default=512, metadata={"help": "Token budget of a prompt; history titles are dropped oldest first to fit."}
    )
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Seeded random subset of the train split."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Validation on at most this many rows: all rows of a seeded random set of users (UAUC needs whole users)."}
    )
    max_test_samples: Optional[int] = field(
        default=None, metadata={"help": "Test on at most this many rows: all rows of a seeded random set of users (UAUC needs whole users)."}
    )
    generate_reasons_for: int = field(
        default=0, metadata={"help": "At predict time, generate the verdict and reason text for the first N test rows."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length for those rows."})
    score_prompt: str = field(
        default="recommendation",
        metadata={"help": "Where scores are read: 'recommendation' (the one-word prompt) or 'reason' (the reason prompt's "
                  "first answer position, as published; the recommendation rows are then trained on the reason prompt too). "
                  "Generated reasons always start with the verdict of that score, so score and text make one decision."},
    )
    verdict_threshold: float = field(
        default=0.5, metadata={"help": "A generated reason says 'Yes.' when P(Yes) >= this, else 'No.' (then the reason follows)."}
    )
    title_keywords: int = field(
        default=0, metadata={"help": "Show every title in the prompts with up to this many of its keywords (extract_keywords.py); 0 = titles only."}
    )
    eval_protocol: str = field(
        default="ctr",
        metadata={"help": "What predict measures: 'ctr' scores the test rows (AUC, UAUC, per-user HR/NDCG of their own rows); "
                  "'ranking' does that and also ranks each test positive among its candidate pool (records prepared with "
                  "num_candidates): HR@k, NDCG@k, MRR over pools, next to the CF model alone (docs/ranking.md)."},
    )
    ranking_ks: Optional[list[int]] = field(
        default=None,
        metadata={"help": "eval_protocol 'ranking': the cut-offs k of HR@k / NDCG@k, each at most the pool size; default "
                  "those of 1, 5, 10, 20 that fit the pools."},
    )

    def __post_init__(self):
        if self.eval_protocol not in EVAL_PROTOCOLS:
            raise InputError(f"eval_protocol must be one of {EVAL_PROTOCOLS}, got {self.eval_protocol!r}.")
        if self.ranking_ks is not None:
            if self.eval_protocol != "ranking":
                raise InputError(f"ranking_ks={self.ranking_ks} is read by eval_protocol 'ranking' only, but eval_protocol is "
                                 f"{self.eval_protocol!r}.")
            if not self.ranking_ks or any(k < 1 for k in self.ranking_ks) or len(set(self.ranking_ks)) != len(self.ranking_ks):
                raise InputError(f"ranking_ks must be distinct integers >= 1, got {self.ranking_ks}.")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 when set, got {value}.")
        if self.score_prompt not in SCORE_PROMPTS:
            raise InputError(f"score_prompt must be one of {SCORE_PROMPTS}, got {self.score_prompt!r}.")
        if not 0 < self.verdict_threshold < 1:
            raise InputError(f"verdict_threshold must be in (0, 1), got {self.verdict_threshold}.")
        if self.title_keywords < 0:
            raise InputError(f"title_keywords must be >= 0, got {self.title_keywords}.")


@dataclass
class ThinkRecTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the ThinkRec stage, loss weights and reasoning-row share."""

    stage: str = field(default="lora", metadata={"help": f"One of {TRAINING_STAGES}."})
    reasoning_share: float = field(default=0.2, metadata={"help": "Probability that a training row is a reasoning row."})
    reason_bce_weight: Optional[float] = field(default=None, metadata={"help": "Reasoning rows: BCE weight (default 0.1)."})
    reason_lm_weight: Optional[float] = field(default=None, metadata={"help": "Reasoning rows: LM weight (default 0.9)."})
    rec_bce_weight: Optional[float] = field(default=None, metadata={"help": "Recommendation rows: BCE weight (default 0.9)."})
    rec_lm_weight: Optional[float] = field(default=None, metadata={"help": "Recommendation rows: LM weight (default 0.1)."})
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement of metric_for_best_model."}
    )
    hub_dataset_source: Optional[str] = field(default=None, metadata={"help": "Dataset repo id named in the model card."})
    shared_prefix_scoring: bool = field(
        default=True,
        metadata={"help": "Evaluation and prediction score rows that share a prompt prefix (a user's candidates) from one "
                  "encoding of it: the same scores, several times faster, but no eval loss. False: one prompt per row."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start anew: remove the checkpoint-* folders in output_dir instead of resuming from the last one "
                  "(a checkpoint made with other stage, data, model or training arguments is never resumed)."},
    )
    # Defaults that differ from TrainingArguments'.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator reads the encoded and metric columns."})
    metric_for_best_model: Optional[str] = field(default="auc", metadata={"help": "Validation metric that picks the best checkpoint."})
    greater_is_better: Optional[bool] = field(default=True, metadata={"help": "Whether a larger metric_for_best_model is better."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (published: 1e-4)."})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay (published: 1e-3)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Warmup then cosine (published)."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Where to log: tensorboard, wandb, none..."})

    def __post_init__(self):
        if self.stage not in TRAINING_STAGES:
            raise InputError(f"stage must be one of {TRAINING_STAGES}, got {self.stage!r}.")
        if self.remove_unused_columns:
            raise InputError("remove_unused_columns must be False: ThinkRecCollator reads the encoded columns (prompt_ids, ...) "
                             "and the metric columns (UserID, label, mode, ...), which are not arguments of the model's forward.")
        if not 0 <= self.reasoning_share < 1:
            raise InputError(f"reasoning_share must be in [0, 1), got {self.reasoning_share}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.shared_prefix_scoring and self.metric_for_best_model in ("loss", "eval_loss"):
            raise InputError("metric_for_best_model 'loss' needs the eval loss, which shared-prefix scoring does not compute; "
                             "set shared_prefix_scoring: false, or pick a ranking metric such as 'auc'.")
        # A misspelt metric would otherwise fail at the first evaluation, after the model loaded and trained.
        reported = sorted({*REPORTED_METRICS.values(), "loss"})
        if self.metric_for_best_model is not None and self.metric_for_best_model.removeprefix("eval_") not in reported:
            raise InputError(f"metric_for_best_model must be a metric the evaluation reports, one of {reported} "
                             f"(with or without 'eval_'), got {self.metric_for_best_model!r}.")
        super().__post_init__()


# ------------------------------------------------------------------------------------------ parsing


def parse_args(argv: Optional[list[str]] = None) -> tuple[ModelArguments, DataArguments, ThinkRecTrainingArguments]:
    """A `.json` file, flags, or both (flags override the file); unknown keys are an error."""
    model_args, data_args, training_args = parse_command_args((ModelArguments, DataArguments, ThinkRecTrainingArguments), argv)
    if data_args.eval_protocol == "ranking" and not training_args.do_predict:
        raise InputError("eval_protocol 'ranking' ranks the test pools when the run predicts: set do_predict.")
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------- data


def load_reason_rows(path: str) -> datasets.Dataset:
    """Reasoning rows from a Parquet or JSON-lines file; every row needs mode='reason' and a reason."""
    if not os.path.isfile(path):
        raise MissingInputError(f"reason_records: no such file {path}")
    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_json(path, lines=True, dtype=False)
    if "reason" not in frame or "mode" not in frame:
        raise InputError(f"{path}: reasoning rows need 'reason' and 'mode' columns; found {list(frame.columns)}.")
    wrong = frame.index[(frame["mode"] != "reason") | (frame["reason"].fillna("").str.strip() == "")]
    if len(wrong):
        raise InputError(f"{path}: row {wrong[0]} is not a reasoning row (mode must be 'reason' and reason non-empty).")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def load_splits(data_args: DataArguments, seed: int) -> tuple[dict[str, datasets.Dataset], dict]:
    """The three splits as memory-mapped `Dataset`s (`datasets.load_dataset` of the records folder;
    evaluation subsets keep whole users) and the records' metadata."""
    records, metadata = load_records_dataset(data_args.records_dir)
    item_nouns_from_metadata(metadata, data_args.records_dir)  # stop before loading a model, not after
    splits = {}
    for name, size in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples), ("test", data_args.max_test_samples)):
        rows = records[name]
        if len(rows) == 0:
            raise InputError(f"{data_args.records_dir}: the {name} split is empty.")
        splits[name] = seeded_subset(rows, size, seed) if name == "train" else seeded_user_subset(rows, size, seed)
    return splits, metadata


@dataclass
class RankingPools:
    """eval_protocol 'ranking': one record per candidate of every pool (`candidate_rows`), the cut-offs and
    the pools' counts (`describe_pools`, plus `pools_in_file`)."""

    rows: datasets.Dataset
    ks: tuple[int, ...]
    summary: dict


def load_ranking_pools(data_args: DataArguments, test: datasets.Dataset) -> RankingPools:
    """The candidate rows of the records' pools, checked before any model loads. With max_test_samples, the
    pools of the users in the test subset (whole users, so each keeps all its pools)."""
    try:
        pools, source = load_candidates(data_args.records_dir)
    except MissingInputError as error:
        raise MissingInputError(f"eval_protocol 'ranking': {error}") from None
    pools_in_file = len(pools)
    if data_args.max_test_samples is not None:
        pools = pools[pools["UserID"].isin(set(test["UserID"]))].reset_index(drop=True)
        logger.info("ranking: %d of the %d pools in %s, those of the %d users of the test subset", len(pools), pools_in_file,
                    source, len(set(test["UserID"])))
        if len(pools) == 0:
            raise InputError(f"{source}: none of its {pools_in_file} pools belongs to the {len(set(test['UserID']))} users of "
                             f"the test subset (max_test_samples={data_args.max_test_samples}); raise max_test_samples.")
    rows = candidate_rows(pools, test.to_pandas(), load_items(data_args.records_dir), source,
                          test_source=f"{data_args.records_dir} test split")
    summary = {**describe_pools(rows), "pools_in_file": pools_in_file}
    ks = resolve_ks(data_args.ranking_ks, summary["pool_size"])
    if summary["pools_without_history"]:
        logger.info("ranking: %d pool(s) of users with no history; their prompts show the empty history as the test "
                    "rows do", summary["pools_without_history"])
    features = datasets.Features({POOL_COLUMN: datasets.Value("int64"),
                                  **{name: test.features[name] for name in rows.columns if name != POOL_COLUMN}})
    return RankingPools(datasets.Dataset.from_pandas(rows, features=features, preserve_index=False), ks, summary)


# -------------------------------------------------------------------------------------------- model


def resolve_backbone(name_or_path: Optional[str]) -> str:
    if name_or_path in (None, BUNDLED_BACKBONE):
        from thinkrec.training.backbones import smollm2_model_dir

        return str(smollm2_model_dir())
    return name_or_path


def check_same_backbone(model: ThinkRecForCausalLM, name_or_path: str, init_from: str) -> None:
    """Stop when the requested backbone is not the one the checkpoint was trained on."""
    expected = AutoConfig.from_pretrained(model_source(resolve_backbone(name_or_path), "model_name_or_path"))
    found = model.config.text_config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(expected, key, None) != getattr(found, key, None):
            raise InputError(
                f"init_from={init_from} was trained on another backbone: its {key} is {getattr(found, key, None)!r}, "
                f"model_name_or_path={name_or_path} has {getattr(expected, key, None)!r}."
            )


def model_load_kwargs(model_args: ModelArguments) -> dict:
    """The one set of loading arguments for the backbone and for `init_from` (whose small checkpoint
    rebuilds its base with them): precision, 4-bit, attention implementation."""
    return load_kwargs(model_args.dtype, model_args.load_in_4bit, model_args.attn_implementation, model_args.trust_remote_code)


def load_backbone(model_args: ModelArguments):
    """The causal LM and its tokenizer, in the requested precision (4-bit through bitsandbytes)."""
    path = resolve_backbone(model_args.model_name_or_path)
    language_model = load_language_model(path, "model_name_or_path", **model_load_kwargs(model_args))
    tokenizer = load_tokenizer(path, "model_name_or_path", trust_remote_code=model_args.trust_remote_code)
    return language_model, tokenizer, path


def with_collaborative_vectors(model: ThinkRecForCausalLM, tokenizer, cf_checkpoint) -> ThinkRecForCausalLM:
    """A text-only ThinkRec model (stage 1) with frozen CF tables and a fresh projector, keeping its LM
    and LoRA adapter as they are."""
    config = model.config
    kept = {name: getattr(config, name) for name in (*LOSS_WEIGHTS, "score_type", "tokens_per_id", "projector_width_multiplier",
                                                     "base_model_name_or_path", "base_model_revision", "base_vocab_size")}
    combined = ThinkRecForCausalLM.from_language_model(
        model.language_model, tokenizer, cf_checkpoint, generation_config=model.generation_config, **kept
    )
    # The LM already carries the adapter: record it without injecting a second one.
    combined.config.lora_config = config.lora_config
    return combined


def build_model(model_args: ModelArguments, training_args: ThinkRecTrainingArguments, metadata: dict, train_rows=None,
                records_dir: Optional[str] = None, write_dir: Optional[str | Path] = None):
    """The model of the run's stage and its tokenizer; files it makes (the user clusters) go to `write_dir`
    (default output_dir)."""
    stage = training_args.stage
    cf = load_cf_checkpoint(model_args.cf_checkpoint) if model_args.cf_checkpoint else None
    if cf is not None and records_dir is not None:
        check_same_records(cf.config.get("records_fingerprint"), cf.config.get("records_dir"),
                           f"cf_checkpoint={model_args.cf_checkpoint}", records_dir, metadata)
    needs_cf = stage in ("projector", "joint", "experts")
    if stage == "experts" and not model_args.init_from:
        raise InputError("stage 'experts' starts from a stage-1 or stage-2 folder with a LoRA adapter: set init_from.")
    if model_args.init_from:
        model, tokenizer = load_checkpoint(model_args.init_from, "init_from", **model_load_kwargs(model_args))
        if model_args.model_name_or_path is not None:
            check_same_backbone(model, model_args.model_name_or_path, model_args.init_from)
        backbone = model.config.text_config._name_or_path or model_args.init_from
        if model.config.cf_model_type != "none" and records_dir is not None:
            check_same_records(model.config.cf_records_fingerprint, model.config.cf_records_dir,
                               f"the collaborative tables of init_from={model_args.init_from}", records_dir, metadata)
        if needs_cf and model.config.cf_model_type == "none":
            if cf is None:
                raise InputError(f"stage {stage!r} needs collaborative vectors: init_from has none, so set cf_checkpoint.")
            model = with_collaborative_vectors(model, tokenizer, cf)
        elif cf is not None and model.config.cf_model_type != "none":
            # The model keeps the tables its projector was trained on, and scores its CF model with them: the
            # given checkpoint would be used for nothing, so say so instead of ignoring it.
            raise InputError(
                f"cf_checkpoint={model_args.cf_checkpoint} with init_from={model_args.init_from}, which already holds "
                f"{model.config.cf_model_type} tables (its projector was trained on them, and the 'CF alone' baseline is "
                "scored with them): drop cf_checkpoint. To use other tables, start from a folder without them (stage 1)."
            )
    else:
        if needs_cf and cf is None:
            raise InputError(f"stage {stage!r} needs collaborative vectors: set cf_checkpoint (train_collaborative.py output).")
        language_model, tokenizer, backbone = load_backbone(model_args)
        model = ThinkRecForCausalLM.from_language_model(
            language_model, tokenizer, cf if needs_cf else None, score_type=model_args.score_type
        )
    if stage in ("lora", "joint") and not model.has_lora:
        model.add_lora(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
        )
    if stage == "experts" and not model.has_experts:
        add_user_cluster_experts(model, model_args, train_rows, write_dir or training_args.output_dir, training_args.seed)
    elif model.has_experts and model_args.routing_rule != model.config.routing_rule:
        # Routing is configuration: a model with experts can be evaluated (or trained on) under another rule.
        logger.info("routing rule %s (the checkpoint was saved with %s)", model_args.routing_rule, model.config.routing_rule)
        model.config.routing_rule = model_args.routing_rule
    for name in LOSS_WEIGHTS:
        if getattr(training_args, name) is not None:
            setattr(model.config, name, getattr(training_args, name))
    trainable = model.set_training_stage(stage, train_projector=model_args.experts_train_projector)
    logger.info("stage %s: %d trainable tensors, %s parameters", stage, len(trainable),
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    check_records_fit(model.config, metadata)
    return model, tokenizer, backbone, cf


def add_user_cluster_experts(model: ThinkRecForCausalLM, model_args: ModelArguments, train_rows, output_dir: str, seed: int) -> None:
    """Cluster the training users by their CF vectors, write the clusters' summary and assignment to
    `output_dir`, and give `model` one LoRA expert per cluster plus a general one (each a copy of its LoRA)."""
    if not model.has_lora:
        raise InputError("stage 'experts' starts from a folder with a LoRA adapter, but init_from has none (train stage 'lora' first).")
    user_ids, vectors = train_user_vectors(model, train_rows)
    clusters = fit_user_clusters(vectors, model_args.num_clusters, method=model_args.cluster_method, seed=seed)
    num_layers = model.config.text_config.num_hidden_layers
    expert_layers = model_args.expert_layers or list(range(max(0, num_layers - 8), num_layers))
    model.config.train_general_expert = model_args.train_general_expert
    model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=expert_layers,
                      routing_rule=model_args.routing_rule)
    summary = {**clusters.summary(), "expert_layers": model.config.expert_layers, "routing_rule": model.config.routing_rule}
    logger.info("experts: %d user clusters (%s, silhouette %s), sizes %s, layers %s, routing %s", clusters.num_clusters,
                clusters.method, summary.get("silhouette"), summary.get("users_per_cluster"), model.config.expert_layers,
                model.config.routing_rule)
    if PartialState().is_main_process:
        write_json(summary, Path(output_dir) / "user_clusters.json")
        assignment = pd.DataFrame({"UserID": user_ids, "cluster": clusters.labels.astype(np.int64)})
        atomic_write(Path(output_dir) / "user_clusters.parquet", lambda temp: assignment.to_parquet(temp, index=False))


def check_records_fit(config: ThinkRecConfig, metadata: dict) -> None:
    """Stop before training when record ids have no row in the model's CF tables."""
    if config.cf_model_type == "none":
        return
    problems = []
    if config.cf_model_type != "sasrec" and metadata["num_users"] > config.num_users:
        problems.append(f"largest UserID {metadata['num_users'] - 1} >= user table size {config.num_users}")
    if metadata["num_items"] > config.num_items:
        problems.append(f"largest ItemID {metadata['num_items'] - 1} >= item table size {config.num_items}")
    if problems:
        raise InputError(
            "records do not fit the model's collaborative tables: " + "; ".join(problems)
            + ". Train the collaborative model on the same prepared records."
        )


def default_template(stage: str, init_from: Optional[str], reason: bool = False) -> str:
    """The stage's prompt template; the experts stage keeps the kind its starting model was trained
    with: text-only from a stage-1 folder (no CF tables), with id slots from a stage-2 one."""
    if stage != "experts":
        return (STAGE_REASON_TEMPLATES if reason else STAGE_TEMPLATES)[stage]
    config = json.loads((Path(init_from) / "config.json").read_text(encoding="utf-8"))
    stage_of_init = "lora" if config.get("cf_model_type", "none") == "none" else "projector"
    return (STAGE_REASON_TEMPLATES if reason else STAGE_TEMPLATES)[stage_of_init]


def check_template(template: str, model: ThinkRecForCausalLM, stage: str) -> None:
    """The prompts must carry id slots exactly when the model injects collaborative vectors."""
    texts = load_templates(template)
    has_slots = any(any(p in text for p in SLOT_PLACEHOLDERS) for text in texts)
    if model.config.cf_model_type == "none" and has_slots:
        raise InputError(f"template {template!r} has id slots ({SLOT_PLACEHOLDERS}) but stage {stage!r} uses a text-only model; "
                         "use the text_only template or a projector/joint stage with cf_checkpoint.")
    if stage in ("projector", "joint") and not has_slots:
        raise InputError(f"stage {stage!r} trains the projector but template {template!r} has no id slot {SLOT_PLACEHOLDERS}; "
                         "the projector would get no gradient. Use the collaborative template.")


# ------------------------------------------------------------------------------------- evaluation


def external_cf_scores(cf, dataset: datasets.Dataset) -> np.ndarray:
    """Scores of a CF checkpoint that the model does not hold (a text-only stage's `cf_checkpoint`): host
    tables read by one rank, nothing sharded. A model with tables scores its CF model in its forward."""
    with torch.no_grad():
        if cf.sequence_encoder is not None:
            # SASRec encodes the liked history, left-padded, as it was trained (train_collaborative.py).
            histories = history_matrix(dataset["HisItemIDs"], dataset["HisItemLabels"], cf.sequence_encoder.max_len)
            cf.sequence_encoder.float().cpu().eval()
            users = torch.cat([cf.user_vectors(history_ids=chunk) for chunk in histories.split(4096)])
        else:
            users = cf.user_vectors(user_ids=torch.tensor(dataset["UserID"]))
        return (users.float() * cf.item_table.float()[torch.tensor(dataset["TargetItemID"])]).sum(-1).numpy()




def generate_reasons(model, processor, rows: list[dict], scores: np.ndarray, threshold: float, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """One decision per row (`ThinkRecProcessor.generate_reasons`): the verdict is the score's, the model
    writes the reason after it. `scores` are logits; rows are rendered again from their raw fields."""
    probabilities = 1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))
    with input_errors():
        return processor.generate_reasons(model, [raw_record(row) for row in rows], probabilities, threshold,
                                          max_new_tokens, batch_size, synced_gpus=synced_generation())


def score_candidates(trainer, rows: datasets.Dataset) -> dict:
    """The per-row outputs of `trainer.predict` on the ranking pools' rows: scores, and the CF model's own
    scores when the model holds CF tables (every rank runs it; no CTR metrics on these rows)."""
    fields, compute = trainer.prediction_fields, trainer.compute_metrics
    trainer.prediction_fields, trainer.compute_metrics = ("scores", "cf_scores"), None
    try:
        return trainer.predict(rows, metric_key_prefix="ranking").predictions
    finally:
        trainer.prediction_fields, trainer.compute_metrics = fields, compute


def ranking_results(pools: RankingPools, outputs: dict, model, cf, out: Path, seed: int = 0) -> dict:
    """HR@k / NDCG@k / MRR over the pools for this model and for the CF model alone on the same rows, each with
    its 95% interval (``ci95``, bootstrap over users) and this model - the CF model with the paired interval
    (``vs_cf_alone``), printed and returned (the "ranking" entry of test_results.json); one row per candidate in
    ranking_predictions.parquet (rank: pessimistic, as the metrics count it)."""
    rows = pools.rows
    pool_ids, labels, users = np.asarray(rows[POOL_COLUMN]), np.asarray(rows["label"]), np.asarray(rows["UserID"])
    scores = np.asarray(outputs["scores"], dtype=np.float64).reshape(-1)
    result = {**pools.summary, "ks": list(pools.ks), "ties": TIES, **pool_metrics(pool_ids, labels, scores, pools.ks),
              "ci95": pool_intervals(pool_ids, users, labels, scores, ks=pools.ks, seed=seed),
              "ci95_resamples": CI_RESAMPLES, "ci95_seed": int(seed)}
    predictions = pd.DataFrame({POOL_COLUMN: pool_ids, "UserID": np.asarray(rows["UserID"]),
                                "TargetItemID": np.asarray(rows["TargetItemID"]), "label": labels,
                                "score": 1 / (1 + np.exp(-scores)), "logit": scores, "rank": candidate_ranks(pool_ids, scores)})
    if "cf_scores" in outputs:
        cf_scores, cf_name = np.asarray(outputs["cf_scores"], dtype=np.float64).reshape(-1), model.config.cf_model_type
    elif cf is not None:
        cf_scores, cf_name = external_cf_scores(cf, rows), cf.model_type
    else:
        cf_scores = None
    if cf_scores is not None:
        predictions["cf_score"] = cf_scores
        predictions["cf_rank"] = candidate_ranks(pool_ids, cf_scores)
        result["cf_alone"] = {"model": cf_name, **pool_metrics(pool_ids, labels, cf_scores, pools.ks),
                              "ci95": pool_intervals(pool_ids, users, labels, cf_scores, ks=pools.ks, seed=seed)}
        result["vs_cf_alone"] = compare_pool_scores(pool_ids, users, labels, cf_scores, scores, ks=pools.ks, seed=seed,
                                                    names=(f"{cf_name} alone", "this model"))
    baseline = result.get("cf_alone")
    print(format_ranking(result, baseline, names=("this model", f"{baseline['model']} alone" if baseline else "")))
    if "vs_cf_alone" in result:
        print(format_comparison(result["vs_cf_alone"], title=f"this model - {baseline['model']} alone:"))
    atomic_write(out / "ranking_predictions.parquet", lambda temp: predictions.to_parquet(temp, index=False))
    return strict_json(result)


def predict(trainer, model, cf, test: datasets.Dataset, data_args, training_args, out: Optional[Path] = None,
            pools: Optional[RankingPools] = None) -> dict:
    """Test metrics, predictions file, ROC curve, comparison with the CF model, generated reasons, and with
    `pools` (eval_protocol 'ranking') the ranking of every pool (`ranking_results`).

    Everything that runs the model runs on every rank: scores, the CF model's own scores and routing
    weights come from the forward passes of `trainer.predict` (gathered like the scores), and reason
    generation splits its rows over the ranks. Under FSDP / ZeRO-3 each forward is collective, so a step
    run by rank 0 alone would wait for the others forever. Rank 0 then writes the files into `out`
    (default output_dir)."""
    trainer.prediction_fields = ("scores", "cf_scores", "routing_weights")
    try:
        output = trainer.predict(test, metric_key_prefix="test")
    finally:
        trainer.prediction_fields = ("scores",)
    outputs = output.predictions
    scores = np.asarray(outputs["scores"], dtype=np.float64).reshape(-1)
    texts = None
    if data_args.generate_reasons_for > 0:
        count = min(data_args.generate_reasons_for, len(test))

        def generate(indices: list[int]) -> list[str]:
            return generate_reasons(model, trainer.processing_class, [test[i] for i in indices], scores[indices],
                                    data_args.verdict_threshold, data_args.max_new_tokens,
                                    training_args.per_device_eval_batch_size)

        texts = map_over_ranks(generate, list(range(count)))
    pool_outputs = score_candidates(trainer, pools.rows) if pools is not None else None
    if not trainer.is_world_process_zero():
        return {}
    user_ids, labels = np.asarray(test["UserID"]), np.asarray(test["label"])
    not_cold = np.asarray(test["not_cold"])
    metrics = compute_metrics(user_ids, labels, scores, not_cold=not_cold)
    print(format_metrics(metrics, title=f"test ({len(test):,} rows)"))
    metrics.update(interval_fields(user_ids, labels, scores, CI_RESAMPLES, training_args.seed))
    print(f"95% intervals (bootstrap over users, {CI_RESAMPLES:,} resamples): "
          + ", ".join(f"{name.upper()} {metrics[name]:.4f} [{metrics[name + '_ci95'][0]:.4f}, {metrics[name + '_ci95'][1]:.4f}]"
                      for name in ("auc", "uauc")))
    out = Path(out or training_args.output_dir)
    predictions = pd.DataFrame(
        {"UserID": user_ids, "TargetItemID": np.asarray(test["TargetItemID"]), "label": labels,
         "score": 1 / (1 + np.exp(-scores)), "not_cold": not_cold}
    )
    cf_metrics = None
    if "cf_scores" in outputs:
        cf_scores, cf_name = np.asarray(outputs["cf_scores"], dtype=np.float64), model.config.cf_model_type
    elif cf is not None:
        cf_scores, cf_name = external_cf_scores(cf, test), cf.model_type
    else:
        cf_scores = None
    curves = {"ThinkRec": (labels, scores)}
    if cf_scores is not None:
        predictions["cf_score"] = cf_scores  # the CF model's own logit (user vector · item vector)
        cf_metrics = compute_metrics(user_ids, labels, cf_scores, not_cold=not_cold)
        cf_metrics.update(interval_fields(user_ids, labels, cf_scores, CI_RESAMPLES, training_args.seed))
        # Paired: this model against the CF model on the same user resamples.
        versus_cf = compare_scores(user_ids, labels, cf_scores, scores, ("auc", "uauc"), CI_RESAMPLES, training_args.seed,
                                   names=(f"{cf_name} alone", "this model"))
        curves[f"{cf_name} alone"] = (labels, cf_scores)
        print(f"{cf_name.upper()} alone: AUC {cf_metrics['auc']:.4f}, UAUC {cf_metrics['uauc']:.4f}; "
              f"this model: AUC {metrics['auc']:.4f}, UAUC {metrics['uauc']:.4f}")
        print(f"this model - {cf_name.upper()} alone (95%, paired bootstrap over users): "
              + "; ".join(f"{name.upper()} {format_interval(entry['delta'], entry['ci95'])} {entry['verdict']}"
                          for name, entry in versus_cf["metrics"].items()))
    if len(set(labels.tolist())) == 2:
        plot_roc_curves(curves, out / "roc_curve.png")
    if texts is not None:
        count = len(texts)
        predictions["generated"] = texts + [None] * (len(test) - count)
        threshold_logit = math.log(data_args.verdict_threshold / (1 - data_args.verdict_threshold))
        agree = [verdict_of(text) == int(scores[i] >= threshold_logit) for i, text in enumerate(texts)]
        metrics["generated_rows"] = float(count)
        metrics["verdict_agrees_with_score"] = float(np.mean(agree))
        metrics["reason_body_empty"] = float(np.mean([not reason_body(text) for text in texts]))
        for index, text in enumerate(texts[:5]):
            row = test[index]
            print(f"[user {row['UserID']} / {row['TargetItemTitle']!r} / label {row['label']} / "
                  f"P(Yes)={predictions['score'][index]:.3f}] {text[:200]}")
        write_json({**model.generation_config.to_dict(), "max_new_tokens": data_args.max_new_tokens}, out / "generation_settings.json")
    if "routing_weights" in outputs:
        weights = np.asarray(outputs["routing_weights"], dtype=np.float64)
        # Which expert served each row: the cluster index, or G for the general expert.
        predictions["expert"] = weights.argmax(-1)
        predictions["routing_weights"] = list(weights)
        served = np.bincount(predictions["expert"], minlength=weights.shape[1])
        metrics["routing_rule"] = model.config.routing_rule
        metrics["rows_per_expert"] = served.tolist()
        logger.info("routing %s: rows per expert (clusters..., general) %s", model.config.routing_rule, served.tolist())
    predictions.to_parquet(out / "test_predictions.parquet", index=False)
    result = {"test": strict_json(metrics)}
    if cf_metrics is not None:
        result["cf_alone"] = strict_json(cf_metrics)
        result["vs_cf_alone"] = strict_json(versus_cf)
    if pools is not None:
        result["ranking"] = ranking_results(pools, pool_outputs, model, cf, out, training_args.seed)
    write_json(result, out / "test_results.json")
    return result


# --------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    datasets.utils.logging.set_verbosity_warning()
    logger.info("stage %s, output %s", training_args.stage, training_args.output_dir)
    if model_args.init_from and Path(model_args.init_from).resolve() == Path(training_args.output_dir).resolve():
        raise InputError(f"output_dir={training_args.output_dir} is init_from: a run replaces its output folder's model and "
                         "results, so write it to another folder.")
    check_not_inside(training_args.output_dir, run_inputs(model_args, data_args))
    main_process = PartialState().is_main_process
    with contextlib.ExitStack() as holding:
        # One run per folder: a second one stops here, naming the first (the lock dies with its process). Only
        # the main process holds it; every rank learns whether it got it, and they stop together if not.
        refusal = None
        if main_process:
            try:
                holding.enter_context(output_lock(training_args.output_dir, f"run_thinkrec.py stage {training_args.stage}"))
            except InputError as error:
                refusal = error
        message = from_main_process(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        if message is not None:
            raise ExistingOutputError(message)
        folder = RunFolder(training_args.output_dir)
        if main_process:
            folder.begin()
        try:
            results = run(model_args, data_args, training_args, folder)
        except BaseException:
            if main_process:
                folder.discard()
            raise
    return results


def run_inputs(model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    """Every local file or folder the run reads (a Hub id is not one), which its output folder must not hold."""
    paths = [data_args.records_dir, model_args.cf_checkpoint, model_args.init_from, data_args.reason_records,
             data_args.template, data_args.reason_template, model_args.model_name_or_path]
    return [path for path in paths if path and os.path.exists(path)]


def run(model_args: ModelArguments, data_args: DataArguments, training_args: ThinkRecTrainingArguments, folder: RunFolder) -> dict:
    """The run itself: data, model, Trainer, train / evaluate / predict; the final files go to the run folder's
    staging folder and are moved into output_dir at the end (`RunFolder.publish`)."""
    set_seed(training_args.seed)
    # Trainer would push every checkpoint; we push the final, self-contained folder once, at the end.
    push_requested, training_args.push_to_hub = training_args.push_to_hub, False
    staging = folder.staging

    splits, metadata = load_splits(data_args, training_args.seed)
    # Bad pools stop here, before a model loads.
    pools = load_ranking_pools(data_args, splits["test"]) if data_args.eval_protocol == "ranking" else None
    model, tokenizer, backbone, cf = build_model(model_args, training_args, metadata, splits["train"], data_args.records_dir,
                                                 write_dir=staging)
    template = data_args.template or default_template(training_args.stage, model_args.init_from)
    check_template(template, model, training_args.stage)
    reason_template = data_args.reason_template or default_template(training_args.stage, model_args.init_from, reason=True)
    check_template(reason_template, model, training_args.stage)
    if data_args.score_prompt == "reason":
        # One prompt for everything: recommendation rows learn (and are scored at) the reason prompt's first answer position.
        template = reason_template
    processor_settings = {
        "template": template,
        "reason_template": reason_template,
        "history_item_slots": data_args.history_item_slots,
        "max_prompt_tokens": data_args.max_prompt_tokens,
        "use_chat_template": data_args.use_chat_template,
        "tokens_per_id": model.config.tokens_per_id,
        "seed": training_args.seed,
        "title_keywords": data_args.title_keywords,
        **item_nouns_from_metadata(metadata, data_args.records_dir),
    }
    # One processor renders and tokenises every record; Trainer saves it (processing_class) with each checkpoint.
    processor = build_processor(tokenizer, **processor_settings)
    # The item table is read once, and only when the prompts show keywords.
    keywords = item_keywords(load_items(data_args.records_dir), f"{data_args.records_dir} item table") if processor.needs_keywords else None
    if pools is not None and len(processor.templates) > 1:
        logger.warning("ranking with %d templates: each row's template is picked by its (user, item), so the candidates "
                       "of one pool may be asked different questions; use one template for a like-for-like ranking",
                       len(processor.templates))

    train_rows = splits["train"]
    if data_args.reason_records:
        train_rows = interleave_reasoning_rows(
            splits["train"], load_reason_rows(data_args.reason_records), training_args.reasoning_share, training_args.seed
        )
        logger.info("training rows: %d (%d reasoning)", len(train_rows), sum(m == "reason" for m in train_rows["mode"]))
    # Tokenised once and cached (the main process first, the other ranks read its cache). Training and
    # validation rows keep the raw columns the loss and metrics read; test rows keep all of them, since
    # predict renders reasons from the titles and scores the CF model alone from the histories.
    with training_args.main_process_first(desc="tokenising records"):
        if keywords is not None:  # cached maps like the tokenisation: the main process first, the other ranks read it
            train_rows = attach_keywords_to_dataset(train_rows, keywords)
            splits.update({name: attach_keywords_to_dataset(splits[name], keywords) for name in ("validation", "test")})
            if pools is not None:
                pools.rows = attach_keywords_to_dataset(pools.rows, keywords)
        if training_args.do_train:
            train_rows = tokenize_dataset(train_rows, processor, keep_columns=METRIC_COLUMNS, desc="tokenising train rows")
        if training_args.do_eval or training_args.eval_strategy != "no":
            splits["validation"] = tokenize_dataset(splits["validation"], processor, keep_columns=METRIC_COLUMNS,
                                                    desc="tokenising validation rows")
        if training_args.do_predict:
            splits["test"] = tokenize_dataset(splits["test"], processor, desc="tokenising test rows")
            if pools is not None:
                pools.rows = tokenize_dataset(pools.rows, processor, desc="tokenising the ranking pools' rows")
    defining_arguments = run_arguments(model_args, data_args, training_args, metadata)
    callbacks = [RunArgumentsCallback(defining_arguments)]
    if training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    trainer = ThinkRecTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows if training_args.do_train else None,
        eval_dataset=splits["validation"],
        data_collator=ThinkRecCollator(processor=processor),
        processing_class=processor,
        compute_metrics=metrics_for(splits["validation"]),
        callbacks=callbacks,
    )

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning("the launch asked for FSDP, but accelerate runs these ranks as %s (it turns FSDP on for GPU-type "
                       "devices only): every rank holds the whole model", trainer.accelerator.distributed_type)
    results: dict = {}
    all_metrics: dict = {}  # all_results.json of this run only (Trainer's save_metrics merges into an earlier run's)
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if training_args.overwrite_output_dir and os.path.isdir(training_args.output_dir):
            if trainer.is_world_process_zero():
                logger.info("overwrite_output_dir: removed %s", remove_checkpoints(training_args.output_dir))
            trainer.accelerator.wait_for_everyone()
        elif checkpoint is None and os.path.isdir(training_args.output_dir):
            # A run killed mid-training picks up where it stopped, if the checkpoint is from this same run; one
            # whose save was stopped part-way is skipped for the one before it.
            checkpoint = last_complete_checkpoint(training_args.output_dir, logger)
        if checkpoint:
            check_resumable(checkpoint, defining_arguments)
            logger.info("resuming from %s", checkpoint)
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(str(staging))
        train_metrics = dict(train_result.metrics, train_rows=len(train_rows), train_seconds=time.perf_counter() - start)
        trainer.log_metrics("train", train_metrics)
        results["train"] = train_metrics
        if trainer.is_world_process_zero():
            save_metrics(staging, "train", train_metrics, all_metrics)
            trainer.state.save_to_json(str(staging / "trainer_state.json"))
            plot_training_curves(trainer.state.log_history, staging / "training_curves.png")

    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        if trainer.is_world_process_zero():
            save_metrics(staging, "eval", eval_metrics, all_metrics)
        results["eval"] = eval_metrics

    if training_args.do_predict:
        trainer.compute_metrics = metrics_for(splits["test"])
        results.update(predict(trainer, model, cf, splits["test"], data_args, training_args, out=staging, pools=pools))

    if not training_args.do_train:
        # Collective: under ZeRO-3 / FSDP every rank takes part in gathering the weights it saves.
        trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        base_hub_id, backbone_note = hub_reference(backbone)
        card = model_card(
            repo_id=training_args.hub_model_id,
            stage=training_args.stage,
            backbone=backbone,
            base_hub_id=base_hub_id,
            backbone_note=backbone_note,
            num_experts=model.config.num_experts,
            cf_model_type=model.config.cf_model_type,
            records_source=training_args.hub_dataset_source or metadata.get("source", data_args.records_dir),
            dataset_hub_id=training_args.hub_dataset_source,
            train_rows=len(train_rows),
            metrics=results.get("test", {}),
            cf_metrics=results.get("cf_alone"),
            template=template,
            reason_template=reason_template,
            score_type=model.config.score_type,
        )
        atomic_write(staging / "README.md", card.save)
        folder.publish(extra=tuple(run_logs(trainer, training_args.output_dir)))
    trainer.accelerator.wait_for_everyone()
    if push_requested and trainer.is_world_process_zero():
        push_folder(training_args)
    return results


def run_logs(trainer, output_dir: str) -> list[str]:
    """This run's TensorBoard folder when it lies inside output_dir (the folder then owns it like its results)."""
    found = []
    for callback in trainer.callback_handler.callbacks:
        logging_dir = getattr(callback, "logging_dir", None)
        inside = Path(logging_dir).resolve() if logging_dir else None
        # Strictly inside: a log folder that is output_dir itself (TENSORBOARD_LOGGING_DIR) is not the run's to remove.
        if inside and Path(output_dir).resolve() in inside.parents and inside.is_dir():
            found.append(inside.relative_to(Path(output_dir).resolve()).as_posix())
    return found


def push_folder(training_args: ThinkRecTrainingArguments) -> None:
    """Upload the final model folder (weights, config with auto_map, code, tokenizer, card), not the
    intermediate checkpoints. The token comes from `hub_token` or the HF_TOKEN environment variable."""
    from huggingface_hub import HfApi

    if not training_args.hub_model_id:
        raise InputError("push_to_hub needs hub_model_id (e.g. 'me/thinkrec-ml1m').")
    api = HfApi(token=training_args.hub_token or os.environ.get("HF_TOKEN"))
    api.create_repo(training_args.hub_model_id, private=bool(training_args.hub_private_repo), exist_ok=True)
    api.upload_folder(
        repo_id=training_args.hub_model_id,
        folder_path=training_args.output_dir,
        ignore_patterns=["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", LOCK_NAME, MANIFEST_NAME],
        commit_message=f"ThinkRec {training_args.stage} stage",
    )
    logger.info("pushed %s to %s", training_args.output_dir, training_args.hub_model_id)


if __name__ == "__main__":
    run_command(main)
