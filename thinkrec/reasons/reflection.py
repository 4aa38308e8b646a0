"""Reflection: find a trained model's mistakes and choose the rows to explain. The command is
`reflect.py` at the repository root; the reason sources are in `thinkrec.reasons`
(`synthesised`, `local_teacher`, `remote_teacher`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.reasons.local_teacher import LocalTeacher
from thinkrec.reasons.remote_teacher import RemoteTeacher
from thinkrec.reasons.synthesised import SynthesisedReasons
from thinkrec.training.loading import DTYPE_CHOICES, inference_device_map, load_kwargs
from thinkrec.utils.errors import InputError
from thinkrec.utils.subsets import seeded_subset


SOURCES = ("synthesised", "local", "remote")
THRESHOLD_METRICS = ("accuracy", "f1")


@dataclass
class TeacherArguments:
    """A local HF teacher or an OpenAI-compatible remote one (thinkrec/reasons/local_teacher.py,
    remote_teacher.py); used for
    reasons (reflect.py) and for item keywords (extract_keywords.py)."""

    teacher_model: Optional[str] = field(default=None, metadata={"help": "local: HF causal LM path or id (default: bundled SmolLM2-135M-Instruct)."})
    teacher_batch_size: int = field(default=8, metadata={"help": "local: rows per generation batch."})
    teacher_dtype: str = field(default="auto", metadata={"help": f"local: weights, one of {list(DTYPE_CHOICES)} (auto = bfloat16 "
                                                              "on a GPU that supports it, float32 on the CPU)."})
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "local: load the teacher in 4-bit NF4 (bitsandbytes)."})
    teacher_attn_implementation: Optional[str] = field(default=None, metadata={"help": "local: e.g. sdpa, flash_attention_2."})
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


@dataclass
class SourceArguments(TeacherArguments):
    """Where the reasons come from: one of `SOURCES` (thinkrec/reasons/)."""

    source: str = field(default="synthesised", metadata={"help": f"One of {SOURCES}."})
    max_reason_tokens: int = field(default=200, metadata={"help": "Cap per reason, in the trained model's tokens; cut at a sentence."})
    fallback_to_synthesised: bool = field(
        default=False, metadata={"help": "Explain rows the teacher failed or contradicted with the synthesiser instead of dropping them."}
    )

    def __post_init__(self):
        if self.source not in SOURCES:
            raise InputError(f"source must be one of {SOURCES}, got {self.source!r}.")
        if self.source == "remote" and not (self.base_url and self.remote_model):
            raise InputError("source 'remote' needs base_url and remote_model.")


def score_rows(model, processor, frame: pd.DataFrame, batch_size: int) -> np.ndarray:
    """P("Yes") for every row of `frame`, in order; `processor` (the model's `ThinkRecProcessor`) turns
    each batch of records into the model's inputs."""
    records = frame.to_dict("records")
    scores = []
    for start in range(0, len(records), batch_size):
        batch = processor(records[start : start + batch_size])
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
    return build_teacher(source_args.source, source_args, item_nouns_from_metadata(records.metadata),
                         cache_path=str(output_path.with_suffix(".cache.jsonl")), max_reason_tokens=source_args.max_reason_tokens,
                         count_tokens=count_tokens)


def build_teacher(kind: str, teacher_args: TeacherArguments, nouns: dict, cache_path: Optional[str] = None,
                  max_reason_tokens: int = 200, count_tokens=None):
    """A `LocalTeacher` (kind "local") or `RemoteTeacher` ("remote") from `teacher_args`. The remote one
    caches its answers in `teacher_args.cache_path`, else `cache_path`; the local one is not cached."""
    if kind == "local":
        # The one load path (dtype, 4-bit, attention), on the GPU when there is one.
        kwargs = load_kwargs(teacher_args.teacher_dtype, teacher_args.teacher_load_in_4bit,
                             teacher_args.teacher_attn_implementation, device_map=inference_device_map())
        teacher = LocalTeacher(teacher_args.teacher_model, batch_size=teacher_args.teacher_batch_size,
                               max_new_tokens=teacher_args.teacher_max_new_tokens, max_reason_tokens=max_reason_tokens,
                               load_kwargs=kwargs, **nouns)
        if count_tokens is not None:
            teacher.count_tokens = count_tokens
        return teacher
    if kind != "remote":
        raise InputError(f"a teacher is 'local' or 'remote', got {kind!r}.")
    if not (teacher_args.base_url and teacher_args.remote_model):
        raise InputError("a remote teacher needs base_url and remote_model.")
    return RemoteTeacher(
        teacher_args.base_url, teacher_args.remote_model, api_key_env=teacher_args.api_key_env,
        cache_path=teacher_args.cache_path or cache_path, concurrency=teacher_args.concurrency,
        max_retries=teacher_args.max_retries, timeout=teacher_args.request_timeout, max_tokens=teacher_args.teacher_max_new_tokens,
        max_reason_tokens=max_reason_tokens, count_tokens=count_tokens, **nouns,
    )
