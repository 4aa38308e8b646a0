#!/usr/bin/env python
"""The reflection loop: find a trained model's mistakes on the training split and ask a source why.

    python reflect.py args.json                                    # one .json file with every argument
    python reflect.py args.json --max_reasons 100                  # the file, with flags overriding it
    python reflect.py --model_dir out/stage1 --records_dir data/ml-100k --source synthesised

Steps: score the train split (optionally a seeded subset) and the validation split with
`ThinkRecForCausalLM.score`; choose the decision threshold on validation (the one that maximises
accuracy, or F1); take the train rows the model gets wrong at that threshold; explain them with the
chosen source (`synthesised`, `local` or `remote`, see thinkrec/reasons/); write the kept reasons as a
reasoning split (record columns, `mode="reason"`) and a summary. Train on it with
`run_thinkrec.py --reason_records <file>`; run the loop again on the new model to refresh it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from transformers import set_seed

from data_collator import build_processor, input_errors
from thinkrec.data.keywords import KEYWORDS_COLUMN, attach_keywords, item_keywords
from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.data.records import check_same_records, load_prepared
from thinkrec.reasons.reflection import (
    THRESHOLD_METRICS,
    SourceArguments,
    balance_by_label,
    build_source,
    choose_threshold,
    score_rows,
)
from thinkrec.reasons.synthesised import SynthesisedReasons
from thinkrec.training.loading import DTYPE_CHOICES, inference_device_map, load_checkpoint, load_kwargs
from thinkrec.utils.arguments import parse_args as parse_command_args
from thinkrec.utils.arguments import run_command
from thinkrec.utils.errors import ExistingOutputError, InputError
from thinkrec.utils.files import atomic_write, write_json
from thinkrec.utils.subsets import seeded_subset


logger = logging.getLogger("reflect")


@dataclass
class ReflectArguments:
    """Which model, which records, where the reasons go."""

    model_dir: str = field(metadata={"help": "A trained ThinkRec model folder (run_thinkrec.py output_dir)."})
    records_dir: str = field(metadata={"help": "The prepared records folder the model was trained on."})
    output_path: Optional[str] = field(
        default=None,
        metadata={"help": "Reason split file (.parquet); default <records_dir>/reasons/reasons-<model folder name>.parquet. "
                  "The summary goes beside it as <name>.summary.json."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file (else stop)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Score a seeded random subset of the train split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Choose the threshold on a seeded subset of validation."})
    max_reasons: Optional[int] = field(default=None, metadata={"help": "Explain at most this many mispredicted rows (seeded choice)."})
    balance_verdicts: bool = field(
        default=True,
        metadata={"help": "When the mispredicted rows lean to one label, add correctly predicted train rows of the other "
                  "label (seeded) up to equal counts: a one-sided reason split teaches one verdict for every row "
                  "(measured: 479 of 480 mispredicted ML-1M rows were negatives)."},
    )
    threshold_metric: str = field(default="accuracy", metadata={"help": f"What the validation threshold maximises: {THRESHOLD_METRICS}."})
    template: Optional[str] = field(
        default=None, metadata={"help": "Prompt template used in training (default: text_only for a text-only model, else collaborative)."}
    )
    history_item_slots: bool = field(default=False, metadata={"help": "As in training: an item slot after every history title."})
    title_keywords: int = field(default=0, metadata={"help": "As in training: keywords shown after every title."})
    max_prompt_tokens: Optional[int] = field(default=512, metadata={"help": "As in training: prompt token budget."})
    use_chat_template: bool = field(default=False, metadata={"help": "As in training: wrap prompts in the chat template."})
    batch_size: int = field(default=16, metadata={"help": "Rows per scoring batch."})
    dtype: str = field(default="auto", metadata={"help": f"Model weights: one of {list(DTYPE_CHOICES)} (auto = bfloat16 on a GPU "
                                                    "that supports it, float32 on CPU; a 4-bit base is reloaded 4-bit)."})
    seed: int = field(default=42, metadata={"help": "Subsets and the synthesiser's phrasing."})


def parse_args(argv: Optional[list[str]] = None) -> tuple[ReflectArguments, SourceArguments]:
    """A `.json` file, flags, or both (flags override the file); unknown keys are an error."""
    reflect_args, source_args = parse_command_args((ReflectArguments, SourceArguments), argv)
    if reflect_args.threshold_metric not in THRESHOLD_METRICS:
        raise InputError(f"threshold_metric must be one of {THRESHOLD_METRICS}, got {reflect_args.threshold_metric!r}.")
    if reflect_args.dtype not in DTYPE_CHOICES:
        raise InputError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {reflect_args.dtype!r}.")
    return reflect_args, source_args


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> dict:
    args, source_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    started = time.perf_counter()

    output_path = Path(args.output_path or Path(args.records_dir) / "reasons" / f"reasons-{Path(args.model_dir).resolve().name}.parquet")
    summary_path = output_path.with_suffix(".summary.json")
    if output_path.suffix != ".parquet":
        raise InputError(f"output_path must end in .parquet, got {output_path}.")
    if output_path.exists() and not args.overwrite:
        raise ExistingOutputError(f"{output_path} exists; set overwrite=true or choose another output_path.")

    records = load_prepared(args.records_dir)
    train = seeded_subset(records.splits["train"], args.max_train_samples, args.seed)
    validation = seeded_subset(records.splits["validation"], args.max_eval_samples, args.seed)
    for name, frame in (("train", train), ("validation", validation)):
        if len(frame) == 0:
            raise InputError(f"{args.records_dir}: the {name} split is empty.")

    # The one load path: a missing folder, weights or tokenizer, or a broken weights file, is one message.
    model, tokenizer = load_checkpoint(args.model_dir, "model_dir", **load_kwargs(args.dtype, device_map=inference_device_map()))
    model.eval()
    if model.config.cf_model_type != "none":
        check_same_records(model.config.cf_records_fingerprint, model.config.cf_records_dir,
                           f"the collaborative tables of model_dir={args.model_dir}", args.records_dir, records.metadata)
    template = args.template or ("text_only" if model.config.cf_model_type == "none" else "collaborative")
    processor = build_processor(
        tokenizer, template=template, history_item_slots=args.history_item_slots,
        max_prompt_tokens=args.max_prompt_tokens, use_chat_template=args.use_chat_template,
        tokens_per_id=model.config.tokens_per_id, seed=args.seed, title_keywords=args.title_keywords,
        **item_nouns_from_metadata(records.metadata, args.records_dir),
    )
    if KEYWORDS_COLUMN in records.items or processor.needs_keywords:
        # The prompts (when they show keywords) and the teachers read them from the rows; none stored is an error.
        keywords = item_keywords(records.items, f"{args.records_dir} item table")
        train, validation = attach_keywords(train, keywords), attach_keywords(validation, keywords)
    logger.info("scoring %d validation and %d train rows with %s (template %s)", len(validation), len(train), args.model_dir, template)

    with input_errors():  # a row the prompt cannot be built from stops naming the row and field
        validation_scores = score_rows(model, processor, validation, args.batch_size)
        train_scores = score_rows(model, processor, train, args.batch_size)
    threshold, validation_value = choose_threshold(validation["label"].to_numpy(), validation_scores, args.threshold_metric)
    train_labels = train["label"].to_numpy()
    wrong = (train_scores >= threshold).astype(np.int64) != train_labels
    mispredicted = train[wrong]
    logger.info("threshold %.4f (validation %s %.4f); %d of %d train rows mispredicted",
                threshold, args.threshold_metric, validation_value, len(mispredicted), len(train))
    to_explain = seeded_subset(mispredicted, args.max_reasons, args.seed)
    added_for_balance = 0
    if args.balance_verdicts:
        to_explain, added_for_balance = balance_by_label(to_explain, train[~wrong], args.seed)
        logger.info("balance_verdicts: added %d correctly predicted rows of the rarer label", added_for_balance)
    del model  # the teacher may be another LM; free this one first

    source = build_source(source_args, records, tokenizer, output_path, args.seed)
    rows = to_explain.to_dict("records")
    results = source.explain(rows)
    fallback = None
    if source_args.fallback_to_synthesised and source_args.source != "synthesised":
        missing = [index for index, result in enumerate(results) if result.status != "kept"]
        if missing:
            fallback = SynthesisedReasons.from_records(records, seed=args.seed, max_reason_tokens=source_args.max_reason_tokens,
                                                       count_tokens=source.count_tokens)
            for index, result in zip(missing, fallback.explain([rows[i] for i in missing])):
                results[index] = result
    kept = [index for index, result in enumerate(results) if result.status == "kept"]
    if not kept:
        # An empty reason split would replace an earlier one and teach nothing.
        if not rows:
            raise InputError(f"the model mispredicted none of the {len(train)} train rows scored, so there is nothing to "
                             f"explain; {output_path} was not written.")
        errors = Counter(result.error for result in results if result.status != "kept").most_common(2)
        raise InputError(f"the {source_args.source} source: none of the {len(rows)} rows asked got a usable reason "
                         f"({'; '.join(f'{count} x {error}' for error, count in errors)}); {output_path} was not written.")

    # Record columns only: keywords are attached again from the item table by whoever reads the split.
    reason_rows = to_explain.iloc[kept].drop(columns=["TargetItemKeywords", "HisItemKeywords"], errors="ignore")
    reason_rows["reason"] = [results[index].reason for index in kept]
    reason_rows["mode"] = "reason"
    atomic_write(output_path, lambda temp: reason_rows.to_parquet(temp, index=False))

    counters = source.counters.as_dict()
    summary = {
        "model_dir": str(args.model_dir),
        "records_dir": str(args.records_dir),
        "output_path": str(output_path),
        "source": source_args.source,
        "template": template,
        "rows_scored": int(len(train)),
        "validation_rows": int(len(validation)),
        "threshold": threshold,
        "threshold_metric": args.threshold_metric,
        f"validation_{args.threshold_metric}": validation_value,
        "train_accuracy": float(1 - wrong.mean()),
        "mispredicted": int(len(mispredicted)),
        "added_for_balance": int(added_for_balance),
        "mispredicted_positives": int(mispredicted["label"].sum()),
        "explained_positives": int(reason_rows["label"].sum()),
        "asked": int(len(rows)),
        "explained": int(len(kept)),
        "rejected": counters["rejected_verdict"],
        "failed": counters["failed"],
        "truncated": counters["truncated"],
        "counters": counters,
        "fallback_counters": fallback.counters.as_dict() if fallback else None,
        "max_reason_tokens": source_args.max_reason_tokens,
        "seconds": round(time.perf_counter() - started, 2),
        # api_key_env is the variable's name, never its value.
        "arguments": {**asdict(args), **asdict(source_args)},
    }
    write_json(summary, summary_path)
    print(f"scored {len(train):,} train rows; threshold {threshold:.4f} (validation {args.threshold_metric} {validation_value:.4f}); "
          f"mispredicted {len(mispredicted):,}; asked {len(rows):,}; explained {len(kept):,}; "
          f"rejected {counters['rejected_verdict']:,}; failed {counters['failed']:,}")
    print(f"reason split: {output_path}\nsummary: {summary_path}")
    print(json.dumps({key: summary[key] for key in ("rows_scored", "threshold", "mispredicted", "explained", "rejected", "failed")}))
    return summary


if __name__ == "__main__":
    run_command(main)
