"""Command-line plumbing shared by every command: one way to read arguments, one way to stop on bad
input.

Arguments come as a `.json` file, as flags, or as a `.json` file followed by flags that override it:

    python run_thinkrec.py args.json
    python run_thinkrec.py --model_name_or_path smollm2 --records_dir data/ml-100k ...
    python run_thinkrec.py args.json --learning_rate 5e-4 --output_dir outputs/try2

Unknown keys in the file and unknown flags are errors, never ignored. Every value in the file must be
of its field's declared type (or of a wider one transformers accepts: `WIDER_TRAINING_TYPES`): JSON has
numbers, booleans and null, so nothing in it is converted. The file is strict JSON: `NaN` / `Infinity`
and a key given twice are errors naming the key.
"""

import dataclasses
import json
import logging
import os
import sys
import types
from enum import Enum
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

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
            values = json.load(handle, parse_constant=_NotJson, object_pairs_hook=_strict_object(argv[0]))
    except FileNotFoundError:
        raise InputError(f"{argv[0]}: no such arguments file.") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{argv[0]}: not valid JSON ({error}).") from None
    if not isinstance(values, dict):
        raise InputError(f"{argv[0]}: expected a JSON object of argument names and values, found {type(values).__name__}.")
    actions = {}
    for action in parser._actions:
        if action.dest != "help":
            # A True-default bool has two flags with one dest: --name and --no_name.
            actions.setdefault(action.dest, []).append(action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise InputError(f"{argv[0]}: unknown keys {unknown} (not an argument of {[t.__name__ for t in dataclass_types]}).")
    _check_types(argv[0], values, dataclass_types)
    if len(argv) == 1:
        return parser.parse_dict(values, allow_extra_keys=False)
    # Flags after the file: a flag overrides the file, and a required argument given in the file is no
    # longer required on the command line. The file's values are not made argparse defaults: argparse
    # runs string defaults through the flag's type (turning "all" into an error for a str-or-bool
    # field), and takes a dest's default from its first flag only (losing a `false` for --no_name).
    for name in values:
        for action in actions[name]:
            action.default = _FROM_FILE
            action.required = False
    namespace, remaining = parser.parse_known_args(argv[1:])
    if remaining:
        raise InputError(f"unknown arguments {remaining}.")
    given = {name: values[name] if value is _FROM_FILE else value for name, value in vars(namespace).items()}
    return parser.parse_dict(given, allow_extra_keys=False)


class _NotJson:
    """A `NaN`, `Infinity` or `-Infinity` that `json.load` read (Python's json accepts them; strict JSON has none)."""

    def __init__(self, text: str):
        self.text = text


def _not_json_in(value: Any) -> Optional[str]:
    """How the first `_NotJson` in `value` (a JSON value, lists searched) is written, or None."""
    if isinstance(value, _NotJson):
        return value.text
    if isinstance(value, list):
        return next((text for text in map(_not_json_in, value) if text is not None), None)
    return None  # an object's values were checked when it was read


def _strict_object(label: str) -> Callable[[list[tuple[str, Any]]], dict]:
    """`json.load`'s object_pairs_hook for the file `label`: a key given twice, or a value holding NaN /
    Infinity, is an `InputError` naming the key."""

    def build(pairs: list[tuple[str, Any]]) -> dict:
        values: dict = {}
        for key, value in pairs:
            if key in values:
                raise InputError(f"{label}: key {key!r} is given twice; a JSON object holds one value per key, so keep the "
                                 "one you mean.")
            constant = _not_json_in(value)
            if constant is not None:
                raise InputError(f"{label}: {key} holds {constant}, which is not JSON (strict JSON has no NaN or Infinity); "
                                 "write a number, or null where the field allows it.")
            values[key] = value
        return values

    return build


class _FromFile:
    """The default of a flag whose value the arguments file gives."""

    def __repr__(self) -> str:
        return "(from the file)"


_FROM_FILE = _FromFile()


def _parse_flags(parser: HfArgumentParser, argv: list[str]) -> tuple[Any, ...]:
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *instances, remaining = outputs
    if remaining:
        raise InputError(f"unknown arguments {remaining}.")
    return tuple(instances)


# TrainingArguments fields that accept more JSON values than their annotation says (transformers 5.24), each
# with the types added to it. `fsdp: str | None` also takes true (what a bare --fsdp gives) and a list of
# FSDP options such as ["full_shard", "auto_wrap"] (TrainingArguments._process_fsdp_args reads both);
# `debug: str | list[DebugOption]` also takes null (__post_init__ makes it []). The other dict / str fields
# (fsdp_config, deepspeed, accelerator_config, lr_scheduler_kwargs, ...) and report_to already declare all
# they accept.
WIDER_TRAINING_TYPES = {"fsdp": (bool, list[str]), "debug": (type(None),)}


def _is_training_arguments(dataclass_type: type) -> bool:
    """Whether `dataclass_type` is (a subclass of) transformers' TrainingArguments; its module is imported
    by then, and is not imported here for commands that have none (it costs seconds)."""
    module = sys.modules.get("transformers.training_args")
    return module is not None and issubclass(dataclass_type, module.TrainingArguments)


def _check_types(label: str, values: dict[str, Any], dataclass_types: Sequence[type]) -> None:
    """Raise an `InputError` naming `label` and the first of `values` (from a JSON file) that is not of its
    field's declared type (widened by `WIDER_TRAINING_TYPES`); types this cannot check precisely (Any, other
    classes) let any value through."""
    declared = {}
    for dataclass_type in dataclass_types:
        # Not Field.type: HfArgumentParser overwrites it with the one type its flag parses (Optional[int] -> int).
        hints = get_type_hints(dataclass_type)
        declared.update({item.name: hints[item.name] for item in dataclasses.fields(dataclass_type) if item.init})
        if _is_training_arguments(dataclass_type):
            declared.update({name: Union[(hints[name], *extra)] for name, extra in WIDER_TRAINING_TYPES.items()
                             if name in hints})
    for name, value in values.items():
        if _conforms(value, declared[name]) is False:
            raise InputError(f"{label}: {name} must be {_describe(declared[name])}, found {_found(value)}"
                             f"{_unquoted_hint(value, declared[name])}.")


def _conforms(value: Any, hint: Any) -> Optional[bool]:
    """Whether a JSON `value` is of type `hint`: True, False, or None when `hint` is not a type this checks."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        results = [_conforms(value, member) for member in _union_members(args)]
        return True if True in results else (None if None in results else False)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return any(type(value) is type(member.value) and value == member.value for member in hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = next((kind for kind in (list, dict) if hint is kind or origin is kind), None)
    if container is None:
        return None
    if not isinstance(value, container):
        return False
    # A JSON object's keys are always strings: only its values are checked.
    results = [_conforms(item, args[-1]) for item in (value if container is list else value.values())] if args else []
    return False if False in results else (None if None in results else True)


def _union_members(args: tuple) -> tuple:
    """The members of a Union a JSON value may match. In `Union[SomeEnum, str]` (TrainingArguments' strategies,
    optim...) the string is turned into the enum, so only the enum's values work."""
    if str in args and any(isinstance(member, type) and issubclass(member, Enum) for member in args):
        return tuple(member for member in args if member is not str)
    return args


_TYPE_NAMES = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"), float: ("a number", "numbers"),
               str: ("a string", "strings"), list: ("a list", "lists"), dict: ("an object", "objects")}


def _describe(hint: Any, plural: bool = False) -> str:
    """`hint` in the words of a JSON file: 'an integer or null', 'a list of strings', 'one of ["no", "steps"]'."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        members = _union_members(args)
        parts = []
        for member in members:
            if member is bool and not plural:
                parts += ["true", "false"]  # "a string, true or false", not "a string or true or false"
            elif member is not type(None):
                parts.append(_describe(member, plural))
        parts += ["null"] if type(None) in members else []
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    choices = list(args) if origin is Literal else None
    if isinstance(hint, type) and issubclass(hint, Enum):
        choices = [member.value for member in hint]
    if choices is not None:
        if len(choices) == 1:
            return json.dumps(choices[0], default=str)
        return ("values from " if plural else "one of ") + json.dumps(choices, default=str)
    if origin in (list, dict) and args:
        return f"{_TYPE_NAMES[origin][plural]} of {_describe(args[-1], plural=True)}"
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint][plural]
    return getattr(hint, "__name__", str(hint))


def _found(value: Any) -> str:
    """A JSON value as the file spells it: 'the string "16"', 'the number 16.7', 'null', 'true'."""
    text = json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 80 else text[:77] + "..."
    if value is None or isinstance(value, bool):
        return text
    kinds = ((str, "string"), ((int, float), "number"), (list, "list"), (dict, "object"))
    return f"the {next(kind for types_, kind in kinds if isinstance(value, types_))} {text}"


def _unquoted_hint(value: Any, hint: Any) -> str:
    """When a string would be of the declared type without its quotes ("16", "false", "1e-3"), say so."""
    if not isinstance(value, str):
        return ""
    for text in dict.fromkeys((value.strip(), value.strip().lower())):
        try:
            unquoted = json.loads(text, parse_constant=_NotJson)  # "NaN" is no number to write unquoted
        except json.JSONDecodeError:
            continue
        if _conforms(unquoted, hint):
            kinds = ("real lists and objects" if isinstance(unquoted, (list, dict))
                     else "a real null" if unquoted is None else "real numbers and booleans")
            return f" (JSON has {kinds}: write {text} without quotes)"
    return ""


def run_command(main: Callable[[Optional[list[str]]], Any], argv: Optional[list[str]] = None) -> None:
    """Run a command's `main`: bad input it recognises (an `InputError`) is printed as its one message
    and the process exits with status 2; anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except InputError as error:
        logging.getLogger(main.__module__).debug("input error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
