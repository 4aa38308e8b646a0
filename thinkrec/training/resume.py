"""Resume only what matches: every Trainer checkpoint records the arguments that define its run, and a
run that finds a checkpoint made with other arguments stops, naming the first difference."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from thinkrec.utils.errors import InputError
from thinkrec.utils.files import write_json


RUN_ARGUMENTS_NAME = "thinkrec_run_arguments.json"
# What defines the weights a run trains (evaluation sizes, generation and logging do not).
DATA_KEYS_NOT_DEFINING = ("max_eval_samples", "max_test_samples", "generate_reasons_for", "max_new_tokens", "eval_protocol",
                          "ranking_ks")
TRAINING_KEYS = ("stage", "reasoning_share", "reason_bce_weight", "reason_lm_weight", "rec_bce_weight", "rec_lm_weight",
                 "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs",
                 "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "optim",
                 "bf16", "fp16", "max_grad_norm")


def run_arguments(model_args, data_args, training_args, records_metadata: dict) -> dict:
    """The arguments that define a training run, with the content of its records (their files are
    named by content hash) and the world size (the batches a step sees)."""
    data = {key: value for key, value in asdict(data_args).items() if key not in DATA_KEYS_NOT_DEFINING}
    training = {key: getattr(training_args, key, None) for key in TRAINING_KEYS}
    training["world_size"] = training_args.world_size
    records = {"files": records_metadata.get("files"), "num_users": records_metadata.get("num_users"),
               "num_items": records_metadata.get("num_items")}
    # JSON round trip: what is compared is what is stored.
    return json.loads(json.dumps({"model": asdict(model_args), "data": data, "training": training, "records": records}, default=str))


def first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """`section.key: saved -> current` for the first key whose value differs, else None."""
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            found = first_difference(before, after, f"{prefix}{key}.")
            if found:
                return found
        elif before != after:
            return f"{prefix}{key}: {before!r} in the checkpoint, {after!r} now"
    return None


def check_resumable(checkpoint: str | os.PathLike, current: dict) -> None:
    """Stop unless `checkpoint` was written by a run with the same defining arguments."""
    path = Path(checkpoint) / RUN_ARGUMENTS_NAME
    if not path.is_file():
        raise InputError(
            f"{checkpoint} has no {RUN_ARGUMENTS_NAME}, so whether it belongs to this run is unknown; set "
            "overwrite_output_dir to start anew (its checkpoints are removed) or choose another output_dir."
        )
    difference = first_difference(json.loads(path.read_text(encoding="utf-8")), current)
    if difference:
        raise InputError(
            f"{checkpoint} was made by a different run ({difference}); set overwrite_output_dir to start anew "
            "(its checkpoints are removed) or choose another output_dir."
        )


def checkpoint_problem(folder: Path) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from (a save that was stopped part-way), else None.
    The run arguments are written last, after Trainer's weights, optimizer, scheduler and state."""
    for name in ("trainer_state.json", RUN_ARGUMENTS_NAME):
        if not (folder / name).is_file():
            return f"no {name}"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike, log) -> str | None:
    """The `checkpoint-N` of `output_dir` with the largest N that was saved to the end; the incomplete ones
    after it are skipped, and the log says which and why (they are written again when training reaches them)."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if path.is_dir() and path.name.split("-")[-1].isdigit()]
    problems = []
    for folder in sorted(folders, key=lambda path: int(path.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        log.warning("%s is incomplete (%s: its save was stopped part-way); skipped", folder, problem)
        problems.append(f"{folder.name} ({problem})")
    if problems:
        # Starting over beside them would train from step 0 as if nothing were there; say so instead.
        raise InputError(
            f"{output_dir} holds checkpoints but none is complete: {', '.join(problems)} (a save stopped part-way, "
            f"or checkpoints of another program). Set overwrite_output_dir to start anew (they are removed), or "
            "choose another output_dir."
        )
    return None


def remove_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete the `checkpoint-*` folders of `output_dir` (overwrite_output_dir); returns their names."""
    removed = []
    for folder in sorted(Path(output_dir).glob("checkpoint-*")):
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


class RunArgumentsCallback(TrainerCallback):
    """Writes the run's defining arguments into every checkpoint folder Trainer saves."""

    def __init__(self, arguments: dict):
        self.arguments = arguments

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(self.arguments, folder / RUN_ARGUMENTS_NAME)
        return control
