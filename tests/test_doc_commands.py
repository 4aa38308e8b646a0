"""The commands in README.md and docs/*.md still run as written: every ```bash block is read, and each
command that names a script of the repository (`python X.py ...`, `.venv/bin/python X.py ...`,
`accelerate launch [options] X.py ...`, `python -m pytest tests/...`) or a `make` target is checked
against the repository: the script exists, each `--flag` appears in the script's own `--help`, each
`make` target is in the Makefile, and each argument file or example path it names exists.

Placeholders are allowed where a reader must supply their own: `...` is skipped, and `.json` files named
`my_*.json` are the reader's own arguments file. Each script's `--help` runs once (a subprocess with
HF_HUB_OFFLINE=1), in children forked from one interpreter that imports torch once.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", re.MULTILINE)
SEPARATORS = {"&&", "||", ";", "|"}
# Paths under these folders are part of the repository, so a command that names one needs it to exist.
REPOSITORY_FOLDERS = ("examples/", "accelerate_configs/", "templates/", "benchmarks/", "tests/")


@dataclass(frozen=True)
class Command:
    doc: str          # the file, relative to the repository root
    line: int         # first line of the command in that file
    tokens: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) of every ```bash fenced block."""
    blocks, current, language, start = [], None, None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence and current is None:
            current, language, start = [], fence.group(1), number + 1
        elif line.strip() == "```" and current is not None:
            if language in ("bash", "sh", "shell"):
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def block_commands(doc: str, start: int, lines: list[str]) -> list[Command]:
    """The simple commands of one block: `\\` continuations and quoted strings spanning lines are joined,
    comments dropped, and `&&` / `||` / `;` / `|` split a line into several commands."""
    commands, pending, pending_line = [], "", 0
    for offset, line in enumerate(lines):
        if not pending:
            pending_line = start + offset
        pending += line + "\n"
        if line.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # a quotation still open: the command goes on on the next line
            continue
        pending = ""
        current: list[str] = []
        for token in tokens + [";"]:
            if token in SEPARATORS:
                if current:
                    commands.append(Command(doc, pending_line, tuple(current)))
                current = []
            else:
                current.append(token)
    assert not pending.strip(), f"{doc}:{pending_line}: unterminated command {pending!r}"
    return commands


def doc_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        for start, lines in bash_blocks(path.read_text(encoding="utf-8")):
            commands.extend(block_commands(str(path.relative_to(REPO_ROOT)), start, lines))
    return commands


@dataclass(frozen=True)
class Invocation:
    """What a command asks of the repository."""
    script: str | None = None                 # a repository script, run with arguments
    arguments: tuple[str, ...] = ()
    launcher_arguments: tuple[str, ...] = ()  # accelerate launch's own options
    make_targets: tuple[str, ...] = ()
    test_paths: tuple[str, ...] = ()


def is_python(token: str) -> bool:
    return Path(token).name in ("python", "python3") or re.fullmatch(r"python3\.\d+", Path(token).name) is not None


def invocation(tokens: tuple[str, ...]) -> Invocation | None:
    """The script / make targets / test paths a command names, or None for any other command (pip, cd, ...)."""
    tokens = list(tokens)
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens.pop(0)
    if not tokens:
        return None
    head, rest = tokens[0], tokens[1:]
    if head == "make":
        return Invocation(make_targets=tuple(t for t in rest if not t.startswith("-") and "=" not in t))
    if is_python(head):
        if not rest or rest[0] == "-c":
            return None
        if rest[0] == "-m":
            if rest[1:2] == ["pytest"]:
                return Invocation(test_paths=tuple(t for t in rest[2:] if not t.startswith("-")))
            return None
        return Invocation(script=rest[0], arguments=tuple(rest[1:]))
    if Path(head).name == "accelerate" and rest[:1] == ["launch"]:
        for index, token in enumerate(rest[1:], start=1):
            if token.endswith(".py"):
                return Invocation(script=token, arguments=tuple(rest[index + 1:]), launcher_arguments=tuple(rest[1:index]))
        return Invocation(script="", launcher_arguments=tuple(rest[1:]))
    return None


# Runs each script's `--help` in a child forked from one interpreter that has imported the heavy
# libraries once (torch, transformers, peft, datasets, accelerate): one torch import instead of one
# per script. Each child runs the script as `python SCRIPT --help` would (`__main__`, its folder first on
# sys.path) with its output sent to a file; the exit status is the script's.
HELP_SERVER = r"""
import json, os, runpy, sys, tempfile
import torch, transformers, peft, datasets, accelerate  # noqa: F401 (imported once, shared by the children)
results = {}
for script in sys.argv[1:]:
    with tempfile.TemporaryFile(mode="w+") as out:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.argv = [script, "--help"]
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            code = 0
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        results[script] = [os.waitstatus_to_exitcode(status), out.read()]
print(json.dumps(results))
"""


@functools.lru_cache(maxsize=None)
def help_texts() -> dict[str, tuple[int, str]]:
    """`--help` of every existing script the docs name, run once each."""
    scripts = sorted({inv.script for command in doc_commands() if (inv := invocation(command.tokens)) and inv.script
                      and (REPO_ROOT / inv.script).is_file()})
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run([sys.executable, "-c", HELP_SERVER, *scripts], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, f"the --help runner failed:\n{completed.stderr[-3000:]}"
    return {script: (code, text) for script, (code, text) in json.loads(completed.stdout.splitlines()[-1]).items()}


def flags_of(script: str) -> set[str]:
    returncode, text = help_texts()[script]
    assert returncode == 0, f"{script} --help exited with {returncode}:\n{text[-2000:]}"
    return set(FLAG.findall(text))


@functools.lru_cache(maxsize=None)
def make_targets() -> set[str]:
    return set(MAKE_TARGET.findall((REPO_ROOT / "Makefile").read_text(encoding="utf-8")))


def is_placeholder(token: str) -> bool:
    return token == "..." or Path(token).name.startswith("my_")


def named_paths(arguments: tuple[str, ...]) -> list[str]:
    """Arguments that name a file of the repository: argument files (.json / .yaml) and paths under its
    folders. A value given to an output flag (`--output_dir`, `--output_json`) is written, not read."""
    paths, previous = [], ""
    for token in arguments:
        output_value = previous.startswith("--") and "output" in previous
        previous = token
        if token.startswith("-") or output_value or is_placeholder(token) or "://" in token:
            continue
        if token.endswith((".json", ".yaml", ".yml")) or token.startswith(REPOSITORY_FOLDERS):
            paths.append(token)
    return paths


def problems(command: Command, flags_of=flags_of) -> list[str]:
    """What in `command` does not exist in the repository (empty when it runs as written)."""
    inv = invocation(command.tokens)
    if inv is None:
        return []
    found = [f"make target {target!r} is not in the Makefile" for target in inv.make_targets if target not in make_targets()]
    for pattern in inv.test_paths:
        if not glob.glob(str(REPO_ROOT / pattern.split("::")[0])):
            found.append(f"test path {pattern!r} does not exist")
    if inv.script is None:
        return found
    if not inv.script or not (REPO_ROOT / inv.script).is_file():
        return found + [f"script {inv.script or '(none given to accelerate launch)'!r} does not exist"]
    known = flags_of(inv.script)
    for token in inv.arguments:
        if token.startswith("--") and not is_placeholder(token):
            flag = token.split("=", 1)[0]
            if flag not in known:
                found.append(f"{inv.script} has no flag {flag} (not in its --help)")
    for path in named_paths(inv.launcher_arguments) + named_paths(inv.arguments):
        if not (REPO_ROOT / path).exists():
            found.append(f"{path} does not exist")
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_commands_of_the_repository():
    named = [c for c in COMMANDS if invocation(c.tokens) is not None]
    assert len(named) >= 40, f"only {len(named)} repository commands found in the docs' bash blocks"
    assert any(c.doc == "README.md" and c.tokens == ("make", "test") for c in COMMANDS), \
        "README.md must state `make test` (the command .ci/run runs) in a bash block"
    assert any(c.doc == "README.md" and c.tokens == ("make", "quickstart") for c in COMMANDS)


@pytest.mark.parametrize("path", [p for p in DOC_FILES if p.parent.name == "docs"], ids=lambda p: p.name)
def test_every_docs_page_starts_with_its_command(path):
    text = path.read_text(encoding="utf-8")
    first_fence = next((m.group(1) for line in text.splitlines() if (m := FENCE.match(line.strip()))), None)
    assert first_fence == "bash", f"docs/{path.name}: the first code block should be the ```bash command the page is about"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if invocation(c.tokens) is not None], ids=str)
def test_a_doc_command_runs_as_written(command):
    found = problems(command)
    assert not found, f"{command}: " + "; ".join(found)


def test_the_checker_reads_continuations_comments_and_chains():
    lines = ["make quickstart    # once", "python recommend.py --model_dir A \\", "    --top_k 5 --reasons && make test",
             'python -c "', "print(1)", '"']
    commands = block_commands("x.md", 10, lines)
    assert [c.tokens for c in commands] == [("make", "quickstart"),
                                           ("python", "recommend.py", "--model_dir", "A", "--top_k", "5", "--reasons"),
                                           ("make", "test"), ("python", "-c", "\nprint(1)\n")]
    assert [c.line for c in commands] == [10, 11, 11, 13]


def test_the_checker_names_a_drifted_flag_a_missing_script_target_and_file():
    def fake_flags(script):
        return {"--records_dir", "--method"}

    def check(text):
        return problems(Command("docs/x.md", 3, tuple(shlex.split(text))), flags_of=fake_flags)

    assert check("python extract_keywords.py --records_dir DIR --method tfidf") == []
    assert check("HF_HUB_OFFLINE=1 .venv/bin/python extract_keywords.py --records_dir DIR --methd tfidf") == \
        ["extract_keywords.py has no flag --methd (not in its --help)"]
    assert check("accelerate launch --config_file accelerate_configs/none.yaml run_thinkrec.py examples/none.json") == \
        ["accelerate_configs/none.yaml does not exist", "examples/none.json does not exist"]
    assert check("python no_such_script.py --x 1") == ["script 'no_such_script.py' does not exist"]
    assert check("make quickstart no_such_target") == ["make target 'no_such_target' is not in the Makefile"]
    assert check("python -m pytest -q tests/test_no_such_file.py") == ["test path 'tests/test_no_such_file.py' does not exist"]
    assert check("python extract_keywords.py my_args.json --records_dir DIR ...") == []
