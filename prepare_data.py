#!/usr/bin/env python
"""Prepare ThinkRec records from interaction data.

    python prepare_data.py examples/prepare_ml100k.json      # one .json file with the arguments
    python prepare_data.py examples/prepare_ml100k.json --output_dir data/try   # flags override the file
    python prepare_data.py --output_dir data/ml-100k          # or flags; no data arguments = ML-100K

Reads RecBole atomic files, a generic CSV/TSV/Parquet/JSON-lines table with a column mapping,
or already split CoLLM/ThinkRec tables; writes train / validation / test records, the item and
user tables and a dataset card that ``datasets.load_dataset(output_dir)`` reads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from thinkrec.data.preparation import PreparedRecords, RecordOptions, prepare_records, records_from_collm
from thinkrec.data.readers import ColumnMapping, read_collm_splits, read_interaction_table, read_ml100k, read_recbole_atomic
from thinkrec.data.records import OUTPUT_FORMATS, export_embeddings, owned_files, push_prepared_to_hub, save_prepared
from thinkrec.utils.arguments import parse_args as parse_command_args
from thinkrec.utils.arguments import run_command
from thinkrec.utils.errors import InputError
from thinkrec.utils.files import check_not_inside, output_lock


logger = logging.getLogger("prepare_data")

SOURCES = ("ml-100k", "recbole", "table", "collm")
MOVIELENS_SOURCES = ("ml-100k", "collm")  # their items are movies unless item_noun says otherwise


@dataclass
class SourceArguments:
    """Where the interactions come from and which column plays which role."""

    source: str = field(
        default="ml-100k",
        metadata={"help": f"One of {SOURCES}: the bundled MovieLens-100K, RecBole atomic files, a generic table, or CoLLM/ThinkRec splits."},
    )
    data_path: Optional[str] = field(
        default=None,
        metadata={"help": "recbole: the .inter file; table: the interaction file; collm: the folder with train/valid/test."},
    )
    item_path: Optional[str] = field(
        default=None, metadata={"help": "Item metadata file (recbole: .item, default next to .inter; table: optional)."}
    )
    file_format: Optional[str] = field(
        default=None, metadata={"help": "table: csv, tsv, parquet or jsonl (default: from the file name)."}
    )
    item_file_format: Optional[str] = field(default=None, metadata={"help": "table: format of item_path (default: from its name)."})
    user_column: str = field(default="user_id", metadata={"help": "table: user id column."})
    item_column: str = field(default="item_id", metadata={"help": "table: item id column (in the interaction file)."})
    time_column: str = field(default="timestamp", metadata={"help": "table: time column (unix seconds or dates)."})
    rating_column: Optional[str] = field(default=None, metadata={"help": "table: explicit rating column (binarised by rating_threshold)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "table: 0/1 label column. Without rating or label the log is implicit."})
    title_column: Optional[str] = field(default=None, metadata={"help": "table: item title column (item file if given, else interaction file)."})
    genres_column: Optional[str] = field(default=None, metadata={"help": "table: genres/categories column."})
    genres_separator: Optional[str] = field(default=None, metadata={"help": "table: separator inside genres_column (stored as '|')."})
    description_column: Optional[str] = field(default=None, metadata={"help": "table: item description column."})
    item_file_item_column: Optional[str] = field(
        default=None, metadata={"help": "table: item id column in item_path (default: item_column)."}
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "collm: allow reading the original pandas pickles. Unpickling runs code from the file: only for files you trust."},
    )

    def __post_init__(self):
        if self.source not in SOURCES:
            raise InputError(f"source must be one of {SOURCES}, got {self.source!r}.")
        if self.source != "ml-100k" and self.data_path is None:
            raise InputError(f"source={self.source!r} needs data_path.")

    def column_mapping(self) -> ColumnMapping:
        return ColumnMapping(
            user=self.user_column,
            item=self.item_column,
            time=self.time_column,
            rating=self.rating_column,
            label=self.label_column,
            title=self.title_column,
            genres=self.genres_column,
            description=self.description_column,
            item_file_item=self.item_file_item_column,
        )


@dataclass
class OutputArguments:
    """Where and how the records are written."""

    output_dir: str = field(metadata={"help": "Folder for the records (created; files inside are replaced atomically)."})
    output_format: str = field(default="parquet", metadata={"help": f"One of {list(OUTPUT_FORMATS)}."})
    embeddings_from: Optional[str] = field(
        default=None,
        metadata={"help": "A train_collaborative.py checkpoint folder: inline User_emb / TargetItem_emb / History_embs float32 columns."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the records with the datasets push API."})
    hub_dataset_id: Optional[str] = field(default=None, metadata={"help": "Dataset repo id for push_to_hub, e.g. 'me/ml-100k-thinkrec'."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self):
        if self.output_format not in OUTPUT_FORMATS:
            raise InputError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {self.output_format!r}.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise InputError("push_to_hub needs hub_dataset_id (the token is read from the HF_TOKEN environment variable).")


def build_records(source: SourceArguments, options: RecordOptions) -> PreparedRecords:
    """Read the configured source and turn it into records."""
    if source.source == "collm":
        presplit = read_collm_splits(source.data_path, allow_pickle=source.allow_pickle)
        return records_from_collm(presplit, options.max_history, **options.item_nouns(),
                                  num_candidates=options.num_candidates, seed=options.seed)
    if source.source == "ml-100k":
        log = read_ml100k()
    elif source.source == "recbole":
        log = read_recbole_atomic(source.data_path, source.item_path)
    else:
        log = read_interaction_table(
            source.data_path,
            source.column_mapping(),
            item_path=source.item_path,
            file_format=source.file_format,
            item_file_format=source.item_file_format,
            genres_separator=source.genres_separator,
        )
    if source.source in MOVIELENS_SOURCES or options.item_noun is not None:
        return prepare_records(log, options)
    # Any other data could be about anything: prompts that called its items movies would be silently wrong.
    raise InputError(
        f"source={source.source!r} ({source.data_path}): set item_noun and item_noun_plural, the words prompts and "
        "reasons use for the items, e.g. --item_noun game --item_noun_plural games (or product / products)."
    )


def parse_args(argv: Optional[list[str]] = None) -> tuple[SourceArguments, RecordOptions, OutputArguments]:
    """A `.json` file, flags, or both (flags override the file); unknown keys are an error."""
    return parse_command_args((SourceArguments, RecordOptions, OutputArguments), argv)


def input_paths(source: SourceArguments, output: OutputArguments) -> list[str]:
    """Every file or folder the run reads (the RecBole item file defaults to the one beside the .inter file)."""
    paths = [source.data_path, source.item_path, output.embeddings_from]
    if source.source == "recbole" and source.data_path and source.item_path is None:
        paths.append(str(Path(source.data_path).with_suffix(".item")))
    return [path for path in paths if path]


def main(argv: Optional[list[str]] = None) -> Path:
    source, options, output = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_not_inside(output.output_dir, input_paths(source, output))
    start = time.perf_counter()
    with output_lock(output.output_dir, f"prepare_data.py --output_dir {output.output_dir}"):
        owned_files(Path(output.output_dir))  # a folder holding another command's output stops here, before reading
        logger.info("reading %s", source.data_path or source.source)
        records = build_records(source, options)
        if output.embeddings_from:
            export_embeddings(records, output.embeddings_from)
        directory = save_prepared(records, output.output_dir, output.output_format)
    meta = records.metadata
    logger.info(
        "wrote %s: %s rows (train/validation/test), %d users, %d items in %.1fs",
        directory,
        "/".join(f"{meta['rows'][s]:,}" for s in ("train", "validation", "test")),
        meta["num_users"] - 1,
        meta["num_items"] - 1,
        time.perf_counter() - start,
    )
    logger.info("filter report: %s", meta["report"])
    if output.push_to_hub:
        push_prepared_to_hub(directory, output.hub_dataset_id, private=output.hub_private)
    return directory


if __name__ == "__main__":
    run_command(main)
