"""Bad inputs about where output goes: a run owns only what it writes (a manifest), refuses an output folder
that holds its inputs, describes one run (no results of an earlier run beside new weights), refuses a second
run on the same folder (a lock that dies with its process), and resumes past a checkpoint whose save was
stopped part-way. Each case also checks that the inputs are byte-identical afterwards and that nothing
half-written is left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from _bad_inputs import REPO_ROOT, assert_inputs_unchanged, assert_one_line_error, file_hashes, leftovers, run_main, run_script
from _run_fixtures import write_run_assets
from safetensors.torch import load_file

import prepare_data
import run_thinkrec
from thinkrec.data.records import load_prepared
from thinkrec.utils.files import LOCK_NAME, MANIFEST_NAME, output_lock, write_json


# ------------------------------------------------------------------------------------ prepare_data


def interactions(num_users=12, num_items=16, per_user=8, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        for step, item in enumerate(rng.choice(num_items, per_user, replace=False)):
            rows.append((f"u{user}", f"i{item}", 1000 * step + user, 5.0 if item % 2 == 0 else 1.0, f"Item {item}"))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating", "title"])


def write_log(path, frame=None):
    frame = interactions() if frame is None else frame
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    return path


def table_args(data_path, output_dir, **extra):
    args = ["--source", "table", "--data_path", str(data_path), "--user_column", "user", "--item_column", "item",
            "--rating_column", "rating", "--title_column", "title", "--item_noun", "item", "--item_noun_plural", "items",
            "--split_ratios", "0.6", "0.2", "0.2", "--output_dir", str(output_dir)]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


INPUT_INSIDE_OUTPUT = {
    "parquet-in-data": "data/ratings.parquet",
    "jsonl-in-data": "data/ratings.jsonl",
    "csv-at-top": "ratings.csv",
    "items-named-like-a-table": "items-mine.parquet",
}


@pytest.mark.parametrize("relative", INPUT_INSIDE_OUTPUT.values(), ids=INPUT_INSIDE_OUTPUT.keys())
def test_an_output_dir_that_holds_an_input_is_refused(tmp_path, capsys, relative):
    output_dir = tmp_path / "p"
    data_path = write_log(output_dir / relative)
    before = file_hashes([output_dir])
    outcome = run_main(prepare_data.main, table_args(data_path, output_dir), capsys)
    assert_one_line_error(outcome, f"output_dir={output_dir}", str(data_path))
    assert_inputs_unchanged(before)
    assert set(file_hashes([output_dir])) == set(before)  # nothing added either


def test_an_item_file_inside_the_output_dir_is_refused(tmp_path, capsys):
    output_dir = tmp_path / "p"
    data_path = write_log(tmp_path / "ratings.csv")
    item_path = output_dir / "meta.csv"
    item_path.parent.mkdir(parents=True)
    pd.DataFrame({"item": [f"i{i}" for i in range(16)], "name": [f"Item {i}" for i in range(16)]}).to_csv(item_path, index=False)
    before = file_hashes([data_path, output_dir])
    outcome = run_main(prepare_data.main, table_args(data_path, output_dir, item_path=item_path), capsys)
    assert_one_line_error(outcome, str(item_path))
    assert_inputs_unchanged(before)
    assert not (output_dir / "metadata.json").exists() and leftovers(output_dir) == []


USER_FILES = ("data/notes.parquet", "data/train-mine.jsonl", "items-mine.parquet", "users-list.jsonl", "candidates/mine.parquet")


def test_files_the_project_did_not_write_survive_a_preparation_into_their_folder(tmp_path, capsys):
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    for name in USER_FILES:
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(f"user data {name}".encode())
    before = file_hashes([data_path, output_dir])
    assert run_main(prepare_data.main, table_args(data_path, output_dir), capsys).code == 0
    assert run_main(prepare_data.main, table_args(data_path, output_dir, max_history=3), capsys).code == 0
    assert_inputs_unchanged(before)
    prepared = load_prepared(output_dir)
    assert prepared.metadata["max_history"] == 3
    # The second preparation removed the first one's tables (its own), and only those.
    tables = {p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.parquet")} - set(USER_FILES)
    assert tables == set(prepared.metadata["files"].values())
    manifest = json.loads((output_dir / MANIFEST_NAME).read_text())
    assert set(prepared.metadata["files"].values()) <= set(manifest["files"]) and not set(USER_FILES) & set(manifest["files"])
    assert leftovers(output_dir) == []


def test_a_folder_prepared_before_manifests_loses_only_the_tables_its_metadata_names(tmp_path, capsys):
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    assert run_main(prepare_data.main, table_args(data_path, output_dir), capsys).code == 0
    old_tables = set(json.loads((output_dir / "metadata.json").read_text())["files"].values())
    (output_dir / MANIFEST_NAME).unlink()  # as an older version left it
    (output_dir / "data" / "mine.parquet").write_bytes(b"mine")
    before = file_hashes([output_dir / "data" / "mine.parquet"])
    assert run_main(prepare_data.main, table_args(data_path, output_dir, max_history=2), capsys).code == 0
    assert_inputs_unchanged(before)
    new_tables = set(load_prepared(output_dir).metadata["files"].values())
    assert not any((output_dir / name).exists() for name in old_tables - new_tables)


def test_a_failed_preparation_takes_its_tables_away_and_keeps_the_earlier_one(tmp_path, capsys, monkeypatch):
    from thinkrec.data import records as records_module

    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    assert run_main(prepare_data.main, table_args(data_path, output_dir), capsys).code == 0
    before = file_hashes([output_dir])
    calls = []
    real_write_table = records_module.write_table

    def interrupted(*args, **kwargs):  # Ctrl-C while the fourth table is written
        calls.append(args[2])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_write_table(*args, **kwargs)

    monkeypatch.setattr(records_module, "write_table", interrupted)
    manifest_before = json.loads((output_dir / MANIFEST_NAME).read_text())
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(table_args(data_path, output_dir, max_history=2))
    assert_inputs_unchanged({path: digest for path, digest in before.items() if LOCK_NAME not in path and MANIFEST_NAME not in path})
    assert set(file_hashes([output_dir])) == set(before)
    assert json.loads((output_dir / MANIFEST_NAME).read_text()) == manifest_before
    assert leftovers(output_dir) == []


def test_a_new_folder_whose_preparation_failed_is_removed(tmp_path, capsys, monkeypatch):
    from thinkrec.data import records as records_module

    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    real_write_table = records_module.write_table
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C while the second table is written
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_table(*args, **kwargs)

    monkeypatch.setattr(records_module, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(table_args(data_path, output_dir))
    assert not output_dir.exists()


def test_a_command_that_fails_on_its_input_leaves_no_output_folder(tmp_path, capsys):
    output_dir = tmp_path / "never"
    outcome = run_main(prepare_data.main, table_args(tmp_path / "missing.csv", output_dir), capsys)
    assert outcome.code == 2 and "missing.csv" in outcome.stderr
    assert not output_dir.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)], ids=["umask-022", "umask-002"])
def test_written_files_follow_the_umask(tmp_path, capsys, umask, mode):
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    previous = os.umask(umask)
    try:
        assert run_main(prepare_data.main, table_args(data_path, output_dir), capsys).code == 0
    finally:
        os.umask(previous)
    files = [output_dir / "metadata.json", output_dir / "README.md",
             *[output_dir / name for name in load_prepared(output_dir).metadata["files"].values()]]
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(mode)}


def test_json_the_project_writes_is_strict(tmp_path):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    write_json({"auc": float("nan"), "scores": [1.0, float("inf"), np.float32("nan")], "uauc": np.float64(0.5)}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"auc": None, "scores": [1.0, None, None], "uauc": 0.5}


# ------------------------------------------------------------------------------------- one run at a time


def test_a_second_preparation_of_a_folder_in_use_is_refused_naming_the_first(tmp_path, capsys):
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    with output_lock(output_dir, "prepare_data.py --output_dir p (the first run)"):
        outcome = run_main(prepare_data.main, table_args(data_path, output_dir), capsys)
    assert_one_line_error(outcome, "in use by another run", "the first run", f"pid {os.getpid()}")
    assert not (output_dir / "metadata.json").exists() and leftovers(output_dir) == []


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
    output_dir = tmp_path / "p"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom thinkrec.utils.files import output_lock\n"
        f"with output_lock({str(output_dir)!r}, 'a run that will be killed'):\n"
        "    print('locked', flush=True)\n    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        data_path = write_log(tmp_path / "raw" / "ratings.csv")
        refused = run_script("prepare_data.py", table_args(data_path, output_dir))
        assert refused.returncode == 2 and "a run that will be killed" in refused.stderr
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        done = run_script("prepare_data.py", table_args(data_path, output_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        assert load_prepared(output_dir).metadata["rows"]["train"] > 0
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_concurrent_preparations_never_leave_metadata_naming_missing_files(tmp_path):
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    before = file_hashes([data_path])
    for attempt in range(3):
        output_dir = tmp_path / f"p{attempt}"
        runs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "prepare_data.py"),
                                  *table_args(data_path, output_dir, max_history=history)],
                                 cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stderr=subprocess.PIPE, text=True)
                for history in (3, 5)]
        outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
        assert any(code == 0 for code, _ in outcomes), outcomes
        for code, stderr in outcomes:
            assert code == 0 or (code == 2 and "in use by another run" in stderr), stderr[-3000:]
        prepared = load_prepared(output_dir)  # every file metadata.json names is there
        tables = {p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.parquet")}
        assert tables == set(prepared.metadata["files"].values())
        assert leftovers(output_dir) == []
    assert_inputs_unchanged(before)


# ----------------------------------------------------------------------------------- run_thinkrec folders


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_run_assets(tmp_path_factory.mktemp("outputs_assets"))


def stage_args(assets, output_dir, **overrides):
    args = {"records_dir": str(assets["records"]), "output_dir": str(output_dir), "model_name_or_path": str(assets["backbone"]),
            "stage": "lora", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "max_steps": 2,
            "learning_rate": 1e-3, "save_steps": 1, "eval_strategy": "no", "report_to": "none", "do_train": True, "seed": 7}
    args.update(overrides)
    return args


def write_args(tmp_path, args, name="args.json"):
    path = tmp_path / name
    path.write_text(json.dumps(args))
    return str(path)


def top_level(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("checkpoint-"))


def test_a_second_run_into_a_folder_keeps_none_of_the_first_runs_results(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    first = write_args(tmp_path, stage_args(assets, output_dir, do_eval=True, do_predict=True), "first.json")
    assert run_main(run_thinkrec.main, [first], capsys).code == 0
    assert {"test_results.json", "test_predictions.parquet", "eval_results.json", "roc_curve.png"} <= set(top_level(output_dir))
    second = write_args(tmp_path, stage_args(assets, output_dir, overwrite_output_dir=True, max_steps=1), "second.json")
    before = file_hashes([first, second, assets["records"]])
    assert run_main(run_thinkrec.main, [second], capsys).code == 0
    assert_inputs_unchanged(before)
    names = set(top_level(output_dir))
    assert not names & {"test_results.json", "test_predictions.parquet", "eval_results.json", "roc_curve.png"}
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert "train_loss" in all_results and not any(key.startswith(("eval_", "test_")) for key in all_results)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1
    assert leftovers(output_dir) == []


def test_a_run_stopped_in_its_final_save_leaves_the_earlier_run_whole(assets, tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "out"
    first = write_args(tmp_path, stage_args(assets, output_dir, do_predict=True), "first.json")
    assert run_main(run_thinkrec.main, [first], capsys).code == 0
    final = {path: digest for path, digest in file_hashes([output_dir]).items()
             if "checkpoint-" not in path and LOCK_NAME not in path and MANIFEST_NAME not in path}

    def stopped(*args, **kwargs):  # Ctrl-C while the second run writes its model card
        raise KeyboardInterrupt

    monkeypatch.setattr(run_thinkrec, "model_card", stopped)
    second = write_args(tmp_path, stage_args(assets, output_dir, overwrite_output_dir=True, max_steps=1), "second.json")
    with pytest.raises(KeyboardInterrupt):
        run_thinkrec.main([second])
    assert_inputs_unchanged(final)  # the first run's weights, results and card, byte for byte
    assert leftovers(output_dir) == []


def test_files_of_a_folder_written_before_manifests_are_replaced_and_the_users_kept(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    first = write_args(tmp_path, stage_args(assets, output_dir, do_predict=True), "first.json")
    assert run_main(run_thinkrec.main, [first], capsys).code == 0
    (output_dir / MANIFEST_NAME).unlink()  # as an older version left it
    (output_dir / "my_notes.txt").write_text("mine")
    before = file_hashes([output_dir / "my_notes.txt"])
    second = write_args(tmp_path, stage_args(assets, output_dir, overwrite_output_dir=True, max_steps=1), "second.json")
    assert run_main(run_thinkrec.main, [second], capsys).code == 0
    assert_inputs_unchanged(before)
    assert not {"test_results.json", "test_predictions.parquet", "roc_curve.png"} & set(top_level(output_dir))


def test_a_run_into_a_folder_in_use_is_refused_naming_the_first(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    path = write_args(tmp_path, stage_args(assets, output_dir))
    with output_lock(output_dir, "run_thinkrec.py stage lora (the first run)"):
        outcome = run_main(run_thinkrec.main, [path], capsys)
    assert_one_line_error(outcome, "in use by another run", "the first run")
    assert not output_dir.exists() or top_level(output_dir) == [LOCK_NAME]


def test_an_output_dir_that_is_init_from_is_refused(assets, tmp_path, capsys):
    stage1 = tmp_path / "stage1"
    assert run_main(run_thinkrec.main, [write_args(tmp_path, stage_args(assets, stage1), "s1.json")], capsys).code == 0
    before = file_hashes([stage1])
    args = stage_args(assets, stage1, init_from=str(stage1), do_train=False, do_predict=True)
    del args["model_name_or_path"]
    outcome = run_main(run_thinkrec.main, [write_args(tmp_path, args)], capsys)
    assert_one_line_error(outcome, "is init_from")
    assert_inputs_unchanged(before)


def test_a_cf_checkpoint_that_init_from_would_ignore_is_refused(assets, tmp_path, capsys):
    stage1 = tmp_path / "stage1"
    assert run_main(run_thinkrec.main, [write_args(tmp_path, stage_args(assets, stage1), "s1.json")], capsys).code == 0
    stage2 = tmp_path / "stage2"
    args = dict(stage_args(assets, stage2, stage="projector", init_from=str(stage1), cf_checkpoint=str(assets["mf"])))
    del args["model_name_or_path"]
    assert run_main(run_thinkrec.main, [write_args(tmp_path, args, "s2.json")], capsys).code == 0
    # stage 3 / another stage-2 run from a folder that already holds MF tables, with a cf_checkpoint as well
    before = file_hashes([stage2, assets["mf"]])
    again = dict(args, output_dir=str(tmp_path / "again"), init_from=str(stage2))
    outcome = run_main(run_thinkrec.main, [write_args(tmp_path, again, "again.json")], capsys)
    assert_one_line_error(outcome, f"cf_checkpoint={assets['mf']}", "already holds mf tables", "drop cf_checkpoint")
    assert_inputs_unchanged(before)
    assert not (tmp_path / "again").exists()


# -------------------------------------------------------------------------- resuming past a stopped save


INCOMPLETE = {
    "no-trainer-state": ("trainer_state.json",),
    "no-run-arguments": ("thinkrec_run_arguments.json",),
    "no-optimizer-or-state": ("optimizer.pt", "trainer_state.json", "thinkrec_run_arguments.json"),
}


@pytest.mark.parametrize("removed", INCOMPLETE.values(), ids=INCOMPLETE.keys())
def test_an_incomplete_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(assets, tmp_path, capsys, caplog, removed):
    output_dir = tmp_path / "out"
    path = write_args(tmp_path, stage_args(assets, output_dir, max_steps=3))
    assert run_main(run_thinkrec.main, [path], capsys).code == 0
    uninterrupted = load_file(output_dir / "thinkrec_weights.safetensors")
    # Leave the folder as a Ctrl-C during the save of checkpoint-3 would: the final files not yet written,
    # checkpoint-3 without the files its save writes last.
    for name in top_level(output_dir):
        if name not in (LOCK_NAME,):
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in removed:
        (output_dir / "checkpoint-3" / name).unlink(missing_ok=True)
    with caplog.at_level("INFO"):
        outcome = run_main(run_thinkrec.main, [path], capsys)
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert "checkpoint-3 is incomplete" in caplog.text and "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    # Resumed from step 2, the run ends with the weights of the uninterrupted run.
    torch.testing.assert_close(load_file(output_dir / "thinkrec_weights.safetensors"), uninterrupted)
    assert leftovers(output_dir) == []


@pytest.mark.slow
def test_ctrl_c_at_seeded_moments_of_training_never_blocks_resuming(assets, tmp_path):
    """A real SIGINT at a seeded moment while checkpoints are being saved, three times; then the same command
    (the documented way to resume) finishes the run."""
    output_dir = tmp_path / "out"
    path = write_args(tmp_path, stage_args(assets, output_dir, max_steps=8, save_steps=1))
    rng = np.random.default_rng(23)
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(3):
        run = subprocess.Popen([sys.executable, str(REPO_ROOT / "run_thinkrec.py"), path], cwd=REPO_ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        seen = {p.name for p in output_dir.glob("checkpoint-*")} if output_dir.exists() else set()
        while time.monotonic() < deadline and run.poll() is None:  # wait for a new checkpoint folder to start appearing
            if output_dir.exists() and {p.name for p in output_dir.glob("checkpoint-*")} - seen:
                break
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
    done = run_script("run_thinkrec.py", [path])
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 8
    assert leftovers(output_dir) == []


# ------------------------------------------------------------------------------- train_collaborative


def cf_args(records_dir, output_dir, **extra):
    args = ["--records_dir", str(records_dir), "--output_dir", str(output_dir), "--model_type", "mf", "--embedding_dim", "8",
            "--max_epochs", "2", "--chance_epochs", "0"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def refuse_constant(constant):
    raise ValueError(f"non-strict JSON constant {constant}")


def test_collaborative_outputs_are_strict_json_and_a_stopped_run_leaves_the_earlier_one_whole(assets, tmp_path, capsys, monkeypatch):
    import train_collaborative

    output_dir = tmp_path / "mf"
    assert run_main(train_collaborative.main, cf_args(assets["records"], output_dir), capsys).code == 0
    for name in ("metrics.json", "cf_config.json"):
        json.loads((output_dir / name).read_text(), parse_constant=refuse_constant)  # NaN metrics (no cold rows) are null
    before = {path: digest for path, digest in file_hashes([output_dir]).items() if LOCK_NAME not in path}

    def stopped(*args, **kwargs):  # Ctrl-C while the checkpoint is saved, after predictions and metrics were written
        raise KeyboardInterrupt

    monkeypatch.setattr(train_collaborative, "save_cf_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_collaborative.main(cf_args(assets["records"], output_dir, embedding_dim=4))
    assert_inputs_unchanged(before)
    assert leftovers(output_dir) == []


def test_collaborative_records_inside_the_output_dir_are_refused(assets, tmp_path, capsys):
    import train_collaborative

    output_dir = tmp_path / "mf"
    shutil.copytree(assets["records"], output_dir / "records")
    before = file_hashes([output_dir])
    outcome = run_main(train_collaborative.main, cf_args(output_dir / "records", output_dir), capsys)
    assert_one_line_error(outcome, "holds the input", str(output_dir / "records"))
    assert_inputs_unchanged(before)
    assert set(file_hashes([output_dir])) == set(before)


# ------------------------------------------------------------------- inputs of runs, manifests, owners


@pytest.mark.parametrize("which", ["records", "mf", "backbone"])
def test_a_run_whose_output_dir_holds_one_of_its_inputs_is_refused(assets, tmp_path, capsys, which):
    inputs = tmp_path / "inputs"
    shutil.copytree(assets["records"], inputs / "records")
    shutil.copytree(assets["mf"], inputs / "mf")
    shutil.copytree(assets["backbone"], inputs / "backbone")
    args = stage_args({"records": inputs / "records", "backbone": inputs / "backbone"}, inputs / which,
                      cf_checkpoint=str(inputs / "mf"))
    before = file_hashes([inputs])
    outcome = run_main(run_thinkrec.main, [write_args(tmp_path, args)], capsys)
    assert_one_line_error(outcome, f"output_dir={inputs / which}", "holds the input")
    assert_inputs_unchanged(before)
    assert set(file_hashes([inputs])) == set(before)


@pytest.mark.parametrize("name", [".", "..", "../outside.txt", "/etc/hostname", "data/../../outside.txt"])
def test_a_manifest_naming_a_path_outside_its_folder_is_refused(tmp_path, name):
    from thinkrec.utils.errors import InputError
    from thinkrec.utils.files import Manifest

    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "outside.txt").write_text("mine")
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": {name: "run_thinkrec"}, "state": "complete"}))
    before = file_hashes([tmp_path])
    with pytest.raises(InputError, match="is not a path inside"):
        Manifest(folder, "run_thinkrec").remove_except(set())
    assert_inputs_unchanged(before)


def test_a_log_folder_that_is_the_output_dir_is_not_recorded_for_removal(assets, tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "out"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(output_dir))
    args = write_args(tmp_path, stage_args(assets, output_dir, report_to="tensorboard", max_steps=1))
    assert run_main(run_thinkrec.main, [args], capsys).code == 0
    assert "." not in json.loads((output_dir / MANIFEST_NAME).read_text())["files"]
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    again = write_args(tmp_path, stage_args(assets, output_dir, overwrite_output_dir=True, max_steps=1), "again.json")
    assert run_main(run_thinkrec.main, [again], capsys).code == 0
    assert (output_dir / "thinkrec_weights.safetensors").is_file()


def test_a_folder_holding_another_commands_output_is_refused(assets, tmp_path, capsys):
    """A model folder is not a records folder, nor a CF folder, nor the reverse: both cards are README.md."""
    import train_collaborative

    model_dir = tmp_path / "model"
    assert run_main(run_thinkrec.main, [write_args(tmp_path, stage_args(assets, model_dir, do_predict=True))], capsys).code == 0
    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    records_dir = tmp_path / "records"
    assert run_main(prepare_data.main, table_args(data_path, records_dir), capsys).code == 0
    before = {path: digest for path, digest in file_hashes([model_dir, records_dir]).items() if LOCK_NAME not in path}
    cases = [
        (prepare_data.main, table_args(data_path, model_dir), "run_thinkrec"),
        (train_collaborative.main, cf_args(assets["records"], model_dir), "run_thinkrec"),
        (run_thinkrec.main, [write_args(tmp_path, stage_args(assets, records_dir), "into_records.json")], "records"),
    ]
    for main, argv, owner in cases:
        outcome = run_main(main, argv, capsys)
        assert_one_line_error(outcome, "holds the output of another command", f"({owner}:")
    assert_inputs_unchanged(before)
    assert leftovers(model_dir) == [] and leftovers(records_dir) == []


def test_keywords_into_a_records_folder_in_use_are_refused(tmp_path, capsys):
    import extract_keywords

    data_path = write_log(tmp_path / "raw" / "ratings.csv")
    output_dir = tmp_path / "p"
    assert run_main(prepare_data.main, table_args(data_path, output_dir), capsys).code == 0
    before = {path: digest for path, digest in file_hashes([output_dir]).items() if LOCK_NAME not in path}
    with output_lock(output_dir, "prepare_data.py (a second preparation)"):
        outcome = run_main(extract_keywords.main, ["--records_dir", str(output_dir), "--method", "tfidf"], capsys)
    assert_one_line_error(outcome, "in use by another run", "a second preparation")
    assert_inputs_unchanged(before)


def test_checkpoints_none_of_which_is_complete_stop_the_run_instead_of_training_from_step_0(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    path = write_args(tmp_path, stage_args(assets, output_dir, max_steps=2))
    assert run_main(run_thinkrec.main, [path], capsys).code == 0
    for folder in output_dir.glob("checkpoint-*"):
        (folder / "thinkrec_run_arguments.json").unlink()  # as when the save of each was stopped before its end
    before = {path: digest for path, digest in file_hashes([output_dir]).items() if LOCK_NAME not in path and MANIFEST_NAME not in path}
    outcome = run_main(run_thinkrec.main, [path], capsys)
    assert_one_line_error(outcome, "none is complete", "checkpoint-2 (no thinkrec_run_arguments.json)", "overwrite_output_dir")
    assert_inputs_unchanged(before)


@pytest.mark.slow
def test_two_ranks_refused_a_folder_in_use_both_stop_at_once(assets, tmp_path):
    output_dir = tmp_path / "out"
    path = write_args(tmp_path, stage_args(assets, output_dir))
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_ROOT / "accelerate_configs" / "cpu_two_ranks.yaml"), str(REPO_ROOT / "run_thinkrec.py"), path]
    with output_lock(output_dir, "run_thinkrec.py (the first run)"):
        done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("in use by another run (run_thinkrec.py (the first run)") == 2, done.stderr[-3000:]
    assert not list(output_dir.glob("checkpoint-*"))
