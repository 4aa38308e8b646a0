"""Readers that turn raw interaction logs into one interaction table and one item table.

Every reader returns an :class:`InteractionLog`:

- ``interactions``: columns ``user`` and ``item`` (original ids, as strings), ``timestamp``
  (int64 unix seconds) and either ``rating`` (float64, explicit feedback) or ``label``
  (int64 0/1), or neither (implicit log: every row is a positive);
- ``items``: ``item`` (original id, string), ``title``, ``genres`` (``|``-separated),
  ``description`` (empty strings where the source has none).

The CoLLM/ThinkRec reader is different: those tables are already split, labelled and carry
their histories, so it returns a :class:`PresplitRecords` instead.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas._libs.parsers import STR_NA_VALUES

from thinkrec.utils.errors import InputError, MissingInputError


logger = logging.getLogger(__name__)

TABLE_FORMATS = ("csv", "tsv", "parquet", "jsonl")
# Complete character references only: HTML5 also decodes some names without ';' ("&not" in "&notes").
_HTML_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_LIST_SHAPES = "text, a list of strings or a list of lists of strings"
# pandas' default missing-value markers ("NA", "N/A", "NaN", "null", "None", "<NA>", "#N/A", ...). Cells are read
# as written, so in an id or time column a marker is refused as an empty cell; in a title it stays text.
MISSING_MARKERS = frozenset(STR_NA_VALUES) - {""}


class DataFormatError(InputError):
    """Raised when an input file does not have the shape the reader was told to expect."""


@dataclass
class InteractionLog:
    """One interaction table and one item table, with original ids as strings."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    source: str
    path: Optional[str] = None  # the interaction file, named in messages
    feedback_column: Optional[str] = None  # the rating or label column as that file names it
    item_path: Optional[str] = None  # the separate item file `items` was read from (None: from the interaction file)

    @property
    def feedback(self) -> str:
        """``"rating"``, ``"label"`` or ``"implicit"``: which kind of signal the log carries."""
        if "rating" in self.interactions.columns:
            return "rating"
        if "label" in self.interactions.columns:
            return "label"
        return "implicit"


@dataclass
class PresplitRecords:
    """Already split CoLLM/ThinkRec tables: split name -> frame, plus the item table."""

    splits: dict[str, pd.DataFrame]
    items: pd.DataFrame
    source: str
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Small shared checks
# --------------------------------------------------------------------------------------------


def _require_file(path: os.PathLike | str, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}")
    return path


def _read_file(read, path: Path, what: str, **options) -> pd.DataFrame:
    """`read(path, **options)`; a file that is empty or cannot be parsed as `what` is one error naming it."""
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: the file is empty (0 bytes); expected {what} with a header naming the columns.")
    try:
        return read(path, **options)
    except (ValueError, pa.ArrowException) as error:  # pandas' ParserError, bad JSON, undecodable text, bad Parquet
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].removeprefix("Error tokenizing data. C error: ")
        raise DataFormatError(f"{path}: cannot be read as {what}: {reason}") from error


def _read_text_table(path: Path, what: str, **options) -> pd.DataFrame:
    """A delimited text file with every cell as the text written ("007" stays "007", an empty cell is "")."""
    return _read_file(pd.read_csv, path, what, dtype=str, keep_default_na=False, encoding="utf-8", **options)


def _require_columns(frame: pd.DataFrame, columns: dict[str, Optional[str]], path: Path) -> None:
    """Check that every configured column exists; name the file, the role and what is there."""
    missing = {role: name for role, name in columns.items() if name is not None and name not in frame.columns}
    if missing:
        wanted = ", ".join(f"{role}={name!r}" for role, name in missing.items())
        raise DataFormatError(
            f"{path}: column(s) not found: {wanted}. Columns in the file: {list(frame.columns)}. "
            "Set the matching *_column argument to one of these."
        )


def _empty_cells(values: pd.Series) -> pd.Series:
    """Missing cells, and blank ones in text columns (CSV, TSV and RecBole files are read as text)."""
    empty = values.isna()
    if not pd.api.types.is_numeric_dtype(values):
        empty |= values.astype(str).str.strip() == ""
    return empty


def _first_row(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0])


def _empty_keys(values: pd.Series, path: Path, column: str, what: str) -> None:
    """Refuse empty cells and missing-value markers (`MISSING_MARKERS`) in an id or time column, naming the
    file, the column, the first row and, for a marker, how it is written."""
    empty = _empty_cells(values)
    markers = pd.Series(False, index=values.index)
    if not pd.api.types.is_numeric_dtype(values):
        text = values.astype(str).str.strip()
        markers = values.notna() & text.isin(MISSING_MARKERS)
    empty |= markers
    if not empty.any():
        return
    written = f" (a missing-value marker such as {text[markers].iloc[0]!r} is an empty cell)" if markers.any() else ""
    raise DataFormatError(f"{path}: column {column!r} has {int(empty.sum())} empty {what}(s){written}, first at row {_first_row(empty)}.")


def _numeric_column(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Convert to float64; raise naming the file, column and a bad sample value otherwise."""
    converted = pd.to_numeric(values, errors="coerce")
    empty = _empty_cells(values)
    bad = converted.isna() & ~empty
    if bad.any():
        sample = values[bad].iloc[0]
        raise DataFormatError(
            f"{path}: column {column!r} must be numeric, found {int(bad.sum())} non-numeric value(s), "
            f"e.g. {sample!r} (row {_first_row(bad)})."
        )
    if empty.any():
        raise DataFormatError(f"{path}: column {column!r} has {int(empty.sum())} empty value(s), first at row {_first_row(empty)}.")
    return converted.astype("float64")


def _timestamp_column(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Unix seconds as int64 from numbers or from date strings (``2019-03-01``, ISO 8601...)."""
    _empty_keys(values, path, column, "timestamp")
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64").round().astype("int64")
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.round().astype("int64")
    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna()
    if bad.any():
        sample = values[bad].iloc[0]
        raise DataFormatError(
            f"{path}: column {column!r} must hold unix times or dates, found {int(bad.sum())} unparseable "
            f"value(s), e.g. {sample!r}."
        )
    return (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def _id_column(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Ids as strings: text as written ("007" is not "7"); stored numbers as their decimal text (``12.0`` -> ``"12"``).
    Empty cells and missing-value markers ("NA", "null", ...) are refused."""
    _empty_keys(values, path, column, "id")
    if pd.api.types.is_float_dtype(values) and (values == values.round()).all():
        values = values.astype("int64")
    return values.astype(str)


def unescape_text(text: str) -> str:
    """Decode the HTML character references (``&amp;`` -> ``&``) that scraped metadata carries in text."""
    return _HTML_ENTITY.sub(lambda match: html.unescape(match.group(0)), text) if "&" in text else text


def unescape_html(values: pd.Series) -> pd.Series:
    """`unescape_text` over a column of strings."""
    return values.map(unescape_text)


def _is_missing(value) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def _as_parts(value, path: Path, column: str, row: int, parse_text: bool) -> Optional[list[str]]:
    """A metadata cell as a flat list of strings when it is a list (or, with `parse_text`, a list written
    as text), else None. Lists of lists are flattened in order (Amazon ``categories``: one path per list)."""
    if isinstance(value, str):
        if not parse_text:
            return None
        text = value.strip()
        if not (text.startswith("[") and text.endswith("]")):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)  # Python literals, as in the Amazon 2014 metadata dumps
            except (ValueError, SyntaxError):
                raise DataFormatError(
                    f"{path}: column {column!r} row {row}: expected {_LIST_SHAPES}, found {value!r} (not a readable list)."
                ) from None
    if isinstance(value, (dict, set)):
        raise DataFormatError(f"{path}: column {column!r} row {row}: expected {_LIST_SHAPES}, found {value!r}.")
    if not isinstance(value, (list, tuple, np.ndarray)):
        return None
    parts = []
    for element in value:
        inner = element if isinstance(element, (list, tuple, np.ndarray)) else [element]
        if not all(isinstance(part, str) for part in inner):
            raise DataFormatError(f"{path}: column {column!r} row {row}: expected {_LIST_SHAPES}, found {_plain(value)!r}.")
        parts += [part.strip() for part in inner if part.strip()]
    return parts


def _plain(value):
    """numpy arrays (Parquet list cells) as lists, so an error message shows the value as written."""
    if isinstance(value, np.ndarray):
        return [_plain(element) for element in value]
    return value


def _cells(frame: pd.DataFrame, column: str, path: Path, parse_text: bool = True) -> list[Optional[list[str] | str]]:
    """Each cell of a metadata column: None when empty, a list of strings when it holds a list, else text."""
    values = frame[column]
    if pd.api.types.is_numeric_dtype(values):
        return [None if _is_missing(value) else str(value) for value in values.tolist()]
    cells = []
    for row, value in enumerate(values.tolist()):
        if _is_missing(value):
            cells.append(None)
            continue
        parts = _as_parts(value, path, column, row, parse_text)
        cells.append(str(value) if parts is None else parts)
    return cells


def _text_column(frame: pd.DataFrame, column: Optional[str], path: Path, parse_text: bool = True) -> pd.Series:
    """A metadata column as stripped text; list cells (see `_as_parts`) are joined with spaces."""
    if column is None:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    cells = _cells(frame, column, path, parse_text)
    texts = [" ".join(cell) if isinstance(cell, list) else (cell or "") for cell in cells]
    return unescape_html(pd.Series(texts, index=frame.index, dtype=object).str.strip())


def _genres_column(frame: pd.DataFrame, column: Optional[str], path: Path, separator: Optional[str]) -> pd.Series:
    """Genres or categories as ``|``-joined text: list cells as they are (repeats kept once, in order),
    text cells split at `separator`."""
    if column is None:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    texts = []
    for cell in _cells(frame, column, path):
        if isinstance(cell, str):
            cell = cell.split(separator) if separator is not None else [cell]
        parts = [part.strip() for part in cell or [] if part.strip()]
        texts.append("|".join(dict.fromkeys(parts)))
    return unescape_html(pd.Series(texts, index=frame.index, dtype=object))


def _items_from_columns(
    frame: pd.DataFrame,
    item_column: str,
    title_column: Optional[str],
    genres_column: Optional[str],
    description_column: Optional[str],
    path: Path,
    genres_separator: Optional[str] = None,
) -> pd.DataFrame:
    """Build the item table (one row per item, first occurrence wins) from a frame."""
    _require_columns(
        frame,
        {"item": item_column, "title": title_column, "genres": genres_column, "description": description_column},
        path,
    )
    items = pd.DataFrame(
        {
            "item": _id_column(frame[item_column], path, item_column),
            # A title in brackets is a title ("[REC]"), never a list written as text.
            "title": _text_column(frame, title_column, path, parse_text=False),
            "genres": _genres_column(frame, genres_column, path, genres_separator),
            "description": _text_column(frame, description_column, path),
        }
    )
    return items.drop_duplicates("item", keep="first").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# RecBole atomic files
# --------------------------------------------------------------------------------------------

# RecBole names the same role differently across its benchmark datasets.
RECBOLE_FIELD_ALIASES = {
    "user": ("user_id",),
    "item": ("item_id",),
    "rating": ("rating",),
    "label": ("label",),
    "timestamp": ("timestamp",),
    "title": ("movie_title", "title", "name", "item_name"),
    "year": ("release_year", "year"),
    "genres": ("class", "genre", "genres", "categories"),
    "description": ("description", "plot", "summary"),
}


def _read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read one RecBole atomic file: a tab-separated table whose header cells are ``name:type``."""
    # QUOTE_NONE: RecBole files are not quoted, titles may contain '"'.
    frame = _read_text_table(path, "a RecBole atomic file (tab-separated)", sep="\t", quoting=3)
    names, types = [], {}
    for cell in frame.columns:
        if ":" not in cell:
            raise DataFormatError(
                f"{path}: header cell {cell!r} is not of the form name:type (RecBole atomic format, "
                "e.g. 'user_id:token')."
            )
        name, kind = cell.rsplit(":", 1)
        names.append(name)
        types[name] = kind
    frame.columns = names
    return frame, types


def _pick_field(types: dict[str, str], role: str) -> Optional[str]:
    for name in RECBOLE_FIELD_ALIASES[role]:
        if name in types:
            return name
    return None


def bundled_ml100k_dir() -> Path:
    """Folder of MovieLens-100K atomic files shipped in the ``recbole`` wheel (not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            "MovieLens-100K is read from the recbole wheel, which is not installed. "
            "Install it without its dependencies: pip install --no-deps recbole==1.2.1 "
            "(or run `make install`)."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise MissingInputError(f"recbole is installed but {folder / 'ml-100k.inter'} is missing.")
    return folder


def _sequence_interactions(frame: pd.DataFrame, user: str, sequence: str, item: str, path: Path) -> pd.DataFrame:
    """Interactions of a RecBole sequence file (`item_id_list:token_seq` + target `item_id`, one line per
    user or per prefix of the user's sequence): each user's longest line, exploded, position as time."""
    users = _id_column(frame[user], path, user)
    sequences = [f"{history} {target}".split() for history, target in zip(frame[sequence], frame[item])]
    longest: dict[str, list[str]] = {}
    for row, (name, items) in enumerate(zip(users, sequences)):
        kept = longest.get(name)
        shorter, longer = (items, kept) if kept is not None and len(items) <= len(kept) else (kept, items)
        if shorter is not None and longer[: len(shorter)] != shorter:
            raise DataFormatError(
                f"{path}: line {row + 2}, user {name!r}: the sequence {' '.join(items[:5])} ... is not a prefix of the "
                "user's other line (a sequence file holds one sequence per user, or prefixes of it)."
            )
        longest[name] = longer
    exploded = [(name, value, position) for name, items in longest.items() for position, value in enumerate(items)]
    return pd.DataFrame(exploded, columns=["user", "item", "timestamp"]).astype({"timestamp": "int64"})


def read_recbole_atomic(
    inter_path: os.PathLike | str,
    item_path: Optional[os.PathLike | str] = None,
    user_field: Optional[str] = None,
    item_field: Optional[str] = None,
    rating_field: Optional[str] = None,
    time_field: Optional[str] = None,
    title_field: Optional[str] = None,
) -> InteractionLog:
    """Read RecBole atomic files (``.inter`` and optionally ``.item``).

    Fields are found by RecBole's usual names (``user_id``, ``item_id``, ``rating``,
    ``timestamp``, ``movie_title``/``title``, ``release_year``, ``class``/``categories``);
    pass a field name to override. A sequence file (``item_id_list:token_seq`` + ``item_id``, no
    timestamp: RecBole's sequential benchmarks) is read as each user's sequence in order, the
    position standing for time. A release year, when present, is appended to the title as
    ``"Title (1995)"``, the MovieLens convention the prompts use.
    """
    inter_path = _require_file(inter_path, "RecBole interaction file")
    frame, types = _read_atomic(inter_path)
    user = user_field or _pick_field(types, "user")
    item = item_field or _pick_field(types, "item")
    rating = rating_field or _pick_field(types, "rating")
    label = _pick_field(types, "label") if rating is None else None
    time = time_field or _pick_field(types, "timestamp")
    _require_columns(frame, {"user": user, "item": item, "rating": rating, "timestamp": time}, inter_path)
    if user is None or item is None:
        raise DataFormatError(f"{inter_path}: needs user and item fields (user_id:token, item_id:token); header has {list(types)}.")
    sequence = next((name for name, kind in types.items() if kind == "token_seq"), None)
    if time is None and sequence is not None:
        interactions = _sequence_interactions(frame, user, sequence, item, inter_path)
    elif time is None:
        raise DataFormatError(
            f"{inter_path}: no timestamp field (looked for 'timestamp'); temporal splits and histories need one. "
            f"Header has {list(types)}; pass time_field=NAME."
        )
    else:
        interactions = pd.DataFrame(
            {
                "user": _id_column(frame[user], inter_path, user),
                "item": _id_column(frame[item], inter_path, item),
                "timestamp": _timestamp_column(frame[time], inter_path, time),
            }
        )
    if rating is not None:
        interactions["rating"] = _numeric_column(frame[rating], inter_path, rating)
    elif label is not None:
        interactions["label"] = _numeric_column(frame[label], inter_path, label).astype("int64")

    if item_path is None:
        candidate = inter_path.with_suffix(".item")
        item_path = candidate if candidate.is_file() else None
    if item_path is None:
        items = pd.DataFrame({"item": interactions["item"].unique()})
        for column in ("title", "genres", "description"):
            items[column] = ""
    else:
        item_path = _require_file(item_path, "RecBole item file")
        item_frame, item_types = _read_atomic(item_path)
        item_id = item_field or _pick_field(item_types, "item")
        title = title_field or _pick_field(item_types, "title")
        year = _pick_field(item_types, "year")
        genres = _pick_field(item_types, "genres")
        description = _pick_field(item_types, "description")
        if title is not None and year is not None:
            years = item_frame[year].str.strip()
            has_year = years.str.fullmatch(r"\d{4}")
            item_frame[title] = item_frame[title].where(~has_year, item_frame[title] + " (" + years + ")")
        genre_separator = " " if genres is not None and item_types.get(genres) == "token_seq" else None
        items = _items_from_columns(item_frame, item_id, title, genres, description, item_path, genre_separator)
    return InteractionLog(interactions, items, f"recbole:{inter_path.stem}", str(inter_path), rating or label,
                          item_path=None if item_path is None else str(item_path))


def read_ml100k() -> InteractionLog:
    """MovieLens-100K as shipped in the recbole wheel: 100,000 ratings, 943 users, 1,682 movies."""
    folder = bundled_ml100k_dir()
    log = read_recbole_atomic(folder / "ml-100k.inter", folder / "ml-100k.item")
    log.source = "ml-100k"
    return log


# --------------------------------------------------------------------------------------------
# Generic tables (CSV / TSV / Parquet / JSON lines)
# --------------------------------------------------------------------------------------------


def infer_table_format(path: Path) -> str:
    """Table format from the file name: ``.csv``, ``.tsv``, ``.parquet``, ``.jsonl``/``.json`` (+ ``.gz``)."""
    name = path.name.lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for fmt, suffixes in (("csv", (".csv",)), ("tsv", (".tsv", ".tab")), ("parquet", (".parquet", ".pq")), ("jsonl", (".jsonl", ".json", ".ndjson"))):
        if name.endswith(suffixes):
            return fmt
    raise DataFormatError(
        f"{path}: cannot tell the table format from the file name; set file_format to one of {TABLE_FORMATS}."
    )


def read_table_file(path: os.PathLike | str, file_format: Optional[str] = None, what: str = "table") -> pd.DataFrame:
    """Read a CSV, TSV, Parquet or JSON-lines file into a frame: CSV and TSV cells as the text written (ids
    keep their leading zeros), Parquet and JSON lines with their stored types (``dtype=False``: "007" stays text)."""
    path = _require_file(path, what)
    fmt = file_format or infer_table_format(path)
    if fmt == "csv":
        return _read_text_table(path, "CSV")
    if fmt == "tsv":
        return _read_text_table(path, "TSV", sep="\t")
    if fmt == "parquet":
        return _read_file(pd.read_parquet, path, "Parquet")
    if fmt == "jsonl":
        return _read_file(pd.read_json, path, "JSON lines", lines=True, dtype=False)
    raise DataFormatError(f"{path}: unknown file_format {fmt!r}; expected one of {TABLE_FORMATS}.")


@dataclass
class ColumnMapping:
    """Which column of a generic table plays which role (``None`` = absent)."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: Optional[str] = None
    label: Optional[str] = None
    title: Optional[str] = None
    genres: Optional[str] = None
    description: Optional[str] = None
    item_file_item: Optional[str] = None  # id column in the item file; defaults to `item`


def read_interaction_table(
    path: os.PathLike | str,
    columns: ColumnMapping,
    item_path: Optional[os.PathLike | str] = None,
    file_format: Optional[str] = None,
    item_file_format: Optional[str] = None,
    genres_separator: Optional[str] = None,
) -> InteractionLog:
    """Read a generic interaction table and, optionally, a separate item metadata table.

    Covers, for instance, Amazon review files (``reviewerID, asin, overall, unixReviewTime``
    with metadata ``asin, title``) and order logs (``customer, product, order time, product
    name`` in one file). Title, genres and description are read from the item file when one is
    given, otherwise from the interaction table itself.
    """
    path = Path(path)
    frame = read_table_file(path, file_format, "interaction file")
    if columns.rating is not None and columns.label is not None:
        raise DataFormatError("Set rating_column or label_column, not both.")
    _require_columns(
        frame,
        {"user": columns.user, "item": columns.item, "time": columns.time, "rating": columns.rating, "label": columns.label},
        path,
    )
    if len(frame) == 0:
        raise DataFormatError(f"{path}: the interaction table has no rows.")
    interactions = pd.DataFrame(
        {
            "user": _id_column(frame[columns.user], path, columns.user),
            "item": _id_column(frame[columns.item], path, columns.item),
            "timestamp": _timestamp_column(frame[columns.time], path, columns.time),
        }
    )
    if columns.rating is not None:
        interactions["rating"] = _numeric_column(frame[columns.rating], path, columns.rating)
    if columns.label is not None:
        labels = _numeric_column(frame[columns.label], path, columns.label)
        bad = ~labels.isin([0.0, 1.0])
        if bad.any():
            raise DataFormatError(
                f"{path}: column {columns.label!r} must hold 0/1 labels, found e.g. {frame[columns.label][bad].iloc[0]!r}."
            )
        interactions["label"] = labels.astype("int64")

    if item_path is not None:
        item_path = Path(item_path)
        item_frame = read_table_file(item_path, item_file_format, "item file")
        items = _items_from_columns(
            item_frame,
            columns.item_file_item or columns.item,
            columns.title,
            columns.genres,
            columns.description,
            item_path,
            genres_separator,
        )
    else:
        items = _items_from_columns(frame, columns.item, columns.title, columns.genres, columns.description, path, genres_separator)
    return InteractionLog(interactions, items, f"table:{path.name}", str(path), columns.rating or columns.label,
                          item_path=None if item_path is None else str(item_path))


# --------------------------------------------------------------------------------------------
# Already split CoLLM / ThinkRec tables
# --------------------------------------------------------------------------------------------

COLLM_COLUMNS = ("uid", "iid", "label", "timestamp", "his", "title")
COLLM_SPLIT_FILES = {"train": "train", "validation": "valid", "test": "test"}


def _read_collm_file(folder: Path, stem: str, allow_pickle: bool) -> pd.DataFrame:
    parquet = folder / f"{stem}.parquet"
    if parquet.is_file():
        return pd.read_parquet(parquet)
    for suffix in (".pkl", ".pickle"):
        pickled = folder / f"{stem}{suffix}"
        if pickled.is_file():
            if not allow_pickle:
                raise PermissionError(
                    f"{pickled} is a pandas pickle. Unpickling runs arbitrary code from the file, so it is "
                    "refused by default. If you trust the file (e.g. the official CoLLM release), opt in with "
                    "allow_pickle=True (--allow_pickle true), or convert it once to Parquet."
                )
            return pd.read_pickle(pickled)  # the user opted in explicitly
    raise MissingInputError(f"{folder}: no {stem}.parquet (or {stem}.pkl) for the {stem!r} split.")


def read_collm_splits(folder: os.PathLike | str, allow_pickle: bool = False) -> PresplitRecords:
    """Read the CoLLM/ThinkRec split tables (``train``/``valid``/``test``) and ``items`` if present.

    Columns: ``uid, iid, label, timestamp, his, his_title, title, flag, not_cold``; ``his``
    starts with the padding id 0. Parquet is read directly; the original pandas pickles only
    with ``allow_pickle=True``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"CoLLM split folder not found: {folder}")
    splits = {}
    for split, stem in COLLM_SPLIT_FILES.items():
        frame = _read_collm_file(folder, stem, allow_pickle)
        missing = [c for c in COLLM_COLUMNS if c not in frame.columns]
        if missing:
            raise DataFormatError(
                f"{folder}/{stem}: missing CoLLM column(s) {missing}; found {list(frame.columns)}."
            )
        frame["title"] = unescape_html(frame["title"].astype(str))
        if "his_title" in frame:
            frame["his_title"] = frame["his_title"].map(lambda titles: [unescape_text(str(title)) for title in titles])
        splits[split] = frame
    items_path = folder / "items.parquet"
    if items_path.is_file():
        raw = pd.read_parquet(items_path)
        items = pd.DataFrame(
            {
                "item": raw["iid"].astype("int64").astype(str),
                "title": unescape_html(raw["title"].fillna("").astype(str)),
                "genres": raw["genres"].fillna("").astype(str) if "genres" in raw else "",
                "description": raw["description"].fillna("").astype(str) if "description" in raw else "",
            }
        )
    else:
        # Without an item file, titles come from the split tables themselves.
        both = pd.concat([f[["iid", "title"]] for f in splits.values()], ignore_index=True)
        both = both.drop_duplicates("iid")
        items = pd.DataFrame(
            {"item": both["iid"].astype("int64").astype(str), "title": both["title"].astype(str), "genres": "", "description": ""}
        )
    return PresplitRecords(splits=splits, items=items, source=f"collm:{folder.name}")
