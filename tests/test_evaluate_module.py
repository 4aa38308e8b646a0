"""The `evaluate` metric in metrics/thinkrec_metrics: loaded by path offline in a fresh interpreter (as another
project loads it, from a folder outside the repository), it gives exactly the numbers of `compute_metrics`, and
docs/evaluate.md's command runs as written."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thinkrec.evaluation.metrics import compute_metrics


ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "metrics" / "thinkrec_metrics"
KS = [1, 2, 5]

SCRIPT = """
import json, sys
import evaluate

module, rows = sys.argv[1], json.loads(sys.argv[2])
found = {}
plain = evaluate.load(module)
found["default"] = plain.compute(predictions=rows["scores"], references=rows["labels"], user_ids=rows["user_names"],
                                 ks=rows["ks"])
split = evaluate.load(module, "warm_cold")
found["warm_cold"] = split.compute(predictions=rows["scores"], references=rows["labels"], user_ids=rows["user_ids"],
                                   not_cold=rows["not_cold"], ks=rows["ks"])
try:
    evaluate.load(module).compute(predictions=rows["scores"][:-1], references=rows["labels"], user_ids=rows["user_ids"])
except ValueError as error:
    found["mismatch"] = str(error)
print(json.dumps(found))
"""


def offline_env(home: Path) -> dict:
    """No Hub, and evaluate's module copies and arrow files in `home` rather than the user's cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(home)}


def seeded_rows() -> dict:
    """6 users, both labels, tied scores (one decimal), a single-class user and cold rows of both labels."""
    rng = np.random.default_rng(7)
    user_ids = np.repeat(np.arange(1, 7), 5)
    labels = (rng.random(len(user_ids)) < 0.4).astype(int)
    labels[:5] = [1, 0, 0, 1, 0]
    labels[25:] = 0  # user 6 has no positive: skipped by UAUC and HR@k, counted by AUC
    scores = np.round(rng.normal(size=len(user_ids)), 1)
    not_cold = (rng.random(len(user_ids)) < 0.7).astype(int)
    not_cold[[0, 1]] = 0  # a cold positive and a cold negative
    return {"user_ids": user_ids.tolist(), "user_names": [f"user-{user}" for user in user_ids], "labels": labels.tolist(),
            "scores": scores.tolist(), "not_cold": not_cold.tolist(), "ks": KS}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """What the metric computes when evaluate loads it by absolute path, run from a folder outside the repository."""
    outside = tmp_path_factory.mktemp("another_project")
    rows = seeded_rows()
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(MODULE), json.dumps(rows)], cwd=outside, env=offline_env(outside / "hf"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return rows, json.loads(run.stdout.strip().splitlines()[-1])


def assert_same_numbers(found: dict, expected: dict):
    assert list(found) == list(expected)
    for name, value in expected.items():
        assert (math.isnan(found[name]) and math.isnan(value)) or found[name] == value, (name, found[name], value)


def test_the_loaded_metric_gives_exactly_the_numbers_of_compute_metrics(loaded):
    rows, found = loaded
    assert_same_numbers(found["default"], compute_metrics(rows["user_names"], rows["labels"], rows["scores"], ks=KS))
    expected = compute_metrics(rows["user_ids"], rows["labels"], rows["scores"], not_cold=rows["not_cold"], ks=KS)
    assert_same_numbers(found["warm_cold"], expected)
    assert expected["cold/n_rows"] > 0 and not math.isnan(expected["cold/auc"]) and "ndcg@2" in expected


def test_inputs_of_different_lengths_are_refused_with_both_lengths(loaded):
    rows, found = loaded
    assert found["mismatch"] == f"Mismatch in the number of predictions ({len(rows['scores']) - 1}) and references ({len(rows['labels'])})"


def test_the_docs_command_runs_as_written(tmp_path):
    text = (ROOT / "docs" / "evaluate.md").read_text(encoding="utf-8")
    command = re.match(r"\s*(?:#[^\n]*\n\s*)?```bash\n(.*?)\n```", text, re.DOTALL).group(1)
    run = subprocess.run(["bash", "-c", command.replace(".venv/bin/python", sys.executable)], cwd=ROOT,
                         env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^auc\s+\d\.\d{4}\s+\d\.\d{4}\s+(?:\d\.\d{4}|nan)$", run.stdout, re.MULTILINE), run.stdout
