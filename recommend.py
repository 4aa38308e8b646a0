#!/usr/bin/env python
"""Rank candidate items for one user with a trained ThinkRec folder: the top-k by P(Yes), and optionally a
generated reason for each (its verdict is its score's).

    python recommend.py --model_dir outputs/quickstart/stage2_projector --user examples/recommend/user.jsonl \\
        --candidates examples/recommend/candidates.txt --items outputs/quickstart/records --top_k 5 --reasons
    python recommend.py recommend.json          # or a .json file of the arguments (flags after it override it)

--user is a JSON file holding one user record (or a .jsonl file of one line): UserID, HisItemIDs,
HisItemTitles (oldest first), optional HisItemLabels (1 liked, 0 disliked); ids are those of the prepared
records. --candidates is a `.json` file
(a JSON list) or a `.jsonl` file (one JSON value a line) of candidates, each an object with TargetItemID and
TargetItemTitle or a bare item id; any other file holds one integer item id a line. Bare ids need --items:
a prepared records folder (prepare_data.py output: its item table) or an item table file (.parquet or
.jsonl with ItemID and title). When the prompts show keywords, --items also gives them (the table's
`keywords` column, extract_keywords.py) to the candidates and to the user's history.

Prints a table (rank, item id, P(Yes), title, reason); the last line is one JSON object with the same.
Ties in score keep the candidates' order. Bad input (a candidate not in the item table or without a title,
a candidate listed twice, an empty list, top_k < 1 or over the number of candidates, ids outside the
model's collaborative tables) stops with one line naming the user or item, exit status 2. See
docs/recommend.md.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from data_collator import input_errors
from thinkrec.data.keywords import item_keywords
from thinkrec.data.records import check_same_records, load_items, read_metadata
from thinkrec.training.loading import DTYPE_CHOICES, inference_device_map, load_checkpoint, load_kwargs, load_processor
from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import json_text


@dataclass
class RecommendArguments:
    """Which model, which user, which candidates."""

    model_dir: str = field(metadata={"help": "A trained ThinkRec folder (run_thinkrec.py output_dir or a checkpoint in it) or a Hub id."})
    user: str = field(metadata={"help": "A JSON file with one user record (or a .jsonl file of one line): UserID, HisItemIDs, "
                                        "HisItemTitles (oldest first), optional HisItemLabels; no target."})
    candidates: str = field(metadata={"help": "Candidates: .json (a JSON list) or .jsonl (one a line) of objects with TargetItemID "
                                              "and TargetItemTitle, or of item ids; any other file: one integer item id a line."})
    items: Optional[str] = field(
        default=None,
        metadata={"help": "Item table for bare candidate ids (and keywords): a prepared records folder, or a .parquet / .jsonl "
                  "file with ItemID and title (and keywords). With it, every candidate must be in it."},
    )
    top_k: int = field(default=10, metadata={"help": "How many items to return, at most the number of candidates."})
    reasons: bool = field(default=False, metadata={"help": "Generate a reason for each of the top-k (slower: one generation each)."})
    batch_size: int = field(default=32, metadata={"help": "Candidates per scoring batch (one shared user prefix each) and "
                                                          "reasons per generation batch."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated reason, in tokens."})
    verdict_threshold: float = field(default=0.5, metadata={"help": "A reason's verdict is 'Yes.' when P(Yes) >= this, else 'No.'."})
    dtype: str = field(default="auto", metadata={"help": f"Model weights: one of {list(DTYPE_CHOICES)} (auto = bfloat16 on a GPU "
                                                         "that supports it, float32 on CPU)."})

    def __post_init__(self):
        if self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 < self.verdict_threshold < 1:
            raise InputError(f"verdict_threshold must be in (0, 1), got {self.verdict_threshold}.")
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}.")


# ------------------------------------------------------------------------------------------ inputs


def _read_text(path: str, field_name: str) -> str:
    if not os.path.isfile(path):
        raise MissingInputError(f"{field_name}={path}: no such file.")
    return Path(path).read_text(encoding="utf-8")


def _json_value(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error}).") from None


def read_user(path: str) -> dict:
    """The user record of a file: one JSON object (a `.jsonl` file: its one line)."""
    text = _read_text(path, "user")
    if path.endswith(".jsonl"):
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if len(lines) != 1:
            raise InputError(f"{path}: holds {len(lines)} records; --user takes one user record (one line).")
        user = _json_value(lines[0][1], f"{path} line {lines[0][0]}")
    else:
        user = _json_value(text, path)
    if not isinstance(user, dict):
        raise InputError(f"{path}: expected one JSON object (a user record with UserID, HisItemIDs, HisItemTitles), "
                         f"found a {type(user).__name__}.")
    return user


def read_candidates(path: str) -> list:
    """Candidates of a .json list, a .jsonl file (one value a line) or a file of one integer id a line;
    blank lines hold no candidate."""
    text = _read_text(path, "candidates")
    if path.endswith(".json"):
        candidates = _json_value(text, path)
        if not isinstance(candidates, list):
            raise InputError(f"{path}: expected a JSON list of candidates (objects with TargetItemID and TargetItemTitle, or "
                             f"item ids), found a {type(candidates).__name__}.")
        return candidates
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if path.endswith(".jsonl"):
        return [_json_value(line, f"{path} line {number}") for number, line in lines]
    candidates = []
    for number, line in lines:
        try:
            candidates.append(int(line))
        except ValueError:
            raise InputError(f"{path} line {number}: {line!r} is not an item id; this file holds one integer id a line "
                             "(write candidate objects to a .json or .jsonl file).") from None
    return candidates


def read_items(path: str) -> pd.DataFrame:
    """An item table: a prepared records folder's, or a .parquet / .jsonl file with ItemID and title."""
    if os.path.isdir(path):
        items = load_items(path)
    elif not os.path.isfile(path):
        raise MissingInputError(f"items={path}: no such file or folder.")
    elif path.endswith(".parquet"):
        items = pd.read_parquet(path)
    elif path.endswith(".jsonl"):
        items = pd.read_json(path, lines=True, dtype=False)
    else:
        raise InputError(f"items={path}: expected a prepared records folder, or a .parquet or .jsonl item table.")
    missing = [name for name in ("ItemID", "title") if name not in items]
    if missing:
        raise InputError(f"items={path}: the item table has no {missing} column; found {list(items.columns)}.")
    repeated = items["ItemID"][items["ItemID"].duplicated()]
    if len(repeated):
        raise InputError(f"items={path}: item {int(repeated.iloc[0])} is listed {int((items['ItemID'] == repeated.iloc[0]).sum())} "
                         "times; an item table holds each id once.")
    return items


def item_fields(items: pd.DataFrame, keywords: Optional[dict[int, list[str]]]) -> dict[int, dict]:
    """{item id: the candidate fields it gives}: its title, and its keywords when the prompts show them."""
    table = {}
    for item_id, title in zip(items["ItemID"], items["title"]):
        fields = {"TargetItemTitle": title if isinstance(title, str) else None}
        if keywords is not None:
            fields["TargetItemKeywords"] = keywords.get(int(item_id), [])
        table[int(item_id)] = fields
    return table


# ------------------------------------------------------------------------------------------ output


def format_table(recommendations: list, title: str) -> str:
    """The top-k as a text table, one item a line; a reason, if any, last on its line."""
    with_reasons = any(item.reason is not None for item in recommendations)
    width = max([len("title"), *(len(item.title) for item in recommendations)])
    header = f"{'rank':>4}  {'item id':>8}  {'P(Yes)':>6}  {'title':<{width}}" + ("  reason" if with_reasons else "")
    rows = []
    for item in recommendations:
        line = f"{item.rank:>4}  {item.item_id:>8}  {item.score:>6.4f}  {item.title:<{width}}"
        if with_reasons:
            line += "  " + " ".join((item.reason or "").split())
        rows.append(line.rstrip())
    header = header.rstrip()
    return "\n".join([title, header, "-" * max(len(line) for line in [header, *rows]), *rows])


def main(argv: Optional[list[str]] = None) -> dict:
    (args,) = parse_args((RecommendArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    # Inputs and the processor first: bad input stops before the model loads.
    user, candidates = read_user(args.user), read_candidates(args.candidates)
    processor = load_processor(args.model_dir, "model_dir")
    items = None
    if args.items is not None:
        table = read_items(args.items)
        keywords = item_keywords(table, f"items={args.items}") if processor.needs_keywords else None
        items = item_fields(table, keywords)
        if keywords is not None and "HisItemKeywords" not in user and isinstance(user.get("HisItemIDs"), list):
            user["HisItemKeywords"] = [keywords.get(int(item_id), []) for item_id in user["HisItemIDs"]]
    with input_errors():
        processor.recommendation_records(user, candidates, args.top_k, items)

    model, _ = load_checkpoint(args.model_dir, "model_dir", **load_kwargs(args.dtype, device_map=inference_device_map()))
    model.eval()
    if args.items is not None and os.path.isdir(args.items) and model.config.cf_model_type != "none":
        check_same_records(model.config.cf_records_fingerprint, model.config.cf_records_dir,
                           f"the collaborative tables of model_dir={args.model_dir}", args.items, read_metadata(args.items))
    with input_errors():
        top = processor.recommend(model, user, candidates, top_k=args.top_k, reasons=args.reasons, items=items,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  threshold=args.verdict_threshold)

    print(format_table(top, f"top {len(top)} of {len(candidates)} candidates for user {user['UserID']} ({args.model_dir})"))
    result = {"model_dir": args.model_dir, "user": user["UserID"], "candidates": len(candidates),
              "recommendations": [asdict(item) for item in top]}
    print(json_text(result, indent=None))
    return result


if __name__ == "__main__":
    run_command(main)
