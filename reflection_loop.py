#!/usr/bin/env python
"""The whole reflection loop in one command: train, find the mistakes, explain them, train with the
explanations, generate reasons and judge them.

    python reflection_loop.py examples/reflection/loop.json       # one .json file with every argument
    make reflection                                               # the same on the bundled ML-100K + SmolLM2

`train_args` is an ordinary run_thinkrec.py args file (any stage); the loop only sets its output
folder, the reason split and the generation of reasons for the judged test rows:

  round 0   run_thinkrec.py with `train_args`, no reasons; predict, generating the verdict and reason
            for the first `judge_rows` test rows;
  round k   reflect.py on round k-1's model (its mispredicted train rows, threshold chosen on
            validation, explained by the chosen source) -> reason split; run_thinkrec.py again from
            the same starting point with that split mixed in at `reasoning_share`; predict as above;
  judging   the source writes references for the judged test rows; judge_reasons.py scores every
            round's text against them.

A round whose folder already holds the results of the same arguments is reused, so an interrupted
loop resumes where it stopped. Prints a table; writes `loop_summary.json`; the last line is one
JSON object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import pandas as pd
from transformers import AutoTokenizer

import judge_reasons
import reflect
import run_thinkrec
from thinkrec.data.keywords import KEYWORDS_COLUMN, attach_keywords, item_keywords
from thinkrec.data.records import load_prepared
from thinkrec.reasons.reflection import SOURCES, SourceArguments, build_source
from thinkrec.utils.arguments import parse_args as parse_command_args
from thinkrec.utils.arguments import run_command
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import atomic_write, write_json
from thinkrec.utils.subsets import metric_cell


logger = logging.getLogger("reflection_loop")

JUDGED = ("verdict_agrees_with_score", "body_agrees_with_verdict", "stance_accuracy", "grounding", "bleu", "rouge_l",
          "meteor", "cosine", "verdict_agrees_with_label", "verdict_missing", "reason_body_empty", "words_mean",
          "repeated_3gram_rate")


@dataclass
class LoopArguments:
    """What to train, where the loop writes, how many rounds."""

    train_args: str = field(metadata={"help": "A run_thinkrec.py args file (.json): records, stage, model, sizes."})
    output_dir: str = field(metadata={"help": "Folder of the loop: round0/, round1/, ..., reason splits, references, summary."})
    rounds: int = field(default=1, metadata={"help": "Reflection rounds after the first training (>= 1)."})
    train_round0: bool = field(
        default=True,
        metadata={"help": "False: round 0 is train_args' init_from model as it is (evaluated, not trained), so the loop "
                  "reflects on a finished model, e.g. stage 2, and round 1 trains from it with the reasons."},
    )
    reasoning_share: float = field(default=0.2, metadata={"help": "Share of training rows that are reasoning rows in rounds >= 1."})
    judge_rows: int = field(default=200, metadata={"help": "Test rows whose generated reasons are judged (the first N of the test rows)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Generation length of a reason."})
    max_reasons: Optional[int] = field(default=None, metadata={"help": "Explain at most this many mispredicted train rows per round."})
    threshold_metric: str = field(default="accuracy", metadata={"help": "What the validation threshold maximises: accuracy or f1."})
    balance_verdicts: bool = field(
        default=True, metadata={"help": "reflect.py: add correctly predicted rows of the rarer label so both verdicts are explained."}
    )
    reference_source: str = field(
        default="local",
        metadata={"help": "Who writes the references the generated reasons are judged against, told the true answer: "
                  "'local' (a local HF teacher, default the bundled SmolLM2), 'synthesised' or 'remote'. A source other than "
                  "the training one keeps the text metrics from measuring imitation of the training reasons."},
    )
    reference_model: Optional[str] = field(default=None, metadata={"help": "local references: HF chat model (default: teacher_model, else SmolLM2)."})

    def __post_init__(self):
        if self.rounds < 1:
            raise InputError(f"rounds must be >= 1, got {self.rounds}.")
        if not 0 < self.reasoning_share < 1:
            raise InputError(f"reasoning_share must be in (0, 1), got {self.reasoning_share}.")
        if self.judge_rows < 1:
            raise InputError(f"judge_rows must be >= 1, got {self.judge_rows}.")
        if self.reference_source not in SOURCES:
            raise InputError(f"reference_source must be one of {SOURCES}, got {self.reference_source!r}.")


def parse_args(argv: Optional[list[str]] = None) -> tuple[LoopArguments, SourceArguments]:
    """A `.json` file, flags, or both (flags override the file); unknown keys are an error."""
    return parse_command_args((LoopArguments, SourceArguments), argv)


def read_train_args(path: str) -> dict:
    """The run_thinkrec.py arguments, checked for what the loop needs."""
    if not os.path.isfile(path):
        raise MissingInputError(f"train_args: no such file {path}")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict) or "records_dir" not in config:
        raise InputError(f"{path}: a run_thinkrec.py args file (a JSON object with records_dir) is expected.")
    for key in ("output_dir", "reason_records", "generate_reasons_for", "reasoning_share"):
        if key in config:
            raise InputError(f"{path}: {key!r} is set by the reflection loop; remove it from train_args.")
    return config


def train_round(config: dict, folder: Path) -> tuple[dict, bool]:
    """run_thinkrec.py with `config`. A folder that already holds the results of the same arguments and
    the same reason split (by content, not by name) is reused, so an interrupted loop resumes."""
    args_path, results_path, stamp_path = folder.with_suffix(".json"), folder / "test_results.json", folder / "loop_inputs.json"
    reasons = config.get("reason_records")
    inputs = {"arguments": config, "reasons_sha256": hashlib.sha256(Path(reasons).read_bytes()).hexdigest() if reasons else None}
    if results_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == inputs:
        logger.info("%s already holds the results of these arguments and reasons; reusing it", folder)
        return json.loads(results_path.read_text()), True
    write_json(config, args_path)
    results = run_thinkrec.main([str(args_path)])
    write_json(inputs, stamp_path)
    return results, False


def reflect_round(flags: list[str], reasons_path: Path, reuse: bool) -> dict:
    """reflect.py with `flags`. When the model it reads was reused and the reason split beside it was
    written with the same arguments, that split and its summary are reused instead of scoring again."""
    summary_path = reasons_path.with_suffix(".summary.json")
    if reuse and reasons_path.is_file() and summary_path.is_file():
        reflect_args, source_args = reflect.parse_args(flags)
        summary = json.loads(summary_path.read_text())
        if summary.get("arguments") == json.loads(json.dumps({**asdict(reflect_args), **asdict(source_args)})):
            logger.info("%s was written by these arguments from the same model; reusing it", reasons_path)
            return summary
    return reflect.main(flags)


def reflect_flags(config: dict, loop: LoopArguments, source_args: SourceArguments, model_dir: Path, output_path: Path) -> list[str]:
    """reflect.py arguments that score exactly as the round trained (template, budget, subsets)."""
    flags = {
        "model_dir": model_dir, "records_dir": config["records_dir"], "output_path": output_path, "overwrite": "true",
        "max_train_samples": config.get("max_train_samples"), "max_eval_samples": config.get("max_eval_samples"),
        "max_reasons": loop.max_reasons, "threshold_metric": loop.threshold_metric, "balance_verdicts": loop.balance_verdicts,
        "template": score_template(config),
        "title_keywords": config.get("title_keywords"),
        "history_item_slots": config.get("history_item_slots"), "max_prompt_tokens": config.get("max_prompt_tokens", 512),
        "use_chat_template": config.get("use_chat_template"), "batch_size": config.get("per_device_eval_batch_size"),
        "dtype": config.get("dtype"), "seed": config.get("seed", 42),
        **{item.name: getattr(source_args, item.name) for item in fields(SourceArguments)},
    }
    argv = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def score_template(config: dict) -> Optional[str]:
    """The template the round's scores are read at: its reason template when `score_prompt` is "reason"."""
    if config.get("score_prompt", "recommendation") != "reason":
        return config.get("template")
    return config.get("reason_template") or run_thinkrec.default_template(config.get("stage", "lora"), config.get("init_from"), reason=True)


def write_references(records, source, judged_rows, path: Path) -> Path:
    """The source's reasons for the judged test rows (the references the generated text is scored against)."""
    results = source.explain(judged_rows.to_dict("records"))
    kept = [index for index, result in enumerate(results) if result.status == "kept"]
    if not kept:
        raise RuntimeError(f"the reason source explained none of the {len(judged_rows)} judged test rows: "
                           f"{source.counters.as_dict()}; nothing to judge against.")
    frame = judged_rows.iloc[kept].copy()
    frame["reason"] = [results[index].reason for index in kept]
    frame["mode"] = "reason"
    atomic_write(path, lambda temp: frame.to_parquet(temp, index=False))
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    loop, source_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    base = read_train_args(loop.train_args)
    if not loop.train_round0 and not base.get("init_from"):
        raise InputError(f"{loop.train_args}: train_round0=false evaluates the init_from model as round 0, but init_from is not set.")
    output = Path(loop.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    common = {"do_train": True, "do_predict": True, "generate_reasons_for": loop.judge_rows, "max_new_tokens": loop.max_new_tokens}

    rounds, reflections, seconds, previous_reused = [], [], [], False
    for number in range(loop.rounds + 1):
        started = time.perf_counter()
        config = {**base, **common, "output_dir": str(output / f"round{number}")}
        if number == 0 and not loop.train_round0:
            config["do_train"] = False
        if number > 0:
            reasons_path = output / f"reasons-round{number - 1}.parquet"
            logger.info("round %d: reflecting on round %d's model", number, number - 1)
            reflections.append(reflect_round(reflect_flags(base, loop, source_args, output / f"round{number - 1}", reasons_path),
                                             reasons_path, reuse=previous_reused))
            if reflections[-1]["explained"] == 0:
                raise RuntimeError(f"round {number}: the source kept no reason ({reflections[-1]['counters']}); "
                                   "nothing to train on. See the reflection summary beside " + str(reasons_path))
            config.update(reason_records=str(reasons_path), reasoning_share=loop.reasoning_share)
        logger.info("round %d: training %s", number, config["output_dir"])
        results, previous_reused = train_round(config, output / f"round{number}")
        rounds.append(results)
        seconds.append(time.perf_counter() - started)

    # References for the rows every round generated text for (the same seeded test rows each round).
    records = load_prepared(base["records_dir"])
    keywords = item_keywords(records.items) if KEYWORDS_COLUMN in records.items else None
    predictions = pd.read_parquet(output / "round0" / "test_predictions.parquet")
    keys = predictions.loc[predictions["generated"].notna(), ["UserID", "TargetItemID"]]
    judged_rows = records.splits["test"].drop_duplicates(["UserID", "TargetItemID"]).merge(keys, on=["UserID", "TargetItemID"])
    tokenizer = AutoTokenizer.from_pretrained(output / "round0")
    reference_args = replace(source_args, source=loop.reference_source,
                             teacher_model=loop.reference_model or source_args.teacher_model)
    if reference_args.source == source_args.source and reference_args.teacher_model == source_args.teacher_model:
        logger.warning("the references come from the training reasons' own source (%s): BLEU/ROUGE/cosine then measure "
                       "imitation of that source; set reference_source to another one", source_args.source)
    references_path = output / f"test_references-{reference_args.source}.parquet"
    if keywords is not None:
        judged_rows = attach_keywords(judged_rows, keywords)
    # References are reused only when written by the same source for the same rows (a rerun of the loop).
    stamp = {"source": reference_args.source, "teacher_model": reference_args.teacher_model,
             "max_reason_tokens": reference_args.max_reason_tokens,
             "rows": sorted([int(u), int(i)] for u, i in zip(judged_rows["UserID"], judged_rows["TargetItemID"]))}
    stamp_path = references_path.with_suffix(".inputs.json")
    if not (references_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp):
        source = build_source(reference_args, records, tokenizer, references_path, base.get("seed", 42))
        write_references(records, source, judged_rows, references_path)
        write_json(stamp, stamp_path)
    judged = [judge_reasons.main(["--predictions", str(output / f"round{number}" / "test_predictions.parquet"),
                                  "--references", str(references_path), "--records_dir", base["records_dir"]])
              for number in range(loop.rounds + 1)]

    names = ["round 0 (no reasons)"] + [f"round {number} (+ reasons)" for number in range(1, loop.rounds + 1)]
    print(f"\nreflection loop: {base.get('stage', 'lora')} stage, source {source_args.source}, {len(judged_rows)} judged test rows")
    for number, reflection in enumerate(reflections, start=1):
        print(f"round {number}: {reflection['rows_scored']} train rows scored, threshold {reflection['threshold']:.4f}, "
              f"{reflection['mispredicted']} mispredicted, {reflection['explained']} explained, "
              f"{reflection['rejected']} rejected, {reflection['failed']} failed")
    print(f"{'':<24}" + "".join(f"{name:>22}" for name in names))
    for key in ("auc", "uauc"):
        print(f"{'test ' + key:<24}" + "".join(f"{metric_cell(result['test'].get(key)):>22}" for result in rounds))
    for key in JUDGED:
        print(f"{key:<24}" + "".join(f"{metric_cell(result.get(key)):>22}" for result in judged))
    print(f"{'seconds':<24}" + "".join(f"{value:>22.0f}" for value in seconds))

    summary = {
        "rounds": [
            {"test": {"auc": result["test"].get("auc"), "uauc": result["test"].get("uauc")},
             "reasons": {key: judgement.get(key) for key in JUDGED}, "seconds": round(elapsed, 1)}
            for result, judgement, elapsed in zip(rounds, judged, seconds)
        ],
        "reflections": [{key: reflection[key] for key in ("rows_scored", "threshold", "mispredicted", "explained", "rejected", "failed")}
                        for reflection in reflections],
        "source": source_args.source,
        "reference_source": reference_args.source,
        "judged_rows": int(judged[-1].get("rows", 0)),
        "arguments": {**asdict(loop), **asdict(source_args)},  # api_key_env is a variable's name, never the key
    }
    write_json(summary, output / "loop_summary.json")
    print(json.dumps({key: summary[key] for key in ("rounds", "reflections", "source", "reference_source", "judged_rows")}))
    return summary


if __name__ == "__main__":
    run_command(main)
