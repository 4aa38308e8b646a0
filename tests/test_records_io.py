"""Writing prepared folders atomically, reading them with datasets, publishing them, the CLI."""

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

import prepare_data
import thinkrec.data.records as records_io
from thinkrec.data.preparation import RecordOptions, prepare_records
from thinkrec.data.readers import InteractionLog
from thinkrec.data.records import RECORD_FEATURES, load_prepared, save_prepared


def small_records(num_candidates=0):
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", f"i{i}", int(10 * u + t), float(rng.integers(1, 6))) for u in range(12) for t, i in enumerate(rng.choice(20, 6, replace=False))]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(20)], "title": [f"Film {i} (199{i % 10})" for i in range(20)], "genres": "Drama", "description": ""})
    log = InteractionLog(interactions=frame, items=items, source="toy")
    return prepare_records(log, RecordOptions(split_ratios=[0.6, 0.2, 0.2], num_candidates=num_candidates))


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_load_dataset_returns_splits_with_explicit_features(tmp_path, output_format):
    records = small_records(num_candidates=5)
    save_prepared(records, tmp_path, output_format)
    loaded = datasets.load_dataset(str(tmp_path))
    assert set(loaded) == {"train", "validation", "test"}
    for split in loaded:
        assert loaded[split].features == RECORD_FEATURES
        assert loaded[split].num_rows == records.splits[split].num_rows
    assert loaded["test"][0] == records.splits["test"].slice(0, 1).to_pylist()[0]
    items = datasets.load_dataset(str(tmp_path), "items")["train"]
    assert items.num_rows == len(records.items) and items.features["ItemID"].dtype == "int64"
    candidates = datasets.load_dataset(str(tmp_path), "candidates")["test"]
    assert len(candidates[0]["CandidateItemIDs"]) == 6
    back = load_prepared(tmp_path)
    assert back.metadata["num_items"] == records.metadata["num_items"]
    assert back.splits["train"]["HisItemIDs"].map(list).tolist() == records.splits["train"]["HisItemIDs"].to_pylist()


def test_a_crash_while_writing_leaves_the_previous_preparation_loadable(tmp_path, monkeypatch):
    records = small_records()
    save_prepared(records, tmp_path)
    before = datasets.load_dataset(str(tmp_path), split="train").to_list()

    def crash(table, where):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(records_io.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        save_prepared(small_records(num_candidates=3), tmp_path)
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert datasets.load_dataset(str(tmp_path), split="train").to_list() == before
    assert load_prepared(tmp_path).splits["train"]["UserID"].tolist() == [r["UserID"] for r in before]


def test_preparing_a_folder_again_is_never_served_from_the_datasets_cache(tmp_path):
    first, second = small_records(), small_records()
    second.splits["test"] = second.splits["test"].set_column(
        6, "label", pa.array(1 - second.splits["test"]["label"].to_numpy())
    )
    save_prepared(first, tmp_path)
    assert datasets.load_dataset(str(tmp_path), split="test")["label"] == first.splits["test"]["label"].to_pylist()
    save_prepared(second, tmp_path)
    assert datasets.load_dataset(str(tmp_path), split="test")["label"] == second.splits["test"]["label"].to_pylist()
    assert len(list((tmp_path / "data").iterdir())) == 3  # the earlier files are gone


def test_push_to_hub_uploads_every_config_and_the_upload_loads_back(tmp_path, monkeypatch):
    records = small_records()
    save_prepared(records, tmp_path / "records")
    uploaded = {}

    def fake_dict_push(self, repo_id, config_name="default", **kwargs):  # the network call
        assert kwargs.get("token") == "hf_secret"
        uploaded[config_name] = self

    def fake_upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):  # the network call
        uploaded[path_in_repo] = json.loads(Path(path_or_fileobj).read_text())

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_dict_push)
    monkeypatch.setattr(records_io.HfApi, "upload_file", fake_upload_file)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    records_io.push_prepared_to_hub(tmp_path / "records", "someone/toy-records")
    assert set(uploaded) == {"default", "items", "users", "metadata.json"}
    assert uploaded.pop("metadata.json")["num_items"] == records.metadata["num_items"]
    # Load what would have been uploaded, the way a user loads it from the Hub.
    hub = tmp_path / "hub"
    for config, dataset_dict in uploaded.items():
        for split, dataset in dataset_dict.items():
            dataset.to_parquet(str(hub / config / f"{split}.parquet"))
    reloaded = datasets.load_dataset("parquet", data_files={s: str(hub / "default" / f"{s}.parquet") for s in ("train", "validation", "test")})
    assert reloaded["test"].features == RECORD_FEATURES
    assert reloaded["test"].to_list() == records.splits["test"].to_pylist()


def test_cli_reads_one_json_file_and_rejects_unknown_keys(tmp_path):
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "split_ratio": [0.8, 0.1, 0.1]}))
    with pytest.raises(ValueError, match="split_ratio"):
        prepare_data.main([str(args)])
    with pytest.raises(ValueError, match="needs data_path"):
        prepare_data.main(["--source", "table", "--output_dir", str(tmp_path / "out")])


def test_quickstart_default_builds_ml100k_records(tmp_path):
    directory = prepare_data.main(["--output_dir", str(tmp_path / "ml100k")])
    loaded = datasets.load_dataset(str(directory))
    total = sum(loaded[s].num_rows for s in loaded)
    assert total == 100_000
    train, test = loaded["train"].to_pandas(), loaded["test"].to_pandas()
    assert train["timestamp"].max() <= test["timestamp"].min()
    assert set(train["label"]) == {0, 1}
    assert train["HisItemIDs"].map(len).max() == 10


def test_embeddings_are_exported_as_fixed_length_float32_columns(tmp_path):
    from thinkrec.collaborative.models import MatrixFactorization, checkpoint_from_model, save_cf_checkpoint

    records = small_records()
    meta = records.metadata
    model = MatrixFactorization(meta["num_users"], meta["num_items"], 8)
    save_cf_checkpoint(checkpoint_from_model(model), str(tmp_path / "mf"))
    records_io.export_embeddings(records, tmp_path / "mf")
    save_prepared(records, tmp_path / "records")
    test = datasets.load_dataset(str(tmp_path / "records"), split="test")
    assert test.features["User_emb"] == datasets.List(datasets.Value("float32"), length=8)
    row = test[0]
    expected_user = model.user_embedding.weight[row["UserID"]].detach().numpy()
    np.testing.assert_allclose(row["User_emb"], expected_user, rtol=1e-6)
    expected_item = model.item_embedding.weight[row["TargetItemID"]].detach().numpy()
    np.testing.assert_allclose(row["TargetItem_emb"], expected_item, rtol=1e-6)
    assert len(row["History_embs"]) == len(row["HisItemIDs"])


def test_sasrec_user_vectors_encode_the_positive_history(tmp_path):
    from thinkrec.collaborative.models import SASRec, save_cf_checkpoint

    records = small_records()
    encoder = SASRec(records.metadata["num_items"], hidden_size=8, num_blocks=1, max_len=10, dropout=0.0)
    save_cf_checkpoint(encoder, str(tmp_path / "sasrec"))
    records_io.export_embeddings(records, tmp_path / "sasrec")
    row = records.splits["test"].slice(3, 1).to_pylist()[0]
    history = [i for i, label in zip(row["HisItemIDs"], row["HisItemLabels"]) if label == 1]
    with torch.no_grad():
        encoder.eval()
        expected = encoder.encode(torch.tensor([history or [0]])).numpy()[0]
    np.testing.assert_allclose(row["User_emb"], expected, rtol=1e-4, atol=1e-5)


def test_embedding_export_refuses_tables_that_are_too_small(tmp_path):
    from thinkrec.collaborative.models import MatrixFactorization, checkpoint_from_model, save_cf_checkpoint

    records = small_records()
    small = MatrixFactorization(3, 3, 4)
    save_cf_checkpoint(checkpoint_from_model(small), str(tmp_path / "mf"))
    with pytest.raises(ValueError, match="3"):
        records_io.export_embeddings(records, tmp_path / "mf")
