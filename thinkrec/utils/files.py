"""Atomic writes: readers see the old file (or folder) or the whole new one, never half of it."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_root() -> Path:
    """`$THINKREC_CACHE`, else `~/.cache/thinkrec`."""
    return Path(os.environ.get("THINKREC_CACHE") or Path.home() / ".cache" / "thinkrec")


@contextlib.contextmanager
def _temporary_file(directory: Path, name: str) -> Iterator[str]:
    """A temporary file in `directory` (so a rename into place is atomic), removed unless renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        yield temp
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(temp_path)` on a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    with _temporary_file(path.parent, path.name) as temp:
        write(temp)
        os.replace(temp, path)


def atomic_write_named_by_content(directory: str | os.PathLike, stem: str, suffix: str, write: Callable[[str], None]) -> str:
    """Like `atomic_write`, but the file is named `<stem>-<sha256[:12]><suffix>` after what was written;
    returns that name."""
    directory = Path(directory)
    with _temporary_file(directory, stem) as temp:
        write(temp)
        digest = hashlib.sha256()
        with open(temp, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        name = f"{stem}-{digest.hexdigest()[:12]}{suffix}"
        os.replace(temp, directory / name)
    return name


def write_json(payload: Any, path: str | os.PathLike, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `payload` as UTF-8 JSON with a final newline, atomically."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys)
    atomic_write(path, lambda temp: Path(temp).write_text(text + "\n", encoding="utf-8"))


def publish_folder(build: Callable[[Path], None], target: str | os.PathLike) -> Path:
    """Build a folder via `build(staging_dir)` and rename it into place; an existing `target` is kept
    as it is (parallel runs share caches: the first to finish wins, the others discard theirs)."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
    except BaseException:
        # A failed build must not leave a half-written folder behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
