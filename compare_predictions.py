#!/usr/bin/env python
"""Compare two models' predictions on the same test rows, with 95% intervals.

    python compare_predictions.py A/test_predictions.parquet B/test_predictions.parquet
    python compare_predictions.py A.parquet B.parquet --metrics auc,uauc,ndcg@5 --resamples 2000 --seed 1
    python compare_predictions.py s2/test_predictions.parquet s2/test_predictions.parquet --score_column_a cf_score
    python compare_predictions.py A/ranking_predictions.parquet B/ranking_predictions.parquet   # HR@k, NDCG@k, MRR
    python compare_predictions.py compare.json          # or a .json file of the arguments (flags after it override it)

A and B are `test_predictions.parquet` files of run_thinkrec.py or train_collaborative.py (columns UserID,
TargetItemID, label, score; run_thinkrec.py's also has cf_score, the CF model's own score, so the last example
compares the CF model alone, A, with the LLM, B). Rows are paired by (UserID, TargetItemID), whatever their
order; a row in one file only, a repeated key or a label that differs stops with the file and the row.
Two `ranking_predictions.parquet` files (eval_protocol 'ranking') are paired by (PoolID, TargetItemID) and
compared on HR@k, NDCG@k and MRR over pools, the bootstrap still over users.

Prints metric, A, B, delta = B - A, the 95% interval of the delta from a paired bootstrap over users (every
row of a drawn user kept, both models recomputed on the same resamples) and what it says: "B better",
"A better" or "no difference (interval includes 0)"; with auc, DeLong's test for the AUC difference too
(it treats rows as independent). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from thinkrec.data.readers import read_table_file
from thinkrec.evaluation.metrics import CI_RESAMPLES, INTERVAL_METRICS, compare_prediction_frames, format_comparison, parse_interval_metric
from thinkrec.evaluation.ranking import POOL_COLUMN, POOL_METRICS, compare_ranking_frames, pool_metric_names
from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError
from thinkrec.utils.files import json_text


@dataclass
class CompareArguments:
    predictions_a: str = field(metadata={"help": "A: a test_predictions.parquet (also the first positional argument)."})
    predictions_b: str = field(metadata={"help": "B: a test_predictions.parquet on the same rows (also the second positional argument)."})
    metrics: Optional[str] = field(default=None, metadata={
        "help": f"Comma-separated metrics: of {INTERVAL_METRICS} for test predictions (default auc,uauc), of {POOL_METRICS} for "
                "ranking predictions (files with a PoolID column; default HR@k and NDCG@k for k in 1, 5, 10, 20 that fit, and MRR)."})
    resamples: int = field(default=CI_RESAMPLES, metadata={"help": f"Bootstrap resamples of the users (at least {CI_RESAMPLES})."})
    seed: int = field(default=0, metadata={"help": "Seed of the resamples: the same seed gives the same intervals."})
    score_column: str = field(default="score", metadata={"help": "Score column of both files."})
    score_column_a: Optional[str] = field(default=None, metadata={"help": "Score column of A (default: score_column), e.g. cf_score."})
    score_column_b: Optional[str] = field(default=None, metadata={"help": "Score column of B (default: score_column)."})

    def __post_init__(self):
        self.metric_list = [] if self.metrics is None else [name.strip() for name in self.metrics.split(",") if name.strip()]
        if self.metrics is not None and not self.metric_list:
            raise InputError(f"metrics: name at least one of {INTERVAL_METRICS} (or {POOL_METRICS} for ranking files), "
                             f"got {self.metrics!r}.")
        for name in self.metric_list:  # each a metric of one of the two kinds; the files decide which kind applies
            try:
                parse_interval_metric(name)
            except InputError:
                pool_metric_names([name])


def positional_files(argv: list[str]) -> list[str]:
    """``A B --flags`` as ``--predictions_a A --predictions_b B --flags``; an arguments .json first is left alone."""
    argv, files = list(argv), []
    if argv and argv[0].endswith(".json"):
        return argv
    while argv and len(files) < 2 and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    return [token for flag, path in zip(("--predictions_a", "--predictions_b"), files) for token in (flag, path)] + argv


def main(argv: Optional[list[str]] = None) -> dict:
    (args,) = parse_args((CompareArguments,), positional_files(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    column_a, column_b = args.score_column_a or args.score_column, args.score_column_b or args.score_column
    frames = [read_table_file(path, what="predictions file") for path in (args.predictions_a, args.predictions_b)]
    ranking = [POOL_COLUMN in frame.columns for frame in frames]
    if ranking[0] != ranking[1]:
        kinds = ["a ranking predictions file (PoolID column)" if flag else "a test predictions file (no PoolID column)" for flag in ranking]
        raise InputError(f"{args.predictions_a} is {kinds[0]} but {args.predictions_b} is {kinds[1]}: compare files of one kind.")
    title = f"A = {args.predictions_a} ({column_a})\nB = {args.predictions_b} ({column_b})"
    if ranking[0]:
        comparison = compare_ranking_frames(*frames, args.predictions_a, args.predictions_b, column_a, column_b,
                                            pool_metric_names(args.metric_list) if args.metric_list else (), args.resamples, args.seed)
        print(format_comparison(comparison, title=title))
    else:
        comparison = compare_prediction_frames(*frames, args.predictions_a, args.predictions_b, column_a, column_b,
                                               args.metric_list or ["auc", "uauc"], args.resamples, args.seed)
        print(format_comparison(comparison, title=title))
    result = {"a": args.predictions_a, "b": args.predictions_b, "score_column_a": column_a, "score_column_b": column_b, **comparison}
    print(json_text(result, indent=None))
    return result


if __name__ == "__main__":
    run_command(main)
