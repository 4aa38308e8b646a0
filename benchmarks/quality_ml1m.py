#!/usr/bin/env python
"""Does the LLM recommender beat the collaborative model it reads? ML-1M (CoLLM split).

Rows: MF alone, text-only LoRA (stage 1, TALLRec-style), stage 1 + projector (stage 2,
CoLLM-style), and with --experts a control (stage 2's one LoRA trained further on the experts' rows)
and stage 2 + user-cluster LoRA experts (stage 3, ThinkRec-style) for 2 and 5 clusters, trained with hard routing (each row trains its cluster's expert, as published, and
the general expert) and evaluated under hard and soft routing; AUC / UAUC / warm / cold AUC on the
same test rows. A stage whose folder already holds results for the same arguments is reused.

    python benchmarks/quality_ml1m.py                    # --preset cpu: seeded train subsets, the whole test split
    python benchmarks/quality_ml1m.py --preset gpu       # the full protocol (all rows, bf16, eval + best checkpoint)
    python benchmarks/quality_ml1m.py --experts          # + stage 3 with 2 and 5 clusters, hard and soft routing

Presets (same script, only sizes and precision differ):
  cpu: train on a fixed seeded subset of the train split per stage, evaluate on the whole test split
       (7,331 rows, 320 users), short prompts (history trimmed to the token budget);
  gpu: every train row, the whole validation split for checkpoint choice, the whole test split.

MF comes from train_collaborative.py with the reproduction settings (trained here unless
--mf_checkpoint is given). A second table gives each row minus its baseline (MF alone for stages 1
and 2, stage 2 for the control and the experts) and minus the control, on the same test rows, with the
95% interval of a paired bootstrap over users and DeLong's p for AUC. Last line: one JSON object
{"train_rows", "test_rows", "mf": {"auc", "uauc", ...}, "stage1": {...}, "stage2": {...}, "experts_k2_hard": {...}, ...,
 "deltas": {"stage2": {"mf": {"auc": {"delta", "ci95", "verdict"}, "uauc": {...}, "delong_p"}}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Optional


REPO_ROOT = Path(__file__).resolve().parents[1]

from configuration_thinkrec import SCORE_TYPES  # noqa: E402
from thinkrec.evaluation.metrics import CI_RESAMPLES, compare_against_references, format_delta_table, format_interval, summarise_deltas  # noqa: E402
from thinkrec.utils.environment import benchmark_environment  # noqa: E402
from thinkrec.utils.subsets import metric_cell  # noqa: E402


DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"
PREDICTIONS = "test_predictions.parquet"

PRESETS = {
    "cpu": {
        "train_rows": 3072,  # 384 steps of 8 rows per stage: ~28 min each at ~4.4 s/step on 2 idle cores
        "eval_rows": 300,
        # The whole test split (7,331 rows, 320 users, 224 with both labels for UAUC): a seeded subset of 3,000
        # rows of whole users leaves UAUC on 98 users, and shared-prefix scoring makes the whole split affordable.
        "test_rows": None,
        "max_prompt_tokens": 160,
        "dtype": "float32",  # bf16 matmuls are several times slower than fp32 on these CPUs
        "train_batch_size": 8,
        "eval_batch_size": 32,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "epochs": 1,
        "eval_strategy": "no",
        # logit("Yes") - logit("No"): starts near BCE 0.69; with the raw "Yes" logit a 512-row run started
        # at BCE 3.9 and spent ~40 of its 64 steps bringing the logit down before ranking anything.
        "score_type": "yes_no_log_odds",
    },
    "gpu": {
        "train_rows": None,
        "eval_rows": None,
        "test_rows": None,
        "max_prompt_tokens": 512,
        "dtype": "bfloat16",
        "train_batch_size": 16,
        "eval_batch_size": 64,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-4,
        "epochs": 2,
        "eval_strategy": "steps",
        "score_type": "yes_no_log_odds",
    },
}


def run_stage(name: str, settings: dict, args, records: Path, output: Path, extra: dict) -> tuple[dict, float]:
    """One run_thinkrec.py stage in-process; returns its test metrics and wall seconds."""
    import run_thinkrec

    config = {
        "records_dir": str(records),
        "output_dir": str(output / name),
        "max_train_samples": settings["train_rows"],
        "max_eval_samples": settings["eval_rows"],
        "max_test_samples": settings["test_rows"],
        "max_prompt_tokens": settings["max_prompt_tokens"],
        "dtype": settings["dtype"],
        "per_device_train_batch_size": settings["train_batch_size"],
        "per_device_eval_batch_size": settings["eval_batch_size"],
        "gradient_accumulation_steps": settings["gradient_accumulation_steps"],
        "learning_rate": settings["learning_rate"],
        "num_train_epochs": settings["epochs"],
        "warmup_steps": 10,
        "logging_steps": 10,
        "eval_strategy": settings["eval_strategy"],
        "save_strategy": "steps" if settings["eval_strategy"] == "steps" else "no",
        "do_train": True,
        "do_predict": True,
        "report_to": "none",
        "seed": args.seed,
        **extra,
    }
    if settings["eval_strategy"] == "steps":
        config.update(eval_steps=500, save_steps=500, load_best_model_at_end=True, save_total_limit=2, do_eval=True)
    path = output / f"{name}.json"
    output.mkdir(parents=True, exist_ok=True)
    finished = output / name / "test_results.json"
    if finished.is_file() and path.is_file() and json.loads(path.read_text()) == config:
        print(f"{name}: reusing the finished run in {output / name}")
        return json.loads(finished.read_text()), math.nan
    path.write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    results = run_thinkrec.main([str(path)])
    return results, time.perf_counter() - start


def comparison_plan(output: Path, expert_clusters: Optional[list[int]]) -> tuple[dict, dict]:
    """Where each row's test predictions are (file, score column), and which rows each is compared with: stages 1
    and 2 with MF alone (stage 2's own CF score: the same MF tables on the same rows), the control with stage 2,
    the experts with stage 2 and the control."""
    sources = {"mf": (output / "stage2_projector" / PREDICTIONS, "cf_score"), "stage1": (output / "stage1_lora" / PREDICTIONS, "score"),
               "stage2": (output / "stage2_projector" / PREDICTIONS, "score")}
    references = {"stage1": ["mf"], "stage2": ["mf"]}
    if expert_clusters is not None:
        sources["stage2_more_lora"], references["stage2_more_lora"] = (output / "stage2_more_lora" / PREDICTIONS, "score"), ["stage2"]
        for clusters in expert_clusters:
            for rule in ("hard", "soft"):
                key = f"experts_k{clusters}_{rule}"
                sources[key], references[key] = (output / f"stage3_{key}" / PREDICTIONS, "score"), ["stage2", "stage2_more_lora"]
    return sources, references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", default=os.environ.get("THINKREC_ML1M_DIR", str(DEFAULT_DATA)))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "quality_ml1m"))
    parser.add_argument("--backbone", default="smollm2", help="Any HF causal LM id/path; 'smollm2' = bundled.")
    parser.add_argument("--mf_checkpoint", default=None, help="Reuse a train_collaborative.py MF folder.")
    parser.add_argument("--train_rows", type=int, default=None, help="Override the preset's train subset size.")
    parser.add_argument("--test_rows", type=int, default=None, help="Override the preset's test subset size.")
    parser.add_argument("--score_type", choices=SCORE_TYPES, default=None,
                        help="Override the preset's score (stage 2 inherits stage 1's).")
    parser.add_argument("--experts", action="store_true", help="Add stage 3 (user-cluster experts) rows.")
    parser.add_argument("--expert_clusters", type=int, nargs="+", default=[2, 5], help="Cluster counts for --experts.")
    parser.add_argument("--expert_train_rows", type=int, default=None,
                        help="Train rows of the experts stage (default: the preset's train rows).")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    data = Path(args.data)
    if not data.is_dir():
        print(f"skipped: the ML-1M benchmark split is not at {data} (set --data or THINKREC_ML1M_DIR).")
        print(json.dumps({"skipped": f"no data at {data}"}))
        return
    settings = dict(PRESETS[args.preset])
    if args.train_rows is not None:
        settings["train_rows"] = args.train_rows
    if args.test_rows is not None:
        settings["test_rows"] = args.test_rows
    if args.score_type is not None:
        settings["score_type"] = args.score_type
    output = Path(args.output_dir) / args.preset

    import prepare_data
    import train_collaborative

    records = output / "records"
    prepare_data.main(["--source", "collm", "--data_path", str(data), "--output_dir", str(records)])
    mf_dir = Path(args.mf_checkpoint) if args.mf_checkpoint else output / "mf"
    if not args.mf_checkpoint:
        train_collaborative.main(["--model_type", "mf", "--records_dir", str(records), "--output_dir", str(mf_dir)])

    stage1, stage1_seconds = run_stage(
        "stage1_lora", settings, args, records, output,
        {"stage": "lora", "model_name_or_path": args.backbone, "cf_checkpoint": str(mf_dir),
         "score_type": settings["score_type"]},
    )
    stage2, stage2_seconds = run_stage(
        "stage2_projector", settings, args, records, output,
        {"stage": "projector", "init_from": str(output / "stage1_lora"), "cf_checkpoint": str(mf_dir)},
    )
    summary = lambda m: {key: m.get(key) for key in ("auc", "uauc", "warm/auc", "cold/auc", "n_rows", "auc_ci95", "uauc_ci95")}  # noqa: E731
    table = {"mf": summary(stage2["cf_alone"]), "stage1": summary(stage1["test"]), "stage2": summary(stage2["test"])}
    seconds = {"mf": None, "stage1": stage1_seconds, "stage2": stage2_seconds}
    names = {"mf": "MF alone", "stage1": "stage 1 (text-only LoRA)", "stage2": "stage 2 (+ MF projector)"}
    if args.experts:
        expert_settings = dict(settings, train_rows=args.expert_train_rows or settings["train_rows"])
        # Control: the experts get extra training steps on top of stage 2, so stage 2's single LoRA gets the
        # same rows and steps too; a gain of the experts over this row is the gain of the mixture itself.
        control, control_seconds = run_stage(
            "stage2_more_lora", expert_settings, args, records, output,
            {"stage": "lora", "init_from": str(output / "stage2_projector"), "template": "collaborative"},
        )
        table["stage2_more_lora"], seconds["stage2_more_lora"] = summary(control["test"]), control_seconds
        names["stage2_more_lora"] = "stage 2 + same rows, one LoRA"
        for clusters in args.expert_clusters:
            name = f"experts_k{clusters}"
            trained, trained_seconds = run_stage(
                f"stage3_{name}_hard", expert_settings, args, records, output,
                {"stage": "experts", "init_from": str(output / "stage2_projector"), "num_clusters": clusters,
                 "routing_rule": "hard"},
            )
            table[f"{name}_hard"], seconds[f"{name}_hard"] = summary(trained["test"]), trained_seconds
            names[f"{name}_hard"] = f"stage 3, {clusters} clusters, hard"
            # The same experts under soft routing: evaluation only.
            soft, soft_seconds = run_stage(
                f"stage3_{name}_soft", expert_settings, args, records, output,
                {"stage": "experts", "init_from": str(output / f"stage3_{name}_hard"), "routing_rule": "soft", "do_train": False},
            )
            table[f"{name}_soft"], seconds[f"{name}_soft"] = summary(soft["test"]), soft_seconds
            names[f"{name}_soft"] = f"stage 3, {clusters} clusters, soft"
    cell = metric_cell

    print(f"\nML-1M CoLLM split, preset {args.preset}, backbone {args.backbone}: "
          f"{settings['train_rows'] or 'all'} train rows per stage, {int(table['mf']['n_rows'])} test rows")
    print(f"{'model':<34}{'AUC':>8}{'UAUC':>8}{'warm AUC':>10}{'cold AUC':>10}{'seconds':>10}")
    for key, label in names.items():
        row = table[key]
        print(f"{label:<34}{cell(row['auc']):>8}{cell(row['uauc']):>8}{cell(row['warm/auc']):>10}{cell(row['cold/auc']):>10}"
              f"{(f'{seconds[key]:.0f}' if seconds[key] and not math.isnan(seconds[key]) else '-'):>10}")
    sources, references = comparison_plan(output, args.expert_clusters if args.experts else None)
    deltas = compare_against_references(sources, references, ("auc", "uauc"), CI_RESAMPLES, args.seed)
    print("\n" + format_delta_table(deltas, names))
    gain = deltas["stage2"]["mf"]["metrics"]["auc"] if "metrics" in deltas["stage2"]["mf"] else None
    print(f"stage 2 - MF alone: {format_interval(gain['delta'], gain['ci95']) if gain else 'n/a'} AUC (aim: >= +0.02, "
          "the interval above 0)")
    print(json.dumps({
        "environment": benchmark_environment(),
        "preset": args.preset,
        "train_rows": settings["train_rows"],
        "test_rows": int(table["mf"]["n_rows"]),
        **{key: {"auc": row["auc"], "uauc": row["uauc"], "warm_auc": row["warm/auc"], "cold_auc": row["cold/auc"],
                 "auc_ci95": row["auc_ci95"], "uauc_ci95": row["uauc_ci95"]}
           for key, row in table.items()},
        # Each row minus its baseline (MF alone for stages 1 and 2, stage 2 for the rest) and the control, paired on the
        # same test rows: {row: {reference: {"auc": {"delta", "ci95", "verdict"}, "uauc": {...}, "delong_p"}}}.
        "deltas": summarise_deltas(deltas),
        "ci_resamples": CI_RESAMPLES,
        # A stage reused from an earlier run has no time of its own (null, not NaN: the line stays JSON).
        "seconds": {key: (None if value is None or math.isnan(value) else round(value, 1)) for key, value in seconds.items()},
    }))


if __name__ == "__main__":
    main()
