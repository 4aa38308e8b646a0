"""Atomic writes: readers see the old file (or folder) or the whole new one, never half of it. Also what a
folder's runs own (a manifest) and who is writing it now (a lock)."""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from thinkrec.utils.errors import ExistingOutputError, InputError


def cache_root() -> Path:
    """`$THINKREC_CACHE`, else `~/.cache/thinkrec`."""
    return Path(os.environ.get("THINKREC_CACHE") or Path.home() / ".cache" / "thinkrec")


@contextlib.contextmanager
def _temporary_file(directory: Path, name: str) -> Iterator[str]:
    """A temporary file in `directory` (so a rename into place is atomic), removed unless renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    follow_umask(temp)
    try:
        yield temp
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by `mkstemp` / `mkdtemp` (0600 / 0700) the mode the user's
    umask asks for, as `open` and `mkdir` would: a shared output folder stays readable to its group."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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


def strict_json(payload: Any) -> Any:
    """`payload` with every NaN or infinite float (numpy's too) as None, so strict JSON readers accept it."""
    if isinstance(payload, dict):
        return {key: strict_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [strict_json(value) for value in payload]
    if isinstance(payload, float) or type(payload).__module__ == "numpy" and hasattr(payload, "dtype") and payload.dtype.kind == "f":
        value = float(payload)
        return value if math.isfinite(value) else None
    return payload


def json_text(payload: Any, indent: Optional[int] = 2, sort_keys: bool = False) -> str:
    """Strict JSON (no `NaN` literals: missing values are null) of `payload`."""
    return json.dumps(strict_json(payload), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(payload: Any, path: str | os.PathLike, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `payload` as UTF-8 strict JSON (NaN as null) with a final newline, atomically."""
    text = json_text(payload, indent=indent, sort_keys=sort_keys)
    atomic_write(path, lambda temp: Path(temp).write_text(text + "\n", encoding="utf-8"))


def publish_folder(build: Callable[[Path], None], target: str | os.PathLike) -> Path:
    """Build a folder via `build(staging_dir)` and rename it into place; an existing `target` is kept
    as it is (parallel runs share caches: the first to finish wins, the others discard theirs)."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    follow_umask(staging, directory=True)
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


# ------------------------------------------------------------------------------ what a folder's runs own

MANIFEST_NAME = ".thinkrec_manifest.json"
LOCK_NAME = ".thinkrec.lock"


class Manifest:
    """The files the project's commands wrote into a folder (paths relative to it), kept in
    `.thinkrec_manifest.json`. A command removes only files listed here, never a file it did not write;
    each file is recorded as soon as it is written, so a run stopped half-way still owns what it left."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / MANIFEST_NAME
        self.files: set[str] = set()
        self.state = "complete"
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise InputError(f"{self.path}: not valid JSON ({error}); it lists the files this project wrote into "
                                 f"{self.directory}. Remove it only if that folder holds nothing of yours.") from None
            self.files = set(saved.get("files", []))
            self.state = saved.get("state", "complete")

    def save(self, state: Optional[str] = None) -> None:
        self.state = state or self.state
        write_json({"files": sorted(self.files), "state": self.state, "command": Path(sys.argv[0]).name,
                    "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, self.path)

    def add(self, *names: str, state: Optional[str] = None) -> None:
        """Record `names` (paths relative to the folder) as written by the project."""
        self.files.update(Path(name).as_posix() for name in names)
        self.save(state)

    def remove_except(self, keep: Iterable[str], only: Callable[[str], bool] = lambda name: True) -> list[str]:
        """Delete the recorded files (or folders) that `only` selects and `keep` (names relative to the folder)
        does not name; returns them. Nothing that the manifest does not list is touched."""
        keep = {Path(name).as_posix() for name in keep}
        removed = []
        for name in sorted(self.files):
            if name in keep or not only(name):
                continue
            target = self.directory / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            self.files.discard(name)
            removed.append(name)
        if removed:
            self.save()
        return removed


def check_not_inside(output_dir: str | os.PathLike, inputs: Iterable[Optional[str | os.PathLike]], what: str = "output_dir") -> None:
    """Stop when `output_dir` is, or holds, one of the command's inputs: a run replaces what it finds there."""
    output = Path(output_dir).resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given).resolve()
        if path == output or output in path.parents:
            raise InputError(f"{what}={output_dir} holds the input {given}: a run replaces what it wrote there, so keep "
                             f"inputs outside it (choose another {what}, or move the input).")


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold `directory` for one run: a second run on it stops with a message naming the first. The lock is
    an OS file lock, released when its process ends however it ends, so a crashed run never leaves it stuck.
    A folder this call created is removed again when the run fails before writing anything into it."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ExistingOutputError(f"{directory} is in use by another run ({holder}); wait for it to finish or choose "
                                      "another output folder.") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(f"{purpose}, pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        try:
            yield directory
        except BaseException:
            if created and {entry.name for entry in directory.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(directory, ignore_errors=True)
            raise
    finally:
        handle.close()
