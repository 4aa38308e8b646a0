#!/usr/bin/env python
"""Judge generated reasons offline against reference reasons.

    python judge_reasons.py --predictions out/test_predictions.parquet --references reasons.parquet
    python judge_reasons.py judge.json                 # or a .json file (flags after it override it)

Predictions: `run_thinkrec.py` predict output (`UserID`, `TargetItemID`, `generated`, `score` = P(Yes),
`label`). References: any Parquet / JSON-lines file of reasons keyed by `UserID`, `TargetItemID`
(e.g. a reflect.py reason split). Metrics: BLEU (sacrebleu, 0-100), ROUGE-L F (rouge-score),
METEOR (nltk with WordNet; skipped with the reason when WordNet is absent), cosine similarity of
all-MiniLM-L6-v2 sentence embeddings, verdict agreement with the score and with the label, whether
the body argues for its verdict (a stance checker fitted on the references, its held-out accuracy
reported), grounding (with --records_dir: the share of titles, genres and keywords a reason names that
belong to the row's own target and history), length statistics and the repeated-n-gram rate. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Optional

from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.data.records import load_prepared
from thinkrec.reasons.judge import KEYS, Grounding, StanceChecker, common_english_words, judge, pair_with_references, read_table
from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError
from thinkrec.utils.files import write_json


@dataclass
class JudgeArguments:
    predictions: str = field(metadata={"help": "Predictions file (.parquet/.jsonl), e.g. run_thinkrec's test_predictions.parquet."})
    references: Optional[str] = field(default=None, metadata={"help": "Reference reasons keyed by UserID, TargetItemID (.parquet/.jsonl)."})
    generated_column: str = field(default="generated", metadata={"help": "Column of generated text in the predictions."})
    reference_column: str = field(default="reason", metadata={"help": "Column of reference text in the references."})
    score_column: str = field(default="score", metadata={"help": "P(Yes) column in the predictions (absent = no score agreement)."})
    threshold: float = field(default=0.5, metadata={"help": "The score's verdict is Yes when score >= threshold."})
    ngram: int = field(default=3, metadata={"help": "n of the repeated-n-gram rate."})
    embedding_model: Optional[str] = field(default=None, metadata={"help": "Sentence encoder folder (default: bundled all-MiniLM-L6-v2)."})
    no_embeddings: bool = field(default=False, metadata={"help": "Skip the cosine similarity and the stance check."})
    records_dir: Optional[str] = field(
        default=None, metadata={"help": "The prepared records the predictions come from: gives grounding (names in a reason "
                                "that belong to the row's target and history) from the item table and the test histories."}
    )
    stance_references: Optional[str] = field(
        default=None, metadata={"help": "Reasons (.parquet/.jsonl, column reference_column) the stance checker is fitted on "
                                "(default: the references). It predicts a reason's verdict from its body alone."}
    )
    seed: int = field(default=0, metadata={"help": "Split of the stance references into fit and held-out parts."})
    output_json: Optional[str] = field(default=None, metadata={"help": "Also write the results to this file."})


def format_table(result: dict) -> str:
    """The results as a two-column text table, skipped metrics with their reason."""
    lines = [f"{'metric':<28} value", f"{'-' * 28} {'-' * 12}"]
    for name, value in result.items():
        if name == "skipped":
            continue
        lines.append(f"{name:<28} {value:.4f}" if isinstance(value, float) else f"{name:<28} {value}")
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"{name:<28} skipped: {reason}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    (args,) = parse_args((JudgeArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    predictions = read_table(args.predictions)
    if args.generated_column not in predictions:
        raise InputError(f"{args.predictions}: no {args.generated_column!r} column (run run_thinkrec.py predict with "
                         f"generate_reasons_for > 0); found {list(predictions.columns)}.")
    if args.references:
        rows = pair_with_references(predictions, read_table(args.references), args.generated_column, args.reference_column,
                                    args.predictions, args.references)
        unmatched = int(predictions[args.generated_column].notna().sum()) - len(rows)
        if len(rows) == 0:
            raise InputError(f"no generated row of {args.predictions} has a reference in {args.references} (joined on {KEYS}).")
        references = rows["_reference"].tolist()
    else:
        rows, unmatched, references = predictions[predictions[args.generated_column].notna()], 0, None
    stance, stance_skipped = None, None
    stance_source = args.stance_references or args.references
    if stance_source and not args.no_embeddings:
        stance_frame = read_table(stance_source)
        if args.reference_column not in stance_frame:
            raise InputError(f"{stance_source}: no {args.reference_column!r} column for the stance checker; found {list(stance_frame.columns)}.")
        try:
            stance = StanceChecker.fit(stance_frame[args.reference_column].fillna("").tolist(), seed=args.seed,
                                       model_dir=args.embedding_model)
        except ValueError as error:
            if args.stance_references:  # asked for by name: its problem is an error
                raise InputError(f"{stance_source}: {error}") from error
            stance_skipped = f"{stance_source}: {error}"
    grounding, item_ids = None, None
    if args.records_dir:
        records = load_prepared(args.records_dir)
        history = records.splits["test"].drop_duplicates(KEYS).set_index(KEYS)["HisItemIDs"]
        keys = list(zip(rows["UserID"], rows["TargetItemID"]))
        unknown = [key for key in keys if key not in history.index]
        if unknown:
            raise InputError(f"{args.predictions}: {len(unknown)} judged rows are not test rows of {args.records_dir}, e.g. {unknown[0]}.")
        item_ids = [[int(key[1]), *[int(i) for i in history.loc[key]]] for key in keys]
        nouns = item_nouns_from_metadata(records.metadata, args.records_dir)
        grounding = Grounding(records.items, common_english_words([nouns["item_noun"], nouns["item_noun_plural"]]))
    result = judge(
        rows[args.generated_column].tolist(),
        references,
        scores=rows[args.score_column].to_numpy() if args.score_column in rows else None,
        labels=rows["label"].to_numpy() if "label" in rows else None,
        threshold=args.threshold,
        ngram=args.ngram,
        embedding_model=args.embedding_model,
        use_embeddings=not args.no_embeddings,
        stance=stance,
        grounding=grounding,
        item_ids=item_ids,
    )
    result["rows_without_reference"] = unmatched
    if stance_skipped:
        result["skipped"]["body_agrees_with_verdict"] = stance_skipped
    print(f"reasons in {args.predictions}" + (f" against {args.references}" if args.references else ""))
    print(format_table(result))
    if args.output_json:
        write_json(result, args.output_json)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_command(main)
