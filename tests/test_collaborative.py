"""Collaborative encoders, their training loop, checkpoints and train_collaborative.py end to end."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import HfArgumentParser

import train_collaborative
from thinkrec.collaborative.models import (
    LightGCN,
    MatrixFactorization,
    SASRec,
    check_ids_fit,
    checkpoint_from_model,
    load_cf_checkpoint,
    save_cf_checkpoint,
)
from thinkrec.collaborative.training import (
    FitConfig,
    build_model,
    history_matrix,
    score_split,
    set_seed,
    split_from_records,
    train_pointwise,
)
from thinkrec.evaluation.metrics import roc_auc


REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_USERS, NUM_ITEMS = 41, 61  # ids 1..40 and 1..60; row 0 is padding


def synthetic_records(seed: int = 0, rows_per_user: int = 24) -> dict[str, pd.DataFrame]:
    """Records (docs/records.md columns) where a user likes exactly the items of its own parity.

    Histories hold the user's earlier positives, so SASRec can read the parity from them too.
    Rows are split at random, so validation/test pairs are unseen in train.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, NUM_USERS):
        items = rng.choice(np.arange(1, NUM_ITEMS), size=rows_per_user, replace=False)
        liked = []
        for item in items:
            label = int(item % 2 == user % 2)
            rows.append({
                "UserID": user,
                "HisItemIDs": list(liked[-10:]),
                "HisItemTitles": [f"item {i}" for i in liked[-10:]],
                "HisItemLabels": [1] * len(liked[-10:]),
                "TargetItemID": int(item),
                "TargetItemTitle": f"item {item}",
                "label": label,
                "reason": "",
                "mode": "rec",
                "not_cold": 1,
                "timestamp": len(rows),
            })
            if label:
                liked.append(int(item))
    frame = pd.DataFrame(rows)
    split_of = rng.choice(["train", "validation", "test"], size=len(frame), p=[0.7, 0.15, 0.15])
    frames = {name: frame[split_of == name].reset_index(drop=True) for name in ("train", "validation", "test")}
    frames["test"].loc[frames["test"].index % 5 == 0, "not_cold"] = 0
    return frames


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """One torch thread while these tests run, restored after: the models are tiny, and a second
    thread on a shared 2-core machine makes them many times slower."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous_threads)


@pytest.fixture(scope="module")
def records():
    return synthetic_records()


def splits_for(records, max_len=None):
    return {name: split_from_records(frame, name, max_len) for name, frame in records.items()}


FAST_FIT = FitConfig(learning_rate=1e-2, weight_decay=0.0, batch_size=128, max_epochs=40, patience=5, seed=0)


def train_small(model_type, records, **fit_overrides):
    splits = splits_for(records, max_len=10 if model_type == "sasrec" else None)
    set_seed(0)
    model = build_model(model_type, NUM_USERS, NUM_ITEMS, 16, splits["train"], max_len=10, dropout=0.1)
    fit = train_pointwise(model, splits["train"], splits["validation"], FitConfig(**{**FAST_FIT.__dict__, **fit_overrides}))
    return model, splits, fit


@pytest.mark.parametrize("model_type", ["mf", "lightgcn", "sasrec"])
def test_encoder_learns_held_out_signal_and_round_trips(model_type, records, tmp_path):
    model, splits, fit = train_small(model_type, records)
    test_scores = score_split(model, splits["test"])
    assert roc_auc(splits["test"].labels.numpy(), test_scores) > 0.8
    assert fit.best_valid_auc == max(fit.valid_auc_history)

    save_cf_checkpoint(checkpoint_from_model(model, num_users=NUM_USERS, config={"note": "test"}), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cf_config.json", "model.safetensors"]  # no temp files left
    loaded = load_cf_checkpoint(tmp_path)
    assert loaded.model_type == model_type and loaded.num_items == NUM_ITEMS and loaded.config["note"] == "test"
    test = splits["test"]
    with torch.no_grad():
        if model_type == "sasrec":
            users = loaded.user_vectors(history_ids=test.history_ids)
        else:
            users = loaded.user_vectors(user_ids=test.user_ids)
        reloaded_scores = (users * loaded.item_table[test.item_ids]).sum(-1).numpy()
    np.testing.assert_allclose(reloaded_scores, test_scores, rtol=1e-5, atol=1e-5)
    assert torch.all(loaded.item_table[0] == 0)
    if loaded.user_table is not None:
        assert torch.all(loaded.user_table[0] == 0)


def test_nan_loss_names_step_and_learning_rate(records):
    with pytest.raises(FloatingPointError, match=r"at step \d+ \(epoch \d+\) with learning rate 1e\+30"):
        train_small("mf", records, learning_rate=1e30)


def test_bad_splits_raise(records):
    splits = splits_for(records)
    model = MatrixFactorization(NUM_USERS, NUM_ITEMS, 8)
    one_class = split_from_records(records["validation"].assign(label=1), "validation")
    with pytest.raises(ValueError, match="validation split: column 'label' has one class only"):
        train_pointwise(model, splits["train"], one_class, FAST_FIT)
    empty = split_from_records(records["validation"].iloc[:0], "validation")
    with pytest.raises(ValueError, match="validation split is empty"):
        train_pointwise(model, splits["train"], empty, FAST_FIT)
    too_large = split_from_records(records["train"].assign(TargetItemID=records["train"]["TargetItemID"] + 100), "train")
    with pytest.raises(ValueError, match=r"train split, column TargetItemID: ids must be in 0\.\.60 \(table of 61 rows\); found min \d+, max 160"):
        train_pointwise(model, too_large, splits["validation"], FAST_FIT)


def test_check_ids_fit_names_largest_id_and_table_size():
    checkpoint = checkpoint_from_model(MatrixFactorization(10, 20, 4))
    check_ids_fit(checkpoint, 9, 19)
    with pytest.raises(ValueError, match=r"my records: largest UserID 10 does not fit the mf user table of 10 rows"):
        check_ids_fit(checkpoint, 10, 19, source="my records")
    with pytest.raises(ValueError, match=r"largest ItemID 25 does not fit the mf item table of 20 rows \(ids 0\.\.19\)"):
        check_ids_fit(checkpoint, 1, 25)
    sasrec = checkpoint_from_model(SASRec(20, hidden_size=8, max_len=5), num_users=3)
    check_ids_fit(sasrec, 1000, 19)  # no user table: any user id fits


def test_sasrec_padding_rows_are_finite_and_padding_invariant():
    torch.manual_seed(0)
    encoder = SASRec(30, hidden_size=16, num_blocks=2, num_heads=2, max_len=6, dropout=0.0).eval()
    history = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        encoded = encoder.encode(history)
        assert torch.isfinite(encoded).all()
        longer_padding = torch.cat([torch.zeros(3, 4, dtype=torch.long), history], dim=1)  # L = 9 > max_len
        torch.testing.assert_close(encoder.encode(longer_padding), encoded)
        # Beyond max_len only the most recent items count.
        too_long = torch.tensor([[9, 9, 9, 1, 2, 3, 4, 5, 6]])
        torch.testing.assert_close(encoder.encode(too_long), encoder.encode(too_long[:, -6:]))
        assert not torch.allclose(encoded[0], encoded[2])
        logits = encoder(history, torch.tensor([1, 2, 3]))
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_history_matrix_keeps_last_positives_left_padded():
    matrix = history_matrix([[1, 2, 3, 4], [], [5, 6]], [[1, 0, 1, 1], [], [0, 0]], max_len=2)
    assert matrix.tolist() == [[3, 4], [0, 0], [0, 0]]
    assert history_matrix([[1, 2]], None, max_len=4).tolist() == [[0, 0, 1, 2]]


def test_lightgcn_graph_is_symmetric_normalised():
    model = LightGCN(num_users=3, num_items=3, embedding_dim=4, num_layers=1)
    model.set_graph(torch.tensor([1, 1, 2, 1]), torch.tensor([1, 2, 2, 1]))  # (1,1) repeated counts once
    dense = model.adjacency.to_dense()
    # Degrees: user1 2, user2 1, item1 1, item2 2 (items start at node 3).
    assert dense[1, 3 + 1] == pytest.approx(1 / (2**0.5 * 1**0.5))
    assert dense[1, 3 + 2] == pytest.approx(1 / 2)
    assert torch.equal(dense, dense.T)
    users, items = model.propagate()
    assert users.shape == (3, 4) and items.shape == (3, 4)
    assert torch.all(users[0] == 0) and torch.all(items[0] == 0)


def write_prepared_dir(directory: Path, frames: dict[str, pd.DataFrame]) -> Path:
    """A prepared records folder (docs/records.md), written by the project's own save_prepared."""
    import pyarrow as pa

    from thinkrec.data.preparation import PreparedRecords
    from thinkrec.data.records import save_prepared

    items = pd.DataFrame({"ItemID": np.arange(1, NUM_ITEMS), "original_id": [str(i) for i in range(1, NUM_ITEMS)]})
    items = items.assign(title=[f"item {i}" for i in items["ItemID"]], genres="", description="")
    users = pd.DataFrame({"UserID": np.arange(1, NUM_USERS), "original_id": [str(u) for u in range(1, NUM_USERS)]})
    metadata = {"num_users": NUM_USERS, "num_items": NUM_ITEMS, "padding_id": 0, "max_history": 10,
                "history_mode": "positives", "split_mode": "random", "source": "synthetic parity",
                "item_noun": "item", "item_noun_plural": "items",
                "rows": {name: len(frame) for name, frame in frames.items()},
                "positive_rate": {name: float(frame["label"].mean()) for name, frame in frames.items()}}
    splits = {name: pa.Table.from_pandas(frame, preserve_index=False) for name, frame in frames.items()}
    return save_prepared(PreparedRecords(splits=splits, items=items, users=users, metadata=metadata), directory)


@pytest.mark.parametrize("model_type", ["mf", "sasrec"])
def test_train_collaborative_main_end_to_end(model_type, records, tmp_path, capsys):
    records_dir = write_prepared_dir(tmp_path / "records", records)
    output_dir = tmp_path / "cf"
    outcome = train_collaborative.main([
        "--records_dir", str(records_dir), "--model_type", model_type, "--output_dir", str(output_dir),
        "--embedding_dim", "16", "--max_len", "10", "--batch_size", "128", "--max_epochs", "30", "--patience", "5",
        "--grid", '{"learning_rate": [1e-4, 1e-2]}', "--num_threads", "0",  # 0: leave the test process threads alone
    ])
    printed = capsys.readouterr().out
    assert "validation auc" in printed and "test       ndcg@5" in printed
    # The grid keeps the setting with the best validation AUC, whatever test says.
    best = max(outcome.grid_results, key=lambda result: result["valid_auc"])
    assert outcome.fit_config.learning_rate == best["learning_rate"] == 1e-2
    assert outcome.test_metrics["auc"] > 0.8
    predictions = pd.read_parquet(output_dir / "test_predictions.parquet")
    assert list(predictions.columns) == ["UserID", "TargetItemID", "label", "score", "not_cold"]
    assert len(predictions) == len(records["test"]) and predictions["not_cold"].tolist() == records["test"]["not_cold"].tolist()
    checkpoint = load_cf_checkpoint(output_dir)
    assert checkpoint.model_type == model_type and checkpoint.num_users == NUM_USERS and checkpoint.embedding_dim == 16
    assert checkpoint.config["metrics"]["test/auc"] == pytest.approx(outcome.test_metrics["auc"])
    assert checkpoint.config["hyper_parameters"]["learning_rate"] == 1e-2
    saved_metrics = json.loads((output_dir / "metrics.json").read_text())
    assert saved_metrics["valid"]["uauc"] == pytest.approx(outcome.valid_metrics["uauc"])


def test_train_collaborative_gives_the_thread_count_back(records, tmp_path):
    """Benchmarks train MF in-process and then the LLM: a leaked one-thread setting halved their speed."""
    records_dir = write_prepared_dir(tmp_path / "records", records)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    torch.set_num_threads(wanted)
    try:
        train_collaborative.main([
            "--records_dir", str(records_dir), "--model_type", "mf", "--output_dir", str(tmp_path / "cf"),
            "--embedding_dim", "8", "--max_epochs", "1", "--grid", '{"learning_rate": [1e-2]}', "--num_threads", "1",
        ])
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_arguments_validate_and_example_configs_parse(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        train_collaborative.DataArguments(records_dir=str(tmp_path))
    with pytest.raises(ValueError, match="grid key 'momentum' is not supported"):
        train_collaborative.CFTrainingArguments(output_dir="x", grid='{"momentum": [0.9]}')
    with pytest.raises(ValueError, match="model_type must be one of"):
        train_collaborative.ModelArguments(model_type="bpr")
    records_dir = write_prepared_dir(tmp_path / "records", synthetic_records(rows_per_user=4))
    parser = HfArgumentParser((train_collaborative.ModelArguments, train_collaborative.DataArguments, train_collaborative.CFTrainingArguments))
    for model_type in ("mf", "lightgcn", "sasrec"):
        config = json.loads((REPO_ROOT / "examples" / f"cf_{model_type}.json").read_text())
        config["records_dir"] = str(records_dir)
        model_args, _, training_args = parser.parse_dict(config, allow_extra_keys=False)
        assert model_args.model_type == model_type
        fit = train_collaborative.fit_config_for(model_type, training_args)
        assert fit.learning_rate > 0 and fit.batch_size > 0
        # The examples spell out the defaults, so they must be the same values.
        for key, value in train_collaborative.REPRODUCTION_DEFAULTS[model_type].items():
            assert config[key] == value, f"examples/cf_{model_type}.json: {key} {config[key]} != default {value}"


BENCHMARK_DATA = Path(os.environ.get("ML1M_COLLM_DIR", REPO_ROOT.parent / "shared" / "data" / "ml1m-collm"))


@pytest.mark.slow
@pytest.mark.needs_benchmark_data
@pytest.mark.skipif(not (BENCHMARK_DATA / "train.parquet").is_file(), reason=f"ML-1M CoLLM split not found at {BENCHMARK_DATA}")
def test_mf_reproduces_published_ml1m_auc(tmp_path):
    from thinkrec.data.preparation import records_from_collm
    from thinkrec.data.readers import read_collm_splits

    prepared = records_from_collm(read_collm_splits(BENCHMARK_DATA), max_history=10)
    frames = {name: table.to_pandas() for name, table in prepared.splits.items()}
    model_args = train_collaborative.ModelArguments(model_type="mf")
    training_args = train_collaborative.CFTrainingArguments(output_dir=str(tmp_path))
    outcome = train_collaborative.train_and_evaluate(
        frames, prepared.metadata["num_users"], prepared.metadata["num_items"], model_args, training_args
    )
    assert outcome.test_metrics["auc"] >= 0.6482 - 0.01  # published CoLLM MF test AUC


def test_reproduction_benchmark_skips_missing_ml1m_and_ends_with_json(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_cf", REPO_ROOT / "benchmarks" / "reproduce_cf.py")
    reproduce_cf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce_cf)
    results = reproduce_cf.main(["--ml1m_dir", str(tmp_path / "absent"), "--datasets", "ml1m-collm", "--num_threads", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert results == {}
    assert lines[0].startswith("skipping ml1m-collm: no CoLLM split at")
    last = json.loads(lines[-1])  # no dataset ran: only the versions, machine and load the figures would depend on
    assert list(last) == ["environment"] and last["environment"]["versions"]["torch"] == torch.__version__
    fake_row = {"valid_auc": 0.7, "test_auc": 0.65, "test_uauc": 0.64, "warm_auc": 0.7, "cold_auc": 0.5, "train_seconds": 3.0}
    table = reproduce_cf.results_table({"ml1m-collm": {"mf": fake_row}})
    assert "0.6482/0.6361" in table and "+0.0018" in table


# ---- Encoders that learn at real sizes, and say so when they do not (issue 11, items 4 and 6) ----


def load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_type", ["mf", "lightgcn", "sasrec"])
def test_regulariser_and_updates_leave_rows_outside_every_batch_untouched(model_type, records, tmp_path):
    """Rows that no batch reads (ids past the data's largest) keep their exact initial values under
    the default regularisation, while the rows the batches read do move. Whole-table weight decay
    moved every row at every step."""
    from dataclasses import replace

    splits = splits_for(records, max_len=10 if model_type == "sasrec" else None)
    extra = 3
    set_seed(0)
    model = build_model(model_type, NUM_USERS + extra, NUM_ITEMS + extra, 16, splits["train"], max_len=10, dropout=0.1)
    defaults = train_collaborative.fit_config_for(model_type, train_collaborative.CFTrainingArguments(output_dir=str(tmp_path)))
    assert defaults.weight_decay > 0 or getattr(defaults, "embedding_l2", 0) > 0, "the defaults regularise something"
    fit = replace(defaults, learning_rate=1e-2, batch_size=64, max_epochs=3, patience=3, seed=0)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train_pointwise(model, splits["train"], splits["validation"], fit)
    after = model.state_dict()
    tables = ["item_embedding.weight"] + ([] if model_type == "sasrec" else ["user_embedding.weight"])
    for name in tables:
        unseen = slice(-extra, None)
        assert torch.equal(after[name][unseen], before[name][unseen]), f"{name}: rows in no batch changed"
        assert torch.all(after[name][0] == 0), f"{name}: the padding row changed"
        assert not torch.equal(after[name][1:-extra], before[name][1:-extra]), f"{name}: the batch rows did not learn"


def chance_records() -> dict[str, pd.DataFrame]:
    """Learnable train rows, but a validation split whose rows are all one (user, item) pair with both
    labels: every encoder scores them alike, so validation AUC is exactly 0.5 at every epoch."""
    frames = synthetic_records(rows_per_user=8)
    validation = frames["validation"].assign(UserID=1, TargetItemID=2)
    validation["label"] = np.arange(len(validation)) % 2
    return {**frames, "validation": validation}


def test_encoder_at_chance_stops_with_the_settings_to_change_and_saves_nothing(tmp_path):
    records_dir = write_prepared_dir(tmp_path / "records", chance_records())
    output_dir = tmp_path / "cf"
    with pytest.raises(ValueError) as raised:
        train_collaborative.main([
            "--records_dir", str(records_dir), "--model_type", "mf", "--output_dir", str(output_dir),
            "--embedding_dim", "8", "--max_epochs", "20", "--num_threads", "0",
        ])
    message = str(raised.value)
    assert isinstance(raised.value, train_collaborative.InputError)  # printed alone, exit status 2
    assert "not learning" in message and "first 3 epoch(s)" in message and "0.5000" in message
    for setting in ("learning_rate", "embedding_l2", "weight_decay", "batch_size", "embedding_dim"):
        assert setting in message, f"the message should name {setting}: {message}"
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "cf_config.json").exists()


def test_grid_skips_a_setting_at_chance_and_fails_only_when_all_are(records, tmp_path):
    frames = chance_records()
    model_args = train_collaborative.ModelArguments(model_type="mf", embedding_dim=8)
    arguments = dict(output_dir=str(tmp_path), max_epochs=5, num_threads=0)
    with pytest.raises(train_collaborative.InputError, match="every grid setting stayed at chance"):
        train_collaborative.train_and_evaluate(
            frames, NUM_USERS, NUM_ITEMS, model_args,
            train_collaborative.CFTrainingArguments(grid='{"learning_rate": [1e-3, 1e-2]}', **arguments),
        )
    # chance_epochs 0 turns the check off: the run ends normally.
    outcome = train_collaborative.train_and_evaluate(
        frames, NUM_USERS, NUM_ITEMS, model_args, train_collaborative.CFTrainingArguments(chance_epochs=0, **arguments)
    )
    assert outcome.fit.best_valid_auc == 0.5


def test_help_shows_the_defaults_the_code_uses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_collaborative.parse_arguments(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out

    def option_help(name: str) -> str:
        start = text.index(f"\n  --{name} ")
        end = text.find("\n  -", start + 1)
        return " ".join(text[start:end if end > 0 else None].split())

    for model_type in ("mf", "lightgcn", "sasrec"):
        used = train_collaborative.fit_config_for(model_type, train_collaborative.CFTrainingArguments(output_dir=str(tmp_path)))
        values = {
            "batch_size": used.batch_size,  # --help said 1024 for MF while the code used 256
            "embedding_dim": train_collaborative.ModelArguments(model_type=model_type).embedding_dim,
            "learning_rate": used.learning_rate,
            "weight_decay": used.weight_decay,
        }
        if hasattr(used, "embedding_l2"):
            values["embedding_l2"] = used.embedding_l2
        for name, value in values.items():
            assert f"{model_type} {value:g}" in option_help(name), f"--{name} help does not show {model_type}'s {value:g}: {option_help(name)}"


def test_mf_learns_a_synthetic_implicit_log_with_defaults(tmp_path):
    """10k users, 4k items, ~140k train rows (leave-one-out, one sampled negative per positive): the
    size where whole-table weight decay kept MF at chance (valid AUC 0.53, 0.51, 0.50)."""
    import time

    cf_scale = load_benchmark("cf_scale")
    frames, metadata = cf_scale.prepare_frames(cf_scale.synthetic_implicit_log(num_users=10_000, num_items=4_000, seed=0), seed=0)
    assert 120_000 < len(frames["train"]) < 160_000
    started = time.perf_counter()
    outcome = train_collaborative.train_and_evaluate(
        frames, metadata["num_users"], metadata["num_items"], train_collaborative.ModelArguments(model_type="mf"),
        train_collaborative.CFTrainingArguments(output_dir=str(tmp_path), max_epochs=3, num_threads=0),
    )
    seconds = time.perf_counter() - started
    assert outcome.fit.best_valid_auc > 0.6, outcome.fit.valid_auc_history
    assert outcome.test_metrics["auc"] > 0.6
    assert seconds < 120, f"{seconds:.0f}s for 3 epochs"


def test_cf_scale_benchmark_runs_small_and_ends_with_json(capsys):
    cf_scale = load_benchmark("cf_scale")
    cf_scale.main(["--users", "400", "--items", "300", "--models", "mf", "--max_epochs", "2",
                   "--baseline_steps", "2", "--num_threads", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary["mf"]) == {"seconds_per_epoch", "epochs_to_best", "test_auc"}
    assert summary["rows"]["train"] > 0 and "previous_mf" in summary
    assert any(line.startswith("mf ") for line in lines[:-1])


@pytest.mark.parametrize("model_type", ["mf", "sasrec"])
def test_rows_of_ids_absent_from_train_are_zero_in_the_saved_tables(model_type, records, tmp_path):
    """Training never reads them, so they would keep random initial values; the LLM gets zero ("no
    information") for them, as it did when whole-table decay shrank them to ~0."""
    extra = 2
    outcome = train_collaborative.train_and_evaluate(
        records, NUM_USERS + extra, NUM_ITEMS + extra,
        train_collaborative.ModelArguments(model_type=model_type, embedding_dim=16, max_len=10),
        train_collaborative.CFTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, batch_size=128, max_epochs=5, num_threads=0),
    )
    checkpoint = checkpoint_from_model(outcome.model, num_users=NUM_USERS + extra)
    assert torch.all(checkpoint.item_table[-extra:] == 0) and torch.all(checkpoint.item_table[0] == 0)
    assert bool((checkpoint.item_table[1:NUM_ITEMS].abs().sum(-1) > 0).any())
    if checkpoint.user_table is not None:
        assert torch.all(checkpoint.user_table[-extra:] == 0)
        trained_users = torch.tensor(records["train"]["UserID"].unique())
        assert bool((checkpoint.user_table[trained_users].abs().sum(-1) > 0).all())
