"""Write, read and publish prepared records (the folder layout of ``docs/records.md``).

Files are written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written split; ``metadata.json`` and the dataset card come last, so a
folder with a card is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from huggingface_hub import HfApi

from thinkrec.data.nouns import item_nouns_from_metadata
from thinkrec.data.preparation import SPLITS, PreparedRecords
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import Manifest, atomic_write, atomic_write_named_by_content, write_json


logger = logging.getLogger(__name__)

RECORD_FEATURES = datasets.Features(
    {
        "UserID": datasets.Value("int64"),
        "HisItemIDs": datasets.List(datasets.Value("int64")),
        "HisItemTitles": datasets.List(datasets.Value("string")),
        "HisItemLabels": datasets.List(datasets.Value("int64")),
        "TargetItemID": datasets.Value("int64"),
        "TargetItemTitle": datasets.Value("string"),
        "label": datasets.Value("int64"),
        "reason": datasets.Value("string"),
        "mode": datasets.Value("string"),
        "not_cold": datasets.Value("int64"),
        "timestamp": datasets.Value("int64"),
    }
)
ITEM_FEATURES = datasets.Features(
    {
        "ItemID": datasets.Value("int64"),
        "original_id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "genres": datasets.Value("string"),
        "description": datasets.Value("string"),
    }
)
USER_FEATURES = datasets.Features({"UserID": datasets.Value("int64"), "original_id": datasets.Value("string")})


def item_features(items) -> datasets.Features:
    """ITEM_FEATURES, plus the `keywords` list column once extract_keywords.py has added it."""
    features = datasets.Features(dict(ITEM_FEATURES))
    if "keywords" in items:
        features["keywords"] = datasets.List(datasets.Value("string"))
    return features
CANDIDATE_FEATURES = datasets.Features(
    {
        "UserID": datasets.Value("int64"),
        "TargetItemID": datasets.Value("int64"),
        "CandidateItemIDs": datasets.List(datasets.Value("int64")),
    }
)
EMBEDDING_COLUMNS = ("User_emb", "TargetItem_emb", "History_embs")
OUTPUT_FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}


def write_table(table: pa.Table, directory: Path, stem: str, features: datasets.Features, output_format: str) -> str:
    """Write one table atomically as Parquet (HF features in its schema) or JSON lines.

    The file is named after its content (``train-<sha256[:12]>.parquet``): ``datasets`` caches a
    local folder by its card and file *names*, so a folder prepared again with new content must
    get new names to never be served stale from the cache. Returns the file name.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}.")
    table = table.cast(features.arrow_schema)

    def write(temp: str) -> None:
        if output_format == "parquet":
            pq.write_table(table, temp)
        else:
            table.to_pandas().to_json(temp, orient="records", lines=True, force_ascii=False)

    return atomic_write_named_by_content(directory, stem, OUTPUT_FORMATS[output_format], write)


def record_features(embedding_dims: Optional[dict[str, int]] = None) -> datasets.Features:
    """Record features, plus fixed-length float32 embedding columns when they are exported."""
    features = datasets.Features(dict(RECORD_FEATURES))
    if embedding_dims:
        dim = embedding_dims["dim"]
        features["User_emb"] = datasets.List(datasets.Value("float32"), length=dim)
        features["TargetItem_emb"] = datasets.List(datasets.Value("float32"), length=dim)
        features["History_embs"] = datasets.List(datasets.List(datasets.Value("float32"), length=dim))
    return features


def _features_yaml(features: datasets.Features) -> list[dict]:
    return datasets.DatasetInfo(features=features)._to_yaml_dict()["features"]


def dataset_card(records: PreparedRecords, files: dict[str, str], features: datasets.Features) -> str:
    """The folder's ``README.md``: YAML ``configs`` (splits and side tables) and a short description."""
    configs = [
        {
            "config_name": "default",
            "default": True,
            "data_files": [{"split": split, "path": files[split]} for split in SPLITS],
        },
        {"config_name": "items", "data_files": [{"split": "train", "path": files["items"]}]},
        {"config_name": "users", "data_files": [{"split": "train", "path": files["users"]}]},
    ]
    infos = [
        {"config_name": "default", "features": _features_yaml(features)},
        {"config_name": "items", "features": _features_yaml(item_features(records.items))},
        {"config_name": "users", "features": _features_yaml(USER_FEATURES)},
    ]
    if records.candidates is not None:
        configs.append({"config_name": "candidates", "data_files": [{"split": "test", "path": files["candidates"]}]})
        infos.append({"config_name": "candidates", "features": _features_yaml(CANDIDATE_FEATURES)})
    header = yaml.safe_dump({"configs": configs, "dataset_info": infos, "tags": ["recommendation", "thinkrec"]}, sort_keys=False)
    meta = records.metadata
    rows = "\n".join(f"| {split} | {meta['rows'][split]:,} | {meta['positive_rate'][split]:.3f} |" for split in SPLITS)
    return f"""---
{header}---

# ThinkRec records: {meta['source']}

Prepared by `prepare_data.py` of the ThinkRec repository. One row per (user, target item); the
columns are documented in the repository's `docs/records.md`.

| split | rows | positive rate |
|---|---|---|
{rows}

Users: {meta['num_users'] - 1:,}; items: {meta['num_items'] - 1:,} (ids start at 1, 0 is padding).
History: last {meta['max_history']} items, mode `{meta['history_mode']}`; split: `{meta['split_mode']}`.
Prompts and reasons call the items "{meta['item_noun']}" / "{meta['item_noun_plural']}".

```python
from datasets import load_dataset
records = load_dataset("<this folder or repo>")          # train / validation / test
items = load_dataset("<this folder or repo>", "items")   # item table
```
"""


def export_embeddings(records: PreparedRecords, cf_checkpoint_dir: os.PathLike | str) -> dict[str, int]:
    """Add ``User_emb``, ``TargetItem_emb``, ``History_embs`` float32 columns from a CF checkpoint.

    The vectors come from the frozen tables of ``train_collaborative.py``'s checkpoint; for
    SASRec the user vector is the encoding of the row's positive history.
    """
    import torch

    from thinkrec.collaborative.models import check_ids_fit, load_cf_checkpoint

    cf = load_cf_checkpoint(cf_checkpoint_dir)
    check_ids_fit(cf, records.metadata["num_users"] - 1, records.metadata["num_items"] - 1, source=str(cf_checkpoint_dir))
    item_table = cf.item_table.detach().to(torch.float32).numpy()
    dim = item_table.shape[1]
    for split, table in records.splits.items():
        history = table["HisItemIDs"].combine_chunks()
        offsets = history.offsets.to_numpy()
        history_values = history.values.to_numpy()
        if cf.sequence_encoder is None:
            users = cf.user_vectors(user_ids=torch.from_numpy(table["UserID"].to_numpy().copy())).to(torch.float32).numpy()
        else:
            # SASRec reads the positive history, left-padded (most recent item last).
            labels = table["HisItemLabels"].combine_chunks().values.to_numpy()
            lengths = np.diff(offsets)
            width = max(int(lengths.max()) if len(lengths) else 0, 1)
            padded = np.zeros((len(lengths), width), dtype=np.int64)
            row = np.repeat(np.arange(len(lengths)), lengths)
            column = width - lengths[row] + (np.arange(len(history_values)) - offsets[:-1][row])
            padded[row, column] = np.where(labels == 1, history_values, 0)
            with torch.no_grad():
                chunks = np.array_split(padded, max(1, len(padded) // 4096))
                users = torch.cat([cf.user_vectors(history_ids=torch.from_numpy(chunk)) for chunk in chunks]).numpy()
        flat_users = pa.array(users.astype(np.float32).reshape(-1))
        flat_targets = pa.array(item_table[table["TargetItemID"].to_numpy()].astype(np.float32).reshape(-1))
        flat_history = pa.array(item_table[history_values].astype(np.float32).reshape(-1))
        history_vectors = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.FixedSizeListArray.from_arrays(flat_history, dim))
        table = table.append_column("User_emb", pa.FixedSizeListArray.from_arrays(flat_users, dim))
        table = table.append_column("TargetItem_emb", pa.FixedSizeListArray.from_arrays(flat_targets, dim))
        records.splits[split] = table.append_column("History_embs", history_vectors)
    records.metadata["embeddings"] = {"source": str(cf_checkpoint_dir), "model_type": cf.model_type, "dim": dim}
    return {"dim": dim}


RECORDS_OWNER = "records"  # prepare_data.py and extract_keywords.py write the same folder


def owned_files(output_dir: Path) -> Manifest:
    """The manifest of `output_dir`; a folder prepared before manifests existed owns the files its
    `metadata.json` names (and only those)."""
    manifest = Manifest(output_dir, RECORDS_OWNER)
    metadata_path = output_dir / "metadata.json"
    if not manifest.path.is_file() and metadata_path.is_file():
        try:
            named = json.loads(metadata_path.read_text(encoding="utf-8")).get("files", {})
        except json.JSONDecodeError:
            named = {}
        manifest.files.update({value: RECORDS_OWNER for value in named.values() if isinstance(value, str)})
    return manifest.refuse_others()


def publish_prepared(records: PreparedRecords, output_dir: Path, files: dict[str, str], manifest: Manifest) -> None:
    """Point ``metadata.json`` and the dataset card at `files` (already written and in `manifest`), then
    remove the tables an earlier run of the project wrote there. Files the project did not write stay."""
    metadata = dict(records.metadata, files=files)
    records.metadata = metadata
    write_json(metadata, output_dir / "metadata.json", sort_keys=True)
    card = dataset_card(records, files, record_features(metadata.get("embeddings")))
    atomic_write(output_dir / "README.md", lambda temp: Path(temp).write_text(card, encoding="utf-8"))
    manifest.add("metadata.json", "README.md")
    is_table = lambda name: Path(name).suffix in OUTPUT_FORMATS.values()  # noqa: E731
    removed = manifest.remove_except(files.values(), only=is_table)
    if removed:
        logger.info("%s: removed %d tables of an earlier preparation: %s", output_dir, len(removed), removed)


def save_prepared(records: PreparedRecords, output_dir: os.PathLike | str, output_format: str = "parquet") -> Path:
    """Write splits, side tables, metadata and the dataset card into ``output_dir``.

    Order: data files (new names, each recorded in the folder's manifest as it lands), ``metadata.json``,
    ``README.md``, then the tables of an earlier preparation are removed. At every moment the card points
    to complete files, and only files the project wrote are ever removed.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}.")
    output_dir = Path(output_dir)
    # Records without item nouns could not be prompted: refuse them before writing anything.
    item_nouns_from_metadata(records.metadata, f"records for {output_dir}")
    features = record_features(records.metadata.get("embeddings"))
    manifest = owned_files(output_dir)
    files: dict[str, str] = {}

    def write(name: str, table: pa.Table, folder: str, stem: str, table_features: datasets.Features) -> None:
        written = write_table(table, output_dir / folder if folder else output_dir, stem, table_features, output_format)
        files[name] = f"{folder}/{written}" if folder else written
        manifest.add(files[name])

    existed, earlier = manifest.path.is_file(), set(manifest.files)
    try:
        for split in SPLITS:
            write(split, records.splits[split], "data", split, features)
        for name, frame, table_features in (("items", records.items, item_features(records.items)),
                                            ("users", records.users, USER_FEATURES)):
            write(name, pa.Table.from_pandas(frame, preserve_index=False), "", name, table_features)
        if records.candidates is not None:
            write("candidates", records.candidates, "candidates", "test", CANDIDATE_FEATURES)
    except BaseException:
        # Nothing points at this run's tables yet: take them away again, the earlier preparation stays whole.
        manifest.remove_except(earlier, only=lambda name: name in files.values())
        if not existed:  # a new folder: leave nothing of this run, so the lock can take the folder away too
            manifest.path.unlink(missing_ok=True)
            for folder in ("data", "candidates"):
                if (output_dir / folder).is_dir() and not any((output_dir / folder).iterdir()):
                    (output_dir / folder).rmdir()
        raise
    records.metadata = dict(records.metadata, output_format=output_format)
    publish_prepared(records, output_dir, files, manifest)
    return output_dir


@dataclass
class LoadedRecords:
    """A prepared folder as pandas frames: ``splits[name]``, ``items``, ``users``, ``metadata``."""

    splits: dict[str, pd.DataFrame]
    items: pd.DataFrame
    users: pd.DataFrame
    metadata: dict
    candidates: Optional[pd.DataFrame] = None


def _read_frame(path: Path, output_format: str) -> pd.DataFrame:
    if output_format == "parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


def read_metadata(directory: os.PathLike | str) -> dict:
    """``metadata.json`` of a prepared folder, after checking that the files it names are there."""
    directory = Path(directory)
    metadata_path = directory / "metadata.json"
    if not metadata_path.is_file():
        raise MissingInputError(
            f"{directory} is not a prepared records folder (no metadata.json). Run prepare_data.py --output_dir {directory} first."
        )
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    files = metadata.get("files", {})
    missing = [name for name in (*SPLITS, "items", "users") if name not in files or not (directory / files[name]).is_file()]
    if missing:
        raise MissingInputError(f"{metadata_path}: files for {missing} are missing; prepare the folder again.")
    return metadata


def _count_rows(path: Path, output_format: str) -> int:
    if output_format == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def load_records_dataset(directory: os.PathLike | str) -> tuple[datasets.DatasetDict, dict]:
    """The train / validation / test splits of a prepared folder as memory-mapped ``datasets`` (read
    through the folder's dataset card, cached by ``datasets``), and its metadata. An empty split comes
    back empty (with the record features)."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    output_format, files = metadata.get("output_format", "parquet"), metadata["files"]
    rows = {split: _count_rows(directory / files[split], output_format) for split in SPLITS}
    present = [split for split in SPLITS if rows[split]]

    def load(**kwargs) -> dict:
        if len(present) == len(SPLITS):
            return dict(datasets.load_dataset(str(directory), **kwargs))
        # pyarrow cannot scan an empty Parquet file: read the other splits only.
        return dict(datasets.load_dataset(str(directory), data_files={split: files[split] for split in present}, **kwargs)) if present else {}

    splits = load()
    stale = [split for split in present if len(splits[split]) != rows[split]]
    if stale:
        # datasets keys a local folder's cache by folder and file names: a file rewritten in place under
        # its old name (prepare_data.py never does this) would be served from the old cache.
        logger.warning("%s: the datasets cache of %s is out of date (row counts differ); reading the files again", directory, stale)
        splits = load(download_mode="force_redownload", verification_mode="no_checks")
    features = record_features(metadata.get("embeddings"))
    for split in SPLITS:
        if split not in present:
            splits[split] = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.DatasetDict({split: splits[split] for split in SPLITS}), metadata


def records_fingerprint(metadata: dict) -> str:
    """What fixes the ids of a prepared folder: the content hashes in the names of its split and user
    files (the item table is left out: keywords rewrite it without renumbering anything)."""
    files = metadata["files"]
    return hashlib.sha256("\n".join(files[name] for name in (*SPLITS, "users")).encode("utf-8")).hexdigest()[:16]


def check_same_records(fingerprint: Optional[str], trained_on: Optional[str], what: str, records_dir: os.PathLike | str,
                       metadata: dict) -> None:
    """Stop when collaborative tables (`what`, trained on the records in `trained_on` with `fingerprint`)
    are used with other records: re-prepared data renumbers users and items, and tables of the right
    size would silently index other ones. Tables saved without a fingerprint are only warned about."""
    if fingerprint is None:
        logger.warning("%s carries no records fingerprint (saved by an older version): cannot check that it was "
                       "trained on %s", what, records_dir)
        return
    found = records_fingerprint(metadata)
    if fingerprint != found:
        raise InputError(
            f"{what} was trained on the records in {trained_on or 'another folder'} (fingerprint {fingerprint}), but "
            f"records_dir={records_dir} holds other records (fingerprint {found}); preparing data again renumbers users "
            f"and items, so its tables would index other ones. Train the collaborative model on {records_dir} "
            "(train_collaborative.py), or use the records it was trained on."
        )


def load_items(directory: os.PathLike | str) -> pd.DataFrame:
    """The item table of a prepared folder (ItemID, title, genres, description, and keywords once extracted)."""
    metadata = read_metadata(directory)
    return _read_frame(Path(directory) / metadata["files"]["items"], metadata.get("output_format", "parquet"))


def load_candidates(directory: os.PathLike | str) -> tuple[pd.DataFrame, str]:
    """The ranking pools of a prepared folder (UserID, TargetItemID, CandidateItemIDs) and the file they come
    from; a folder prepared without `num_candidates` is a `MissingInputError` saying how to add them."""
    metadata = read_metadata(directory)
    name = metadata["files"].get("candidates")
    if name is None:
        raise MissingInputError(
            f"{directory}: the records have no candidate pools (metadata.json names no 'candidates' file); prepare "
            f"them again with num_candidates: N (e.g. prepare_data.py ... --num_candidates 99 --output_dir {directory})."
        )
    path = Path(directory) / name
    if not path.is_file():
        raise MissingInputError(f"{directory}/metadata.json names the candidate pools {name}, which is missing; prepare the folder again.")
    return _read_frame(path, metadata.get("output_format", "parquet")), str(path)


def load_prepared(directory: os.PathLike | str) -> LoadedRecords:
    """Read a folder written by :func:`save_prepared` (or ``prepare_data.py``) into pandas frames."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    output_format, files = metadata.get("output_format", "parquet"), metadata["files"]
    read = lambda name: _read_frame(directory / files[name], output_format)  # noqa: E731
    return LoadedRecords(
        splits={split: read(split) for split in SPLITS},
        items=read("items"),
        users=read("users"),
        metadata=metadata,
        candidates=read("candidates") if "candidates" in files else None,
    )


def push_prepared_to_hub(directory: os.PathLike | str, repo_id: str, private: bool = False, token: Optional[str] = None) -> None:
    """Upload a prepared folder with the ``datasets`` push API: splits as the default config,
    items / users (and candidates) as named configs. The token comes from the argument or the
    ``HF_TOKEN`` environment variable and is never logged."""
    token = token or os.environ.get("HF_TOKEN")
    directory = Path(directory)
    records = datasets.load_dataset(str(directory))
    records.push_to_hub(repo_id, private=private, token=token, commit_message="Upload ThinkRec records")
    for config in ("items", "users", "candidates"):
        if config == "candidates" and not (directory / "candidates").is_dir():
            continue
        side = datasets.load_dataset(str(directory), config)
        side.push_to_hub(repo_id, config_name=config, private=private, token=token, commit_message=f"Upload {config} table")
    # Table sizes, split settings and the filter report travel with the data.
    HfApi(token=token).upload_file(
        path_or_fileobj=str(directory / "metadata.json"),
        path_in_repo="metadata.json",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Upload preparation metadata",
    )
    logger.info("pushed %s to the Hub as %s", directory, repo_id)
