"""An output folder of run_thinkrec.py or train_collaborative.py describes one run. The final files
(weights, config, tokenizer, results, predictions, plots, card) are written into a staging folder inside
it and moved in when the run ends; the files an earlier run of the same command left there and this one
did not produce are removed then. A run that fails or is stopped before that leaves the earlier run's
files as they were. Trainer's `checkpoint-N` folders (the resume state) stay where Trainer writes them."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from thinkrec.training.loading import read_config
from thinkrec.utils.errors import InputError
from thinkrec.utils.files import LOCK_NAME, MANIFEST_NAME, Manifest, write_json


logger = logging.getLogger(__name__)

STAGING_NAME = ".staging-final"
CHECKPOINT_PREFIX = "checkpoint-"
# What run_thinkrec (and Trainer's save_model / save_metrics / save_state) writes at the top of a folder:
# owned in folders written before manifests existed, so their results cannot mix with a new run's.
KNOWN_OUTPUTS = (
    "config.json", "generation_config.json", "thinkrec_weights.safetensors", "model.safetensors", "training_args.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "processor_config.json",
    "configuration_thinkrec.py", "modeling_thinkrec.py", "sasrec_thinkrec.py", "experts_thinkrec.py", "processing_thinkrec.py",
    "train_results.json", "eval_results.json", "test_results.json", "all_results.json", "trainer_state.json",
    "test_predictions.parquet", "roc_curve.png", "training_curves.png", "generation_settings.json",
    "user_clusters.json", "user_clusters.parquet", "ranking_predictions.parquet", "README.md",
)


class RunFolder:
    """The output folder of one run_thinkrec run: `staging` receives the final files, `publish` moves them in."""

    def __init__(self, output_dir: str | os.PathLike, owner: str = "run_thinkrec"):
        self.directory = Path(output_dir)
        self.owner = owner
        self.staging = self.directory / STAGING_NAME

    def begin(self) -> Path:
        """An empty staging folder (a killed run's leftover one is removed: the run holds the folder's lock);
        stops first when the folder holds another command's output."""
        self._owned()
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def discard(self) -> None:
        """Drop the staging folder of a run that did not finish."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def _owned(self) -> Manifest:
        manifest = Manifest(self.directory, self.owner)
        if not manifest.path.is_file() and self.owner == "run_thinkrec" and _is_thinkrec_folder(self.directory):
            manifest.files.update({name: self.owner for name in KNOWN_OUTPUTS if (self.directory / name).exists()})
        return manifest.refuse_others()

    def publish(self, extra: tuple[str, ...] = ()) -> None:
        """Move the staged files into the folder and remove what an earlier run left that this one did not
        write (never a file the project did not write); `extra` names other files of this run already in the
        folder (e.g. its log folder)."""
        manifest = self._owned()
        names = sorted(entry.name for entry in self.staging.iterdir())
        # While files move, the manifest lists both runs' files and says "publishing": loading the folder refuses
        # it then (its files may come from two runs), and the next run of the command cleans it.
        manifest.add(*names, *extra, state="publishing")
        for name in names:
            target = self.directory / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(self.staging / name, target)
        self.staging.rmdir()
        is_result = lambda name: not name.startswith(CHECKPOINT_PREFIX) and name not in (MANIFEST_NAME, LOCK_NAME)  # noqa: E731
        removed = manifest.remove_except({*names, *extra}, only=is_result)
        manifest.save(state="complete")
        if removed:
            logger.info("%s: removed %s, left by an earlier run and not written by this one", self.directory, removed)


def _is_thinkrec_folder(directory: Path) -> bool:
    """Whether `directory` holds a ThinkRec model's config.json (a folder written before manifests existed)."""
    try:
        return read_config(directory, "output_dir").get("model_type") == "thinkrec"
    except InputError:
        return False


def save_metrics(directory: str | os.PathLike, split: str, metrics: dict[str, Any], combined: dict[str, Any]) -> None:
    """`<split>_results.json` and `all_results.json` (this run's metrics only: `combined` is updated in place),
    as Trainer.save_metrics names them, in strict JSON."""
    combined.update(metrics)
    write_json(metrics, Path(directory) / f"{split}_results.json", indent=4, sort_keys=True)
    write_json(combined, Path(directory) / "all_results.json", indent=4, sort_keys=True)
