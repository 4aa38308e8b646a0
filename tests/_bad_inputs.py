"""What every bad-input case checks besides its own outcome: the user's input files are byte-identical
afterwards, and the command left no half-written output (temporary files, staging folders, a folder
that names files it does not hold)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

from thinkrec.utils.arguments import run_command


REPO_ROOT = Path(__file__).resolve().parents[1]
# Names the project's atomic writers give their temporary files and staging folders.
TEMPORARY_MARKERS = (".tmp", ".staging-", ".partial")


def file_hashes(paths: Iterable[os.PathLike | str]) -> dict[str, str]:
    """sha256 of every file in `paths` (files, or folders walked recursively)."""
    hashes = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            hashes[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def assert_inputs_unchanged(before: dict[str, str]) -> None:
    """Every file hashed in `before` still exists with the same bytes."""
    missing = [path for path in before if not os.path.isfile(path)]
    assert not missing, f"input files were deleted: {missing}"
    changed = [path for path, digest in before.items() if file_hashes([path])[path] != digest]
    assert not changed, f"input files were modified: {changed}"


def leftovers(directory: os.PathLike | str) -> list[str]:
    """Temporary files or staging folders anywhere under `directory` (none after a command ends)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if any(marker in p.name for marker in TEMPORARY_MARKERS))


@dataclass
class Outcome:
    """How a command ended: its exit status (0 when `main` returned) and what it printed to stderr."""

    code: int
    stderr: str
    value: object = None


def run_main(main: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> Outcome:
    """Run a command's `main` through `run_command`, as its `__main__` block does (an input error is one
    line on stderr and exit 2; a bug keeps its traceback and fails the test)."""
    capsys.readouterr()
    result = {}

    def call(args):
        result["value"] = main(args)

    try:
        run_command(call, argv)
        code = 0
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    return Outcome(code, capsys.readouterr().err, result.get("value"))


def assert_one_line_error(outcome: Outcome, *needles: str) -> None:
    """The command stopped with exit 2 and one `error: ...` line that names every one of `needles`."""
    assert outcome.code == 2, f"expected exit 2, got {outcome.code}; stderr: {outcome.stderr[-2000:]}"
    lines = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one 'error:' line, got: {outcome.stderr[-2000:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def run_script(script: str, args: list[str], cwd: Optional[os.PathLike] = None, timeout: float = 600,
               env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """A repository command in its own interpreter (for signals and concurrency cases)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=cwd or REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)
