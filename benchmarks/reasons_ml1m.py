#!/usr/bin/env python
"""Do reasons help, and how good are the generated ones? ML-1M (CoLLM split), SmolLM2-135M.

    python benchmarks/reasons_ml1m.py                         # seeded CPU subsets (defaults below; ~40 min on 2 idle cores)
    python benchmarks/reasons_ml1m.py --train_rows 0 --test_rows 0 --dtype bfloat16   # every row (GPU)

Steps (reflection_loop.py with one round), all on the same seeded subsets:
  1. stage 1 (text-only LoRA) without reasons -> test AUC / UAUC, generated text for the first
     `judge_rows` test rows;
  2. reflect.py on that model: score the train subset, threshold on validation, explain the
     mispredicted train rows with the teacher (`synthesised` by default; `local` = SmolLM2 as
     teacher; `remote` = an OpenAI-compatible server) -> reason split;
  3. stage 1 again from the backbone with the reason split mixed in (reasoning_share 0.2) -> test
     AUC / UAUC and generated reasons;
  4. teacher references for the judged test rows, and judge_reasons.py on both models' text.
Last line: one JSON object {"stage1": {"auc", "uauc"}, "stage1_with_reasons": {...},
"reasons": {"bleu", "rouge_l", "cosine", "verdict_agrees_with_score", ...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]

from configuration_thinkrec import SCORE_TYPES


DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"


def stage1_arguments(args, records: Path) -> dict:
    """run_thinkrec.py arguments of the stage-1 model the loop trains (with and without reasons)."""
    return {
        "records_dir": str(records),
        "model_name_or_path": args.backbone,
        "stage": "lora",
        "score_type": args.score_type,
        "max_train_samples": args.train_rows or None,
        "max_eval_samples": args.eval_rows or None,
        "max_test_samples": args.test_rows or None,
        "max_prompt_tokens": args.max_prompt_tokens,
        "dtype": args.dtype,
        "per_device_train_batch_size": args.train_batch_size,
        "per_device_eval_batch_size": args.eval_batch_size,
        "learning_rate": args.learning_rate,
        "num_train_epochs": 1,
        "warmup_steps": 5,
        "logging_steps": 10,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "seed": args.seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("THINKREC_ML1M_DIR", str(DEFAULT_DATA)))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "reasons_ml1m"))
    parser.add_argument("--backbone", default="smollm2", help="Any HF causal LM id/path; 'smollm2' = bundled.")
    parser.add_argument("--train_rows", type=int, default=1024, help="Seeded train subset (0 = all).")
    parser.add_argument("--eval_rows", type=int, default=300, help="Validation rows for the reflection threshold (0 = all).")
    parser.add_argument("--test_rows", type=int, default=500, help="Seeded test subset for AUC/UAUC (0 = all).")
    parser.add_argument("--judge_rows", type=int, default=200, help="Test rows whose generated reasons are judged.")
    parser.add_argument("--teacher", default="synthesised", choices=["synthesised", "local", "remote"])
    parser.add_argument("--base_url", default=None, help="remote teacher: OpenAI-compatible base URL.")
    parser.add_argument("--remote_model", default=None, help="remote teacher: model name.")
    parser.add_argument("--max_reason_tokens", type=int, default=96)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--max_prompt_tokens", type=int, default=160)
    # float32 on CPU: bfloat16 training ran ~9x slower on the project's 2-core machines (no native bf16).
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU.")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--score_type", default="yes_no_log_odds", choices=SCORE_TYPES)
    parser.add_argument("--reasoning_share", type=float, default=0.2)
    parser.add_argument("--balance_verdicts", action="store_true",
                        help="Reflect with reflect.py's balance_verdicts (reasons for both labels).")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "train.parquet").is_file():
        print(f"skipped: the ML-1M benchmark split is not at {data} (set --data or THINKREC_ML1M_DIR).")
        print(json.dumps({"skipped": f"no data at {data}"}))
        return
    output = Path(args.output_dir)

    import prepare_data
    import reflection_loop

    records_dir = output / "records"
    prepare_data.main(["--source", "collm", "--data_path", str(data), "--output_dir", str(records_dir), "--max_history", "10"])
    output.mkdir(parents=True, exist_ok=True)
    (output / "stage1.json").write_text(json.dumps(stage1_arguments(args, records_dir), indent=2))
    loop_args = {
        "train_args": str(output / "stage1.json"), "output_dir": str(output / "loop"), "rounds": 1,
        "reasoning_share": args.reasoning_share, "judge_rows": args.judge_rows, "max_new_tokens": args.max_new_tokens,
        "source": args.teacher, "max_reason_tokens": args.max_reason_tokens, "balance_verdicts": args.balance_verdicts,
        **({"base_url": args.base_url, "remote_model": args.remote_model} if args.teacher == "remote" else {}),
    }
    (output / "loop.json").write_text(json.dumps(loop_args, indent=2))
    summary = reflection_loop.main([str(output / "loop.json")])

    baseline, with_reasons = summary["rounds"]
    reflection = summary["reflections"][0]

    def cell(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    print(f"\nML-1M CoLLM split, backbone {args.backbone} ({args.dtype}), {args.train_rows or 'all'} train rows, "
          f"{args.test_rows or 'all'} test rows, teacher {args.teacher}")
    print(f"reflection: {reflection['rows_scored']} train rows scored, threshold {reflection['threshold']:.4f}, "
          f"{reflection['mispredicted']} mispredicted, {reflection['explained']} explained, "
          f"{reflection['rejected']} rejected, {reflection['failed']} failed")
    print(f"{'model':<30}{'AUC':>8}{'UAUC':>8}{'seconds':>10}")
    for label, result in (("stage 1", baseline), ("stage 1 + reasons", with_reasons)):
        print(f"{label:<30}{cell(result['test']['auc']):>8}{cell(result['test']['uauc']):>8}{result['seconds']:>10.0f}")
    print(f"\nreasons of {summary['judged_rows']} test rows against {args.teacher} references")
    print(f"{'metric':<28}{'stage 1':>12}{'+ reasons':>12}")
    for key in reflection_loop.JUDGED:
        print(f"{key:<28}{cell(baseline['reasons'].get(key)):>12}{cell(with_reasons['reasons'].get(key)):>12}")
    print(json.dumps({
        "stage1": baseline["test"],
        "stage1_with_reasons": with_reasons["test"],
        "reasons": with_reasons["reasons"],
        "reasons_stage1_without": baseline["reasons"],
        "reflection": reflection,
        "teacher": args.teacher,
        "balance_verdicts": args.balance_verdicts,
        "train_rows": args.train_rows,
        "test_rows": args.test_rows,
        "judged_rows": summary["judged_rows"],
        "seconds": {"stage1": baseline["seconds"], "reflect_and_stage1_with_reasons": with_reasons["seconds"]},
    }))


if __name__ == "__main__":
    main()
