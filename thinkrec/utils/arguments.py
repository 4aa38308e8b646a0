"""Command-line plumbing shared by every command: one way to read arguments, one way to stop on bad
input.

Arguments come as a `.json` file, as flags, or as a `.json` file followed by flags that override it:

    python run_thinkrec.py args.json
    python run_thinkrec.py --model_name_or_path smollm2 --records_dir data/ml-100k ...
    python run_thinkrec.py args.json --learning_rate 5e-4 --output_dir outputs/try2

Unknown keys in the file and unknown flags are errors, never ignored.
"""

import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from transformers import HfArgumentParser

from thinkrec.utils.errors import InputError


def parse_args(dataclass_types: Sequence[type], argv: Optional[list[str]] = None) -> tuple[Any, ...]:
    """Instances of `dataclass_types` from `argv` (default `sys.argv[1:]`): a `.json` file, flags, or a
    `.json` file first and flags after it (flags win)."""
    parser = HfArgumentParser(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".json"):
        return _parse_flags(parser, argv)
    path = os.path.abspath(argv[0])
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{argv[0]}: no such arguments file.") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{argv[0]}: not valid JSON ({error}).") from None
    if not isinstance(values, dict):
        raise InputError(f"{argv[0]}: expected a JSON object of argument names and values, found {type(values).__name__}.")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise InputError(f"{argv[0]}: unknown keys {unknown} (not an argument of {[t.__name__ for t in dataclass_types]}).")
    if len(argv) == 1:
        return parser.parse_dict(values, allow_extra_keys=False)
    # Flags after the file: the file's values become the parser's defaults, so a flag overrides them
    # and a required argument given in the file is no longer required on the command line.
    for name, value in values.items():
        actions[name].default = value
        actions[name].required = False
    return _parse_flags(parser, argv[1:])


def _parse_flags(parser: HfArgumentParser, argv: list[str]) -> tuple[Any, ...]:
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *instances, remaining = outputs
    if remaining:
        raise InputError(f"unknown arguments {remaining}.")
    return tuple(instances)


def run_command(main: Callable[[Optional[list[str]]], Any], argv: Optional[list[str]] = None) -> None:
    """Run a command's `main`: bad input it recognises (an `InputError`) is printed as its one message
    and the process exits with status 2; anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except InputError as error:
        logging.getLogger(main.__module__).debug("input error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
