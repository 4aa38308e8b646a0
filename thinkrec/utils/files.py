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
    """The process umask, read from /proc where it is there (setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
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
    """The files the project's commands wrote into a folder (paths relative to it), each with the command
    kind that wrote it (`owner`), kept in `.thinkrec_manifest.json`. A command removes only files listed
    here under its own owner, never a file it did not write nor another command's output; each file is
    recorded right after it is written, so a run stopped half-way still owns what it left (a kill between
    the write and the record leaves one file unowned, which is then kept, never removed)."""

    def __init__(self, directory: str | os.PathLike, owner: str):
        self.directory = Path(directory)
        self.owner = owner
        self.path = self.directory / MANIFEST_NAME
        self.files: dict[str, str] = {}
        self.state = "complete"
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
                files = saved["files"]
                if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
                    raise TypeError(f"files is a {type(files).__name__}")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise InputError(f"{self.path}: not a manifest of this project ({error!r}); it lists the files the project "
                                 f"wrote into {self.directory}. Remove it only if that folder holds nothing of yours.") from None
            self.files = dict(files)
            self.state = saved.get("state", "complete")

    def refuse_others(self) -> "Manifest":
        """Stop when the folder holds another command's output: a folder is one command's (a model's card and
        a dataset card are both README.md, and neither may replace the other)."""
        others = sorted((owner, name) for name, owner in self.files.items() if owner != self.owner)
        if others:
            owner, name = others[0]
            raise ExistingOutputError(f"{self.directory} holds the output of another command ({owner}: {name} and "
                                      f"{len(others) - 1} more); write into a folder of its own.")
        return self

    def owned(self) -> set[str]:
        """The names recorded under this manifest's owner."""
        return {name for name, owner in self.files.items() if owner == self.owner}

    def save(self, state: Optional[str] = None) -> None:
        self.state = state or self.state
        write_json({"files": dict(sorted(self.files.items())), "state": self.state}, self.path)

    def add(self, *names: str, state: Optional[str] = None) -> None:
        """Record `names` (paths relative to the folder) as written by this owner."""
        for name in names:
            self.files[self._checked(name)] = self.owner
        self.save(state)

    def _checked(self, name: str) -> str:
        """`name` as a relative path strictly inside the folder (never `.`, `..`, absolute or escaping it)."""
        path = Path(name)
        inside = (self.directory / path).resolve()
        if path.is_absolute() or ".." in path.parts or not path.parts or path.as_posix() == "." \
                or self.directory.resolve() not in inside.parents:
            raise InputError(f"{self.path}: {name!r} is not a path inside {self.directory}; the manifest names only the "
                             "files a command wrote into the folder.")
        return path.as_posix()

    def remove_except(self, keep: Iterable[str], only: Callable[[str], bool] = lambda name: True) -> list[str]:
        """Delete this owner's recorded files (or folders) that `only` selects and `keep` (names relative to
        the folder) does not name; returns them. Nothing the manifest does not list under this owner is touched."""
        keep = {Path(name).as_posix() for name in keep}
        removed = []
        for name in sorted(self.owned()):
            if name in keep or not only(name):
                continue
            target = self.directory / self._checked(name)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            del self.files[name]
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
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot open the folder's lock file ({error.strerror}); the folder must be writable "
                         "by whoever runs in it.") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise InputError(f"{directory}: its file system does not support file locks ({error.strerror}), so a second "
                                 "run on the folder could not be stopped; choose an output folder on a local disk.") from None
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
