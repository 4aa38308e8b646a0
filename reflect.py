#!/usr/bin/env python
"""The reflection loop: find a trained model's mistakes on the training split and ask a source why.

    python reflect.py args.json                                    # one .json file with every argument
    python reflect.py --model_dir out/stage1 --records_dir data/ml-100k --source synthesised

Steps: score the train split (optionally a seeded subset) and the validation split with
`ThinkRecForCausalLM.score`; choose the decision threshold on validation (the one that maximises
accuracy, or F1); take the train rows the model gets wrong at that threshold; explain them with the
chosen source (`synthesised`, `local` or `remote`, see reason_sources.py); write the kept reasons as a
reasoning split (record columns, `mode="reason"`) and a summary. Train on it with
`run_thinkrec.py --reason_records <file>`; run the loop again on the new model to refresh it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, HfArgumentParser, set_seed

from data_collator import ThinkRecCollator
from modeling_thinkrec import ThinkRecForCausalLM
from reason_sources import SOURCES, LocalTeacher, RemoteTeacher, SynthesisedReasons
from records_io import load_prepared


logger = logging.getLogger("reflect")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
THRESHOLD_METRICS = ("accuracy", "f1")


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
        default=False,
        metadata={"help": "When the mispredicted rows lean to one label, add correctly predicted train rows of the other "
                  "label (seeded) up to equal counts: a one-sided reason split teaches one verdict for every row."},
    )
    threshold_metric: str = field(default="accuracy", metadata={"help": f"What the validation threshold maximises: {THRESHOLD_METRICS}."})
    template: Optional[str] = field(
        default=None, metadata={"help": "Prompt template used in training (default: text_only for a text-only model, else collaborative)."}
    )
    history_item_slots: bool = field(default=False, metadata={"help": "As in training: an item slot after every history title."})
    max_prompt_tokens: Optional[int] = field(default=512, metadata={"help": "As in training: prompt token budget."})
    use_chat_template: bool = field(default=False, metadata={"help": "As in training: wrap prompts in the chat template."})
    batch_size: int = field(default=16, metadata={"help": "Rows per scoring batch."})
    dtype: str = field(default="float32", metadata={"help": f"Model weights: one of {list(DTYPES)}."})
    seed: int = field(default=42, metadata={"help": "Subsets and the synthesiser's phrasing."})


@dataclass
class SourceArguments:
    """Where the reasons come from (reason_sources.py)."""

    source: str = field(default="synthesised", metadata={"help": f"One of {SOURCES}."})
    max_reason_tokens: int = field(default=200, metadata={"help": "Cap per reason, in the trained model's tokens; cut at a sentence."})
    fallback_to_synthesised: bool = field(
        default=False, metadata={"help": "Explain rows the teacher failed or contradicted with the synthesiser instead of dropping them."}
    )
    teacher_model: Optional[str] = field(default=None, metadata={"help": "local: HF causal LM path or id (default: bundled SmolLM2-135M-Instruct)."})
    teacher_batch_size: int = field(default=8, metadata={"help": "local: rows per generation batch."})
    teacher_max_new_tokens: int = field(default=160, metadata={"help": "local/remote: tokens the teacher may write."})
    base_url: Optional[str] = field(default=None, metadata={"help": "remote: e.g. http://127.0.0.1:8080/v1."})
    remote_model: Optional[str] = field(default=None, metadata={"help": "remote: model name sent with each request."})
    api_key_env: Optional[str] = field(
        default="OPENAI_API_KEY", metadata={"help": "remote: NAME of the environment variable holding the API key (the key is never saved)."}
    )
    cache_path: Optional[str] = field(
        default=None, metadata={"help": "remote: answer cache (JSON lines); default <output_path>.cache.jsonl. A rerun asks only the rest."}
    )
    concurrency: int = field(default=4, metadata={"help": "remote: requests in flight."})
    max_retries: int = field(default=4, metadata={"help": "remote: retries per row (429/5xx/timeouts/bad answers)."})
    request_timeout: float = field(default=60.0, metadata={"help": "remote: seconds per request."})

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}.")
        if self.source == "remote" and not (self.base_url and self.remote_model):
            raise ValueError("source 'remote' needs base_url and remote_model.")


def parse_args(argv: Optional[list[str]] = None) -> tuple[ReflectArguments, SourceArguments]:
    """One `.json` file (unknown keys are an error) or command-line flags."""
    parser = HfArgumentParser((ReflectArguments, SourceArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        reflect_args, source_args = parser.parse_json_file(os.path.abspath(argv[0]), allow_extra_keys=False)
    else:
        reflect_args, source_args = parser.parse_args_into_dataclasses(args=argv)
    if reflect_args.threshold_metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold_metric must be one of {THRESHOLD_METRICS}, got {reflect_args.threshold_metric!r}.")
    if reflect_args.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {reflect_args.dtype!r}.")
    return reflect_args, source_args


# ---------------------------------------------------------------------------------------- pieces


def seeded_subset(frame: pd.DataFrame, size: Optional[int], seed: int) -> pd.DataFrame:
    """A seeded random subset kept in the split's order."""
    if size is None or size >= len(frame):
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=size, replace=False))
    return frame.iloc[rows]


def score_rows(model: ThinkRecForCausalLM, collator: ThinkRecCollator, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """P("Yes") for every row of `frame`, in order."""
    records = frame.to_dict("records")
    scores = []
    for start in range(0, len(records), batch_size):
        batch = collator(records[start : start + batch_size])
        batch = {key: value.to(model.device) for key, value in batch.items()}
        scores.append(model.score(**batch).float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def balance_by_label(chosen: pd.DataFrame, pool: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, int]:
    """`chosen` plus seeded rows of `pool` carrying the label `chosen` has fewer of, until both labels
    have as many rows (or the pool runs out); rows stay in split order. Returns the rows and how many
    were added."""
    counts = chosen["label"].value_counts()
    positives, negatives = int(counts.get(1, 0)), int(counts.get(0, 0))
    if positives == negatives:
        return chosen, 0
    minority = 1 if positives < negatives else 0
    extra = seeded_subset(pool[pool["label"] == minority], abs(positives - negatives), seed)
    return pd.concat([chosen, extra]).sort_index(), len(extra)


def choose_threshold(labels: np.ndarray, scores: np.ndarray, metric: str = "accuracy") -> tuple[float, float]:
    """(threshold, metric value): predict Yes when score >= threshold, at the cut that maximises
    accuracy or F1 on these rows; ties go to the cut nearest 0.5."""
    labels, scores = np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("choose_threshold: no rows to choose a threshold on.")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Cut k = the k highest-scored rows predicted Yes; only cuts between distinct scores are possible.
    n = len(labels)
    cuts = np.r_[0, np.flatnonzero(np.diff(sorted_scores) != 0) + 1, n]
    true_pos = np.r_[0, np.cumsum(sorted_labels)][cuts]
    false_pos = cuts - true_pos
    positives = int(labels.sum())
    if metric == "accuracy":
        values = (true_pos + (n - positives - false_pos)) / n
    else:
        denominator = cuts + positives
        values = np.divide(2 * true_pos, denominator, out=np.zeros(len(cuts)), where=denominator > 0)
    # The threshold of cut k lies midway between the last Yes score and the first No score.
    last_yes = sorted_scores[np.clip(cuts - 1, 0, n - 1)]
    first_no = sorted_scores[np.clip(cuts, 0, n - 1)]
    thresholds = (last_yes + first_no) / 2
    thresholds[cuts == 0] = np.nextafter(sorted_scores[0], np.inf)
    thresholds[cuts == n] = sorted_scores[-1]
    best = np.flatnonzero(values == values.max())
    pick = best[np.argmin(np.abs(thresholds[best] - 0.5))]
    return float(thresholds[pick]), float(values[pick])


def build_source(source_args: SourceArguments, records, tokenizer, output_path: Path, seed: int):
    """The reason source named by `source`, its length cap counted in the trained model's tokens."""
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if source_args.source == "synthesised":
        return SynthesisedReasons.from_records(records, seed=seed, max_reason_tokens=source_args.max_reason_tokens,
                                               count_tokens=count_tokens)
    if source_args.source == "local":
        teacher = LocalTeacher(source_args.teacher_model, batch_size=source_args.teacher_batch_size,
                               max_new_tokens=source_args.teacher_max_new_tokens, max_reason_tokens=source_args.max_reason_tokens)
        teacher.count_tokens = count_tokens
        return teacher
    cache_path = source_args.cache_path or str(output_path.with_suffix(".cache.jsonl"))
    return RemoteTeacher(
        source_args.base_url, source_args.remote_model, api_key_env=source_args.api_key_env, cache_path=cache_path,
        concurrency=source_args.concurrency, max_retries=source_args.max_retries, timeout=source_args.request_timeout,
        max_tokens=source_args.teacher_max_new_tokens, max_reason_tokens=source_args.max_reason_tokens, count_tokens=count_tokens,
    )


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place: readers see the
    old file or the whole new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> dict:
    args, source_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    started = time.perf_counter()

    output_path = Path(args.output_path or Path(args.records_dir) / "reasons" / f"reasons-{Path(args.model_dir).resolve().name}.parquet")
    summary_path = output_path.with_suffix(".summary.json")
    if output_path.suffix != ".parquet":
        raise ValueError(f"output_path must end in .parquet, got {output_path}.")
    if output_path.exists() and not args.overwrite:
        raise FileExistsError(f"{output_path} exists; set overwrite=true or choose another output_path.")

    records = load_prepared(args.records_dir)
    train = seeded_subset(records.splits["train"], args.max_train_samples, args.seed)
    validation = seeded_subset(records.splits["validation"], args.max_eval_samples, args.seed)
    for name, frame in (("train", train), ("validation", validation)):
        if len(frame) == 0:
            raise ValueError(f"{args.records_dir}: the {name} split is empty.")

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise FileNotFoundError(f"model_dir={args.model_dir}: not a ThinkRec model folder (no config.json).")
    model = ThinkRecForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    template = args.template or ("text_only" if model.config.cf_model_type == "none" else "collaborative")
    collator = ThinkRecCollator(
        tokenizer, template=template, include_answers=False, history_item_slots=args.history_item_slots,
        max_prompt_tokens=args.max_prompt_tokens, use_chat_template=args.use_chat_template,
        tokens_per_id=model.config.tokens_per_id, seed=args.seed,
    )
    logger.info("scoring %d validation and %d train rows with %s (template %s)", len(validation), len(train), args.model_dir, template)

    validation_scores = score_rows(model, collator, validation, args.batch_size)
    threshold, validation_value = choose_threshold(validation["label"].to_numpy(), validation_scores, args.threshold_metric)
    train_scores = score_rows(model, collator, train, args.batch_size)
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

    reason_rows = to_explain.iloc[kept].copy()
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
    atomic_write(summary_path, lambda temp: Path(temp).write_text(json.dumps(summary, indent=2), encoding="utf-8"))
    print(f"scored {len(train):,} train rows; threshold {threshold:.4f} (validation {args.threshold_metric} {validation_value:.4f}); "
          f"mispredicted {len(mispredicted):,}; asked {len(rows):,}; explained {len(kept):,}; "
          f"rejected {counters['rejected_verdict']:,}; failed {counters['failed']:,}")
    print(f"reason split: {output_path}\nsummary: {summary_path}")
    print(json.dumps({key: summary[key] for key in ("rows_scored", "threshold", "mispredicted", "explained", "rejected", "failed")}))
    return summary


if __name__ == "__main__":
    main()
