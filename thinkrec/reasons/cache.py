"""The teachers' answer cache: JSON lines, appended and fsynced one answer at a time, so that a rerun
asks only what is not there yet. Used by the remote teacher (reasons) and by item keyword extraction;
it imports nothing of the library, so both can use it."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional


logger = logging.getLogger(__name__)


class ReasonCache:
    """Append-only JSON-lines cache of teacher answers keyed by (UserID, TargetItemID) — or by other
    integer fields (`key_fields`, e.g. ("ItemID",) for item keywords). Each line is flushed and fsynced,
    so a crash loses at most the line being written; a torn last line is ignored and cut off before the
    next append."""

    def __init__(self, path: os.PathLike | str, model: str, key_fields: tuple[str, ...] = ("UserID", "TargetItemID")):
        self.path, self.model, self.key_fields = Path(path), model, tuple(key_fields)
        self._lock = threading.Lock()
        self.entries: dict[tuple[int, ...], str] = {}
        self.torn_lines = 0
        self._cut_at: Optional[int] = None  # byte length to truncate a torn tail to before appending
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        other_models = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = tuple(int(entry[name]) for name in self.key_fields)
                text = str(entry["text"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
                if number == len(lines):  # the last line: a write cut short by a crash
                    self.torn_lines += 1
                    self._cut_at = len(data) - len(line)
                    logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(line))
                    continue
                expected = ", ".join(f'"{name}"' for name in (*self.key_fields, "model", "text"))
                raise ValueError(f"{self.path} line {number}: not a cache entry ({error}); expected {{{expected}}}.") from error
            if entry.get("model") != self.model:
                other_models += 1
                continue
            self.entries[key] = text
        if other_models:
            logger.info("%s: %d entries from other models are not reused", self.path, other_models)

    def get(self, *key: int) -> Optional[str]:
        return self.entries.get(tuple(int(k) for k in key))

    def put(self, *key_and_text) -> None:
        *key, text = key_and_text
        if len(key) != len(self.key_fields):
            raise ValueError(f"{self.path}: a cache key is {self.key_fields}, got {tuple(key)}.")
        key = tuple(int(k) for k in key)
        line = json.dumps({**dict(zip(self.key_fields, key)), "model": self.model, "text": text}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._cut_at is not None:
                # Drop the torn tail so the new entry starts on a line of its own.
                os.truncate(self.path, self._cut_at)
                self._cut_at = None
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[key] = text


__all__ = ["ReasonCache"]
