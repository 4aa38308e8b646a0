#!/usr/bin/env python
"""Do reasons help, and how good are the generated ones? ML-1M (CoLLM split), SmolLM2-135M.

    python benchmarks/reasons_ml1m.py                         # seeded CPU subsets (defaults below; ~1.5 h on 2 cores)
    python benchmarks/reasons_ml1m.py --train_rows 0 --test_rows 0 --dtype bfloat16   # every row (GPU)

Steps, all on the same seeded subsets:
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
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"


def run_stage1(name: str, args, records: Path, output: Path, extra: dict) -> tuple[dict, float]:
    """One run_thinkrec.py stage-1 run in-process; returns its results and wall seconds."""
    import run_thinkrec

    config = {
        "records_dir": str(records),
        "output_dir": str(output / name),
        "model_name_or_path": args.backbone,
        "stage": "lora",
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
        "do_train": True,
        "do_predict": True,
        "generate_reasons_for": args.judge_rows,
        "max_new_tokens": args.max_new_tokens,
        "report_to": "none",
        "seed": args.seed,
        **extra,
    }
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    start = time.perf_counter()
    results = run_thinkrec.main([str(path)])
    return results, time.perf_counter() - start


def teacher_source(args, records, tokenizer, cache_path: Path):
    """The teacher that writes reasons, length-capped in the ThinkRec model's tokens."""
    from reflect import SourceArguments, build_source

    source_args = SourceArguments(source=args.teacher, max_reason_tokens=args.max_reason_tokens, base_url=args.base_url,
                                  remote_model=args.remote_model, cache_path=str(cache_path))
    return build_source(source_args, records, tokenizer, cache_path, args.seed)


def references_for(predictions_path: Path, records, source, path: Path) -> Path:
    """Teacher reasons for the test rows that have generated text, written as a reason file."""
    import pandas as pd

    predictions = pd.read_parquet(predictions_path)
    keys = predictions.loc[predictions["generated"].notna(), ["UserID", "TargetItemID"]]
    test = records.splits["test"].merge(keys, on=["UserID", "TargetItemID"], how="inner")
    results = source.explain(test.to_dict("records"))
    kept = [i for i, result in enumerate(results) if result.status == "kept"]
    frame = test.iloc[kept].copy()
    frame["reason"] = [results[i].reason for i in kept]
    frame["mode"] = "reason"
    frame.to_parquet(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("THINKREC_ML1M_DIR", str(DEFAULT_DATA)))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "reasons_ml1m"))
    parser.add_argument("--backbone", default="smollm2", help="Any HF causal LM id/path; 'smollm2' = bundled.")
    parser.add_argument("--train_rows", type=int, default=512, help="Seeded train subset (0 = all).")
    parser.add_argument("--eval_rows", type=int, default=300, help="Validation rows for the reflection threshold (0 = all).")
    parser.add_argument("--test_rows", type=int, default=300, help="Seeded test subset for AUC/UAUC (0 = all).")
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
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "train.parquet").is_file():
        print(f"skipped: the ML-1M benchmark split is not at {data} (set --data or THINKREC_ML1M_DIR).")
        print(json.dumps({"skipped": f"no data at {data}"}))
        return
    output = Path(args.output_dir)

    import judge_reasons
    import prepare_data
    import reflect
    from records_io import load_prepared
    from transformers import AutoTokenizer

    records_dir = output / "records"
    prepare_data.main(["--source", "collm", "--data_path", str(data), "--output_dir", str(records_dir), "--max_history", "10"])
    records = load_prepared(records_dir)

    baseline, baseline_seconds = run_stage1("stage1", args, records_dir, output, {})

    reason_file = output / "reasons-stage1.parquet"
    start = time.perf_counter()
    reflection = reflect.main([
        "--model_dir", str(output / "stage1"), "--records_dir", str(records_dir), "--output_path", str(reason_file),
        "--overwrite", "true", "--max_prompt_tokens", str(args.max_prompt_tokens), "--dtype", args.dtype,
        "--batch_size", str(args.eval_batch_size), "--seed", str(args.seed), "--source", args.teacher,
        "--max_reason_tokens", str(args.max_reason_tokens),
        *(["--max_train_samples", str(args.train_rows)] if args.train_rows else []),
        *(["--max_eval_samples", str(args.eval_rows)] if args.eval_rows else []),
        *(["--base_url", args.base_url, "--remote_model", args.remote_model] if args.teacher == "remote" else []),
    ])
    reflect_seconds = time.perf_counter() - start

    with_reasons, with_reasons_seconds = run_stage1("stage1_with_reasons", args, records_dir, output,
                                                    {"reason_records": str(reason_file), "reasoning_share": 0.2})

    tokenizer = AutoTokenizer.from_pretrained(output / "stage1")
    source = teacher_source(args, records, tokenizer, output / "teacher_cache.jsonl")
    references = references_for(output / "stage1_with_reasons" / "test_predictions.parquet", records, source,
                                output / "test_references.parquet")
    judged = {}
    for name in ("stage1", "stage1_with_reasons"):
        judged[name] = judge_reasons.main(["--predictions", str(output / name / "test_predictions.parquet"),
                                           "--references", str(references)])

    def cell(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    print(f"\nML-1M CoLLM split, backbone {args.backbone} ({args.dtype}), {args.train_rows or 'all'} train rows, "
          f"{baseline['test'].get('n_rows')} test rows, teacher {args.teacher}")
    print(f"reflection: {reflection['rows_scored']} train rows scored, threshold {reflection['threshold']:.4f}, "
          f"{reflection['mispredicted']} mispredicted, {reflection['explained']} explained, "
          f"{reflection['rejected']} rejected, {reflection['failed']} failed ({reflect_seconds:.0f} s)")
    print(f"{'model':<30}{'AUC':>8}{'UAUC':>8}{'seconds':>10}")
    for label, result, seconds in (("stage 1", baseline, baseline_seconds), ("stage 1 + reasons", with_reasons, with_reasons_seconds)):
        print(f"{label:<30}{cell(result['test']['auc']):>8}{cell(result['test']['uauc']):>8}{seconds:>10.0f}")
    keys = ("bleu", "rouge_l", "meteor", "cosine", "verdict_agrees_with_score", "verdict_agrees_with_label",
            "verdict_missing", "words_mean", "repeated_3gram_rate")
    print(f"\nreasons of {judged['stage1_with_reasons']['rows']} test rows against {args.teacher} references")
    print(f"{'metric':<28}{'stage 1':>12}{'+ reasons':>12}")
    for key in keys:
        print(f"{key:<28}{cell(judged['stage1'].get(key)):>12}{cell(judged['stage1_with_reasons'].get(key)):>12}")
    pick = lambda result: {key: result.get(key) for key in keys}  # noqa: E731
    print(json.dumps({
        "stage1": {"auc": baseline["test"]["auc"], "uauc": baseline["test"]["uauc"]},
        "stage1_with_reasons": {"auc": with_reasons["test"]["auc"], "uauc": with_reasons["test"]["uauc"]},
        "reasons": pick(judged["stage1_with_reasons"]),
        "reasons_stage1_without": pick(judged["stage1"]),
        "reflection": {key: reflection[key] for key in ("rows_scored", "threshold", "mispredicted", "explained", "rejected", "failed")},
        "teacher": args.teacher,
        "train_rows": args.train_rows,
        "test_rows": baseline["test"].get("n_rows"),
        "seconds": {"stage1": round(baseline_seconds), "reflect": round(reflect_seconds), "stage1_with_reasons": round(with_reasons_seconds)},
    }))


if __name__ == "__main__":
    main()
