#!/usr/bin/env python
"""Give every item of a prepared records folder up to ten keywords (ThinkRec's thinking activation).

    python extract_keywords.py --records_dir outputs/quickstart/records                  # offline default (MiniLM)
    python extract_keywords.py --records_dir data/ml1m --method tfidf
    python extract_keywords.py --records_dir data/ml1m --method local --teacher_model Qwen/Qwen2.5-7B-Instruct
    python extract_keywords.py --records_dir data/ml1m --method remote --base_url http://127.0.0.1:8000/v1 \\
        --remote_model qwen2.5-7b-instruct                     # the key, if any, from $OPENAI_API_KEY

The keywords are written into the folder's item table (a `keywords` column; metadata.json says how they
were made). Templates show them with <TargetItemKeywords>, or every title with its keywords through
run_thinkrec.py's `title_keywords`; the synthesised reasons and the teacher prompts use them too.
Teacher answers are cached (JSON lines beside the records), so an interrupted run resumes. Items without
any metadata text and teacher answers without a keyword are counted and reported, never filled in. A
teacher that cannot be reached, or a run in which no item got a keyword, stops with an error and leaves
the item table as it was.
Last line: one JSON object with the counts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from thinkrec.data.keywords import (
    KEYWORDS_COLUMN,
    MAX_KEYWORDS,
    METHODS,
    minilm_keywords,
    save_item_keywords,
    teacher_keywords,
    tfidf_keywords,
)
from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.data.records import load_prepared
from thinkrec.reasons.reflection import TeacherArguments, build_teacher
from thinkrec.training.backbones import SMOLLM2_HUB_ID
from thinkrec.utils.arguments import parse_args as parse_command_args
from thinkrec.utils.arguments import run_command
from thinkrec.utils.errors import ExistingOutputError, InputError
from thinkrec.utils.files import output_lock


logger = logging.getLogger("extract_keywords")


@dataclass
class KeywordArguments:
    records_dir: str = field(metadata={"help": "A prepared records folder (prepare_data.py output)."})
    method: str = field(default="minilm", metadata={"help": f"One of {METHODS}."})
    max_keywords: int = field(default=MAX_KEYWORDS, metadata={"help": "Keywords per item at most."})
    diversity: float = field(default=0.3, metadata={"help": "minilm: weight of novelty against relevance (0 = most similar only)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace keywords the item table already has (else stop)."})
    embedding_model: Optional[str] = field(default=None, metadata={"help": "minilm: sentence encoder folder (default: bundled all-MiniLM-L6-v2)."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}.")
        if not 1 <= self.max_keywords <= 50:
            raise InputError(f"max_keywords must be in [1, 50], got {self.max_keywords}.")


def main(argv: Optional[list[str]] = None) -> dict:
    # The teacher settings (teacher_model, base_url, remote_model, cache_path, ...) are reflect.py's.
    args, teacher_args = parse_command_args((KeywordArguments, TeacherArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # The records folder is rewritten (item table, metadata, card): one run on it at a time, prepare_data.py included.
    with output_lock(args.records_dir, "extract_keywords.py"):
        return extract(args, teacher_args)


def extract(args: KeywordArguments, teacher_args: TeacherArguments) -> dict:
    """Keywords for every item of the records, stored in their item table; returns the run's summary."""
    started = time.perf_counter()
    records = load_prepared(args.records_dir)
    if KEYWORDS_COLUMN in records.items and not args.overwrite:
        raise ExistingOutputError(f"{args.records_dir}: the items already have keywords "
                                  f"({records.metadata.get('item_keywords', {}).get('method', 'unknown method')}); set overwrite=true to replace them.")
    nouns = item_nouns_from_metadata(records.metadata, args.records_dir)
    model_name = None
    if args.method == "minilm":
        keywords, counters = minilm_keywords(records.items, args.max_keywords, args.diversity, args.embedding_model)
        model_name = args.embedding_model or "sentence-transformers/all-MiniLM-L6-v2"
    elif args.method == "tfidf":
        keywords, counters = tfidf_keywords(records.items, args.max_keywords)
    else:
        cache = teacher_args.cache_path or str(Path(args.records_dir) / f"keywords-{args.method}.cache.jsonl")
        # The keyword cache (keyed by ItemID) is kept by teacher_keywords, not by the teacher's reason cache.
        teacher = build_teacher(args.method, replace(teacher_args, cache_path=None), nouns)
        model_name = teacher_args.remote_model if args.method == "remote" else (teacher_args.teacher_model or SMOLLM2_HUB_ID)
        keywords, counters = teacher_keywords(teacher, records.items, cache, model_name, nouns["item_noun"], args.max_keywords)
    if not counters.with_keywords:
        # An empty keyword column would replace the item table (and any keywords it had) with nothing.
        failures = "; ".join(f"{count} x {error}" for error, count in counters.failures.items())
        raise InputError(f"{args.records_dir}: no item got a keyword ({counters.items} items: {counters.without_metadata} without "
                         f"metadata text, {counters.failed} teacher answers without a keyword{f': {failures}' if failures else ''}); "
                         f"the item table was left as it was.")
    info = {"method": args.method, "model": model_name, "max_keywords": args.max_keywords, **counters.as_dict()}
    path = save_item_keywords(args.records_dir, keywords, info)
    counts = [len(words) for words in keywords.values()]
    summary = {**info, "keywords_mean": float(sum(counts) / max(len(counts), 1)), "item_table": str(path),
               "seconds": round(time.perf_counter() - started, 2),
               # api_key_env is the variable's name, never its value.
               "arguments": {**asdict(args), **asdict(teacher_args)}}
    example = next(((item_id, words) for item_id, words in keywords.items() if words), None)
    print(f"{counters.items:,} items: {counters.with_keywords:,} with keywords ({summary['keywords_mean']:.1f} each on average), "
          f"{counters.without_metadata:,} without metadata, {counters.failed:,} teacher answers without a keyword, "
          f"{counters.cached:,} from the cache")
    if example:
        print(f"e.g. item {example[0]}: {', '.join(example[1])}")
    print(json.dumps({key: summary[key] for key in ("method", "items", "with_keywords", "without_metadata", "failed", "cached", "keywords_mean")}))
    return summary


if __name__ == "__main__":
    run_command(main)
