#!/usr/bin/env python
"""Do reasons cost or gain AUC on top of stage 2, and do the generated reasons think? ML-1M (CoLLM split).

    python benchmarks/reasons_ml1m.py                       # CPU preset (~60 min on 2 idle cores; stage 2 reused)
    python benchmarks/reasons_ml1m.py --preset gpu          # every row, bf16

Stage 2 (the CF-aware model) comes from benchmarks/quality_ml1m.py with the same preset: its folder is
reused when it is finished (`--quality_dir`), else that benchmark's stages 1 and 2 are trained first.
Then two reflection loops (reflection_loop.py, one round each), both starting from stage 2:

  with keywords     the records' items get keywords (extract_keywords.py, MiniLM default); prompts show
                    every title with `title_keywords` of them; the synthesiser uses them in its reasons;
  without keywords  the same records without keywords.

Each loop: round 0 = stage 2 as it is, evaluated on the loop's prompts (its generated reasons judged);
reflect.py on stage 2 (train rows it gets wrong at the validation threshold, balanced by verdict,
explained by the synthesiser); round 1 = stage 2's LoRA trained further on the same train rows with
the reasons mixed in (reasoning_share 0.2). Generated reasons start with the verdict of the row's score
(one decision per row). References for the judged test rows come from another source than the training
reasons: the bundled SmolLM2-135M-Instruct as a local teacher told the true answer (`--reference_source`).
The stance checker is fitted on those references.

Columns: AUC / UAUC of the scores the decisions use, verdict agrees with score, body agrees with verdict
(with the stance checker's held-out accuracy), grounding, BLEU / ROUGE-L / METEOR / MiniLM cosine
against the references, words per answer, repeated 3-gram rate. The control "stage 2 + same rows, one
LoRA" (quality_ml1m.py --experts) is shown when that run is finished. A second table gives each reasons
row minus stage 2 and minus the control on the same test rows, with the 95% interval of a paired bootstrap over
users and DeLong's p for AUC. Last line: one JSON object
{"stage2", "stage2_with_reasons", "stage2_with_reasons_no_keywords", "reasons", "reference_source", "deltas", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]

from thinkrec.evaluation.metrics import CI_RESAMPLES, compare_against_references, format_delta_table, format_interval, summarise_deltas  # noqa: E402
from thinkrec.utils.environment import benchmark_environment  # noqa: E402
from thinkrec.utils.subsets import metric_cell  # noqa: E402


DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"
PRESETS = {
    # Same seeded rows and prompt budget as quality_ml1m.py's CPU preset; the rounds train on as many rows
    # as its experts stage (--expert_train_rows 512), so its "stage 2 + same rows" control matches.
    "cpu": {"quality_train_rows": 1024, "train_rows": 512, "eval_rows": 300, "test_rows": 1000, "judge_rows": 200,
            "max_prompt_tokens": 160, "dtype": "float32", "train_batch_size": 8, "eval_batch_size": 32, "learning_rate": 1e-3,
            "max_new_tokens": 64, "max_reason_tokens": 64},
    "gpu": {"quality_train_rows": None, "train_rows": None, "eval_rows": None, "test_rows": None, "judge_rows": 1000,
            "max_prompt_tokens": 512, "dtype": "bfloat16", "train_batch_size": 16, "eval_batch_size": 64, "learning_rate": 1e-4,
            "max_new_tokens": 128, "max_reason_tokens": 128},
}
PREDICTIONS = "test_predictions.parquet"
REASON_KEYS = ("verdict_agrees_with_score", "body_agrees_with_verdict", "stance_accuracy", "grounding", "bleu", "rouge_l",
               "meteor", "cosine")


def run(command: list[str]) -> None:
    """A repository command in a child process (each holds its own model; memory is returned after)."""
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=REPO_ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def ensure_stage2(args, settings: dict) -> Path:
    """quality_ml1m.py's folder for this preset, its stages 1 and 2 trained (or reused) there."""
    quality = Path(args.quality_dir)
    stage2 = quality / args.preset / "stage2_projector"
    if not (stage2 / "test_results.json").is_file():
        command = ["benchmarks/quality_ml1m.py", "--preset", args.preset, "--data", args.data, "--output_dir", str(quality)]
        if settings["quality_train_rows"]:
            command += ["--train_rows", str(settings["quality_train_rows"])]
        if settings["test_rows"]:
            command += ["--test_rows", str(settings["test_rows"])]
        run(command)
    return stage2


def loop(args, settings: dict, name: str, records: Path, stage2: Path, title_keywords: int) -> dict:
    output = Path(args.output_dir) / name
    output.mkdir(parents=True, exist_ok=True)
    train_args = {
        "records_dir": str(records), "stage": "lora", "init_from": str(stage2), "template": "collaborative",
        "title_keywords": title_keywords, "max_train_samples": settings["train_rows"],
        "max_eval_samples": settings["eval_rows"], "max_test_samples": settings["test_rows"],
        "max_prompt_tokens": settings["max_prompt_tokens"], "dtype": settings["dtype"],
        "per_device_train_batch_size": settings["train_batch_size"], "per_device_eval_batch_size": settings["eval_batch_size"],
        "learning_rate": settings["learning_rate"], "num_train_epochs": 1, "warmup_steps": 10, "logging_steps": 10,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "seed": args.seed,
    }
    (output / "train_args.json").write_text(json.dumps(train_args, indent=2))
    loop_args = {
        "train_args": str(output / "train_args.json"), "output_dir": str(output / "loop"), "rounds": 1, "train_round0": False,
        "reasoning_share": 0.2, "judge_rows": settings["judge_rows"], "max_new_tokens": settings["max_new_tokens"],
        "source": "synthesised", "max_reason_tokens": settings["max_reason_tokens"], "balance_verdicts": True,
        "reference_source": args.reference_source,
    }
    (output / "loop.json").write_text(json.dumps(loop_args, indent=2))
    run(["reflection_loop.py", str(output / "loop.json")])
    return json.loads((output / "loop" / "loop_summary.json").read_text())


def reason_deltas(stage2: Path, output: Path, has_control: bool, seed: int) -> tuple[dict, dict]:
    """Each reasons row minus stage 2 and minus the control, paired on the same test rows: the comparisons
    ({row: {reference: ...}}) and the rows' printed names."""
    names = {"stage2": "stage 2", "stage2_more_lora": "stage 2 + same rows, one LoRA",
             "stage2_with_reasons": "stage 2 + reasons (keywords)", "stage2_with_reasons_no_keywords": "stage 2 + reasons (no keywords)",
             "stage2_on_keyword_prompts": "stage 2 on keyword prompts"}
    sources = {"stage2": (stage2 / PREDICTIONS, "score"),
               "stage2_more_lora": (stage2.parent / "stage2_more_lora" / PREDICTIONS, "score"),
               "stage2_with_reasons": (output / "with_keywords" / "loop" / "round1" / PREDICTIONS, "score"),
               "stage2_with_reasons_no_keywords": (output / "without_keywords" / "loop" / "round1" / PREDICTIONS, "score"),
               "stage2_on_keyword_prompts": (output / "with_keywords" / "loop" / "round0" / PREDICTIONS, "score")}
    baselines = ["stage2", "stage2_more_lora"] if has_control else ["stage2"]
    references = {key: baselines for key in ("stage2_with_reasons", "stage2_with_reasons_no_keywords", "stage2_on_keyword_prompts")}
    return compare_against_references(sources, references, ("auc", "uauc"), CI_RESAMPLES, seed), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--data", default=os.environ.get("THINKREC_ML1M_DIR", str(DEFAULT_DATA)))
    parser.add_argument("--quality_dir", default=str(REPO_ROOT / "outputs" / "quality_ml1m"),
                        help="quality_ml1m.py's output folder: its stage 2 is reused (or trained there).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "reasons_ml1m"))
    parser.add_argument("--title_keywords", type=int, default=3, help="Keywords shown after every title in the keyword loop.")
    parser.add_argument("--keyword_method", default="minilm", choices=["minilm", "tfidf", "local", "remote"])
    parser.add_argument("--reference_source", default="local", choices=["local", "synthesised", "remote"])
    for name in ("train_rows", "eval_rows", "test_rows", "judge_rows"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"Override the preset's {name}.")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "train.parquet").is_file():
        print(f"skipped: the ML-1M benchmark split is not at {data} (set --data or THINKREC_ML1M_DIR).")
        print(json.dumps({"skipped": f"no data at {data}"}))
        return
    settings = dict(PRESETS[args.preset])
    settings.update({name: getattr(args, name) for name in ("train_rows", "eval_rows", "test_rows", "judge_rows")
                     if getattr(args, name) is not None})
    stage2 = ensure_stage2(args, settings)
    records = stage2.parent / "records"
    output = Path(args.output_dir)
    keyword_records = output / "records_keywords"
    if not (keyword_records / "metadata.json").is_file():
        shutil.copytree(records, output / "records_keywords.partial", dirs_exist_ok=True)
        run(["extract_keywords.py", "--records_dir", str(output / "records_keywords.partial"), "--method", args.keyword_method])
        os.replace(output / "records_keywords.partial", keyword_records)
    keyword_info = json.loads((keyword_records / "metadata.json").read_text())["item_keywords"]

    with_keywords = loop(args, settings, "with_keywords", keyword_records, stage2, args.title_keywords)
    without_keywords = loop(args, settings, "without_keywords", records, stage2, 0)

    stage2_test = json.loads((stage2 / "test_results.json").read_text())["test"]
    control_path = stage2.parent / "stage2_more_lora" / "test_results.json"
    control = json.loads(control_path.read_text())["test"] if control_path.is_file() else None
    rows = [
        ("stage 2", {"auc": stage2_test["auc"], "uauc": stage2_test["uauc"]}, without_keywords["rounds"][0]["reasons"]),
        ("stage 2 + same rows, one LoRA", control and {"auc": control["auc"], "uauc": control["uauc"]}, None),
        ("stage 2 + reasons (keywords)", with_keywords["rounds"][1]["test"], with_keywords["rounds"][1]["reasons"]),
        ("stage 2 + reasons (no keywords)", without_keywords["rounds"][1]["test"], without_keywords["rounds"][1]["reasons"]),
        ("stage 2 on keyword prompts", with_keywords["rounds"][0]["test"], with_keywords["rounds"][0]["reasons"]),
    ]
    columns = ("auc", "uauc", *REASON_KEYS, "words_mean", "repeated_3gram_rate")
    heads = ("AUC", "UAUC", "verd=score", "body=verd", "stance acc", "grounding", "BLEU", "ROUGE-L", "METEOR", "cosine",
             "words", "rep 3g")
    print(f"\nML-1M CoLLM split, preset {args.preset}: stage 2 = {stage2}; rounds train on {settings['train_rows'] or 'all'} rows, "
          f"{settings['test_rows'] or 'all'} test rows, {without_keywords['judged_rows']} judged; references: {args.reference_source} "
          f"teacher; keywords: {keyword_info['method']} ({keyword_info['with_keywords']} of {keyword_info['items']} items)")
    for number, summary in (("with keywords", with_keywords), ("without keywords", without_keywords)):
        reflection = summary["reflections"][0]
        print(f"reflection {number}: {reflection['rows_scored']} train rows scored, {reflection['mispredicted']} mispredicted, "
              f"{reflection['explained']} explained")
    print(f"{'model':<34}" + "".join(f"{head:>11}" for head in heads))
    for label, test, reasons in rows:
        values = {**(test or {}), **(reasons or {})}
        print(f"{label:<34}" + "".join(f"{metric_cell(values.get(key)):>11}" for key in columns))
    deltas, delta_names = reason_deltas(stage2, output, control is not None, args.seed)
    print(format_delta_table(deltas, delta_names))
    aims = with_keywords["rounds"][1]
    versus_stage2 = deltas["stage2_with_reasons"]["stage2"]
    auc_gap = (format_interval(versus_stage2["metrics"]["auc"]["delta"], versus_stage2["metrics"]["auc"]["ci95"])
               if "metrics" in versus_stage2 else f"{aims['test']['auc'] - stage2_test['auc']:+.4f}")
    print(f"aims: AUC >= stage 2 - 0.005 ({auc_gap}); verdict = score >= 0.95 "
          f"({metric_cell(aims['reasons'].get('verdict_agrees_with_score'))}); body = verdict >= 0.8 "
          f"({metric_cell(aims['reasons'].get('body_agrees_with_verdict'))}); grounding >= 0.9 ({metric_cell(aims['reasons'].get('grounding'))})")
    print(json.dumps({
        "environment": benchmark_environment(),
        "preset": args.preset,
        "stage2": {"auc": stage2_test["auc"], "uauc": stage2_test["uauc"]},
        "stage2_more_lora": control and {"auc": control["auc"], "uauc": control["uauc"]},
        "stage2_with_reasons": with_keywords["rounds"][1]["test"],
        "stage2_with_reasons_no_keywords": without_keywords["rounds"][1]["test"],
        "stage2_on_keyword_prompts": with_keywords["rounds"][0]["test"],
        "reasons": {key: with_keywords["rounds"][1]["reasons"].get(key) for key in REASON_KEYS},
        "reasons_no_keywords": {key: without_keywords["rounds"][1]["reasons"].get(key) for key in REASON_KEYS},
        "reasons_stage2": {key: without_keywords["rounds"][0]["reasons"].get(key) for key in REASON_KEYS},
        "reference_source": with_keywords["reference_source"],
        "keywords": keyword_info["method"],
        "reflections": {"with_keywords": with_keywords["reflections"][0], "without_keywords": without_keywords["reflections"][0]},
        "judged_rows": without_keywords["judged_rows"],
        # Each reasons row minus stage 2 and the control on the same test rows:
        # {row: {reference: {"auc": {"delta", "ci95", "verdict"}, "uauc": {...}, "delong_p"}}}.
        "deltas": summarise_deltas(deltas),
        "ci_resamples": CI_RESAMPLES,
    }))


if __name__ == "__main__":
    main()
