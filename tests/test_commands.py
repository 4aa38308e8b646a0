"""The plumbing every command shares: arguments from a `.json` file, flags, or both; bad input printed
as one message with a non-zero exit; the library importable without `sys.path` edits."""

import glob
import json
import os
import subprocess
import sys
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest

from thinkrec.utils.arguments import parse_args, run_command
from thinkrec.utils.errors import InputError


REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class First:
    records_dir: str = field(metadata={"help": "required"})
    rows: int = 10
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Second:
    learning_rate: float = 1e-4
    shuffle: bool = False


def write(tmp_path, payload) -> str:
    path = tmp_path / "args.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_a_json_file_alone(tmp_path):
    first, second = parse_args((First, Second), [write(tmp_path, {"records_dir": "d", "rows": 3, "shuffle": True})])
    assert (first.records_dir, first.rows, first.names, second.shuffle) == ("d", 3, ["a"], True)


def test_flags_after_a_json_file_override_it(tmp_path):
    path = write(tmp_path, {"records_dir": "d", "rows": 3, "learning_rate": 0.5, "names": ["x", "y"]})
    first, second = parse_args((First, Second), [path, "--rows", "7", "--shuffle", "true"])
    # The flags win; what they do not name keeps the file's value (a required one included).
    assert (first.records_dir, first.rows, first.names) == ("d", 7, ["x", "y"])
    assert (second.learning_rate, second.shuffle) == (0.5, True)


def test_flags_alone(tmp_path):
    first, second = parse_args((First, Second), ["--records_dir", "d", "--learning_rate", "0.1"])
    assert (first.records_dir, second.learning_rate) == ("d", 0.1)


def test_unknown_keys_and_flags_are_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown keys \['epochs'\]"):
        parse_args((First, Second), [write(tmp_path, {"records_dir": "d", "epochs": 3})])
    with pytest.raises(InputError, match=r"unknown arguments \['--epochs', '3'\]"):
        parse_args((First, Second), [write(tmp_path, {"records_dir": "d"}), "--epochs", "3"])
    with pytest.raises(InputError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{records_dir: d}")
        parse_args((First, Second), [str(tmp_path / "bad.json")])
    with pytest.raises(InputError, match="no such arguments file"):
        parse_args((First, Second), [str(tmp_path / "missing.json")])


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Typed:
    count: Optional[int] = None
    ratio: float = 0.5
    colour: Union[Colour, str] = "red"
    layers: Optional[list[int]] = None
    options: Union[dict, str, None] = None
    choice: Literal["a", "b"] = "a"
    space: Union[str, None, Literal[False]] = None
    anything: Any = None


GOOD_VALUES = [
    ("int-for-a-float", {"ratio": 1}), ("null-for-optional", {"count": None, "layers": None}), ("enum-value", {"colour": "blue"}),
    ("list-of-ints", {"layers": [-1, 2]}), ("dict-or-str", {"options": {"a": 1}}), ("str-or-dict", {"options": "{}"}),
    ("literal", {"choice": "b"}), ("literal-false", {"space": False}), ("any", {"anything": [1, "x"]}),
]


@pytest.mark.parametrize("with_flags", [False, True], ids=["file-alone", "file-then-flags"])
@pytest.mark.parametrize("values", [values for _, values in GOOD_VALUES], ids=[name for name, _ in GOOD_VALUES])
def test_values_of_the_declared_type_pass_unchanged(values, with_flags, tmp_path):
    flags = ["--rows", "2"] if with_flags else []
    first, typed = parse_args((First, Typed), [write(tmp_path, {"records_dir": "d", **values}), *flags])
    assert {name: getattr(typed, name) for name in values} == values


BAD_VALUES = [
    ("string-for-an-int", {"rows": "16"}, 'rows must be an integer, found the string "16" (JSON has real numbers and booleans: write 16 without'),
    ("string-for-a-bool", {"shuffle": "false"}, 'shuffle must be true or false, found the string "false" (JSON has real numbers and booleans: write false'),
    ("word-for-a-float", {"learning_rate": "fast"}, 'learning_rate must be a number, found the string "fast".'),
    ("bool-for-an-int", {"rows": True}, "rows must be an integer, found true."),
    ("float-for-an-int", {"rows": 16.7}, "rows must be an integer, found the number 16.7."),
    ("null-for-a-required-str", {"records_dir": None}, "records_dir must be a string, found null."),
    ("list-for-an-optional-int", {"count": [160]}, "count must be an integer or null, found the list [160]."),
    ("strings-in-a-list-of-ints", {"layers": ["1"]}, 'layers must be a list of integers or null, found the list ["1"].'),
    ("string-for-a-list", {"names": "a b"}, 'names must be a list of strings, found the string "a b".'),
    ("unknown-enum-value", {"colour": "green"}, 'colour must be one of ["red", "blue"], found the string "green".'),
    ("unknown-literal", {"choice": "c"}, 'choice must be one of ["a", "b"], found the string "c".'),
    ("list-for-dict-or-str", {"options": [1]}, "options must be an object, a string or null, found the list [1]."),
    # "NaN" is not a number JSON has, so there is no "write it without quotes".
    ("string-NaN-for-a-float", {"learning_rate": "NaN"}, 'learning_rate must be a number, found the string "NaN".'),
]


@pytest.mark.parametrize("with_flags", [False, True], ids=["file-alone", "file-then-flags"])
@pytest.mark.parametrize("values, message", [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES])
def test_a_value_not_of_the_declared_type_is_an_error(values, message, with_flags, tmp_path):
    """parse_dict converts nothing (a "false" trained) and argparse converted only string defaults: the file
    alone and the file before flags must both refuse a value that is not of the field's type."""
    flags = ["--learning_rate", "0.5"] if with_flags else []
    path = write(tmp_path, {"records_dir": "d", **values})
    with pytest.raises(InputError) as raised:
        parse_args((First, Second, Typed), [path, *flags])
    assert str(raised.value).startswith(f"{path}: {message}"), str(raised.value)


STRICT_JSON = [
    ("nan", '{"records_dir": "d", "learning_rate": NaN}', "learning_rate holds NaN, which is not JSON"),
    ("infinity", '{"records_dir": "d", "learning_rate": Infinity}', "learning_rate holds Infinity, which is not JSON"),
    ("minus-infinity-in-a-list", '{"records_dir": "d", "layers": [1, -Infinity]}', "layers holds -Infinity, which is not JSON"),
    ("nan-in-a-nested-object", '{"records_dir": "d", "options": {"scale": NaN}}', "scale holds NaN, which is not JSON"),
    ("key-twice", '{"records_dir": "d", "rows": 1, "rows": 2}', "key 'rows' is given twice"),
    ("key-twice-in-a-nested-object", '{"records_dir": "d", "options": {"a": 1, "a": 2}}', "key 'a' is given twice"),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in STRICT_JSON], ids=[case[0] for case in STRICT_JSON])
def test_a_file_must_be_strict_json(text, message, tmp_path):
    """Python's json reads NaN / Infinity and keeps the last of two equal keys; a strict reader refuses both."""
    path = tmp_path / "args.json"
    path.write_text(text)
    with pytest.raises(InputError) as raised:
        parse_args((First, Second, Typed), [str(path)])
    assert str(raised.value).startswith(f"{path}: {message}"), str(raised.value)


@dataclass
class NotTraining:
    fsdp: Optional[str] = None


def test_fields_transformers_accepts_wider_than_annotated_pass_for_training_arguments_only(tmp_path):
    from transformers import TrainingArguments

    (training,) = parse_args((TrainingArguments,), [write(tmp_path, {"fsdp": ["full_shard", "auto_wrap"], "debug": None})])
    assert training.fsdp and training.debug == []
    (training,) = parse_args((TrainingArguments,), [write(tmp_path, {"fsdp": True}), "--seed", "3"])
    assert training.fsdp is True and training.seed == 3
    with pytest.raises(InputError, match="fsdp must be a string, true, false, a list of strings or null, found the number 1"):
        parse_args((TrainingArguments,), [write(tmp_path, {"fsdp": 1})])
    with pytest.raises(InputError, match="fsdp must be a string or null, found true"):
        parse_args((NotTraining,), [write(tmp_path, {"fsdp": True})])


@dataclass
class Switches:
    keep: bool = True
    mode: Union[str, bool] = "no"
    tags: Union[str, list[Colour]] = ""
    rows: int = 1


def test_file_values_reach_the_arguments_unchanged_when_flags_follow(tmp_path):
    """argparse takes a True-default bool's default from its first flag, not its `--no_` twin, so the file's
    `false` was lost; and it runs string defaults through the flag's type (string_to_bool, Colour)."""
    path = write(tmp_path, {"keep": False, "mode": "all", "tags": ""})
    assert parse_args((Switches,), [path]) == (Switches(False, "all", "", 1),)
    assert parse_args((Switches,), [path, "--rows", "2"]) == (Switches(False, "all", "", 2),)
    assert parse_args((Switches,), [path, "--keep", "--tags", "red", "blue"]) == (Switches(True, "all", [Colour.RED, Colour.BLUE], 1),)


def _defaults(dataclass_type) -> dict:
    """Every init field's default, as a JSON file would spell it (enum members as their values)."""
    values = {}
    for item in fields(dataclass_type):
        if not item.init or (item.default is MISSING and item.default_factory is MISSING):
            continue
        value = item.default if item.default is not MISSING else item.default_factory()
        values[item.name] = value.value if isinstance(value, Enum) else value
    return values


@pytest.mark.parametrize("with_flags", [False, True], ids=["file-alone", "file-then-flags"])
def test_a_file_of_the_training_arguments_defaults_passes(with_flags, tmp_path):
    """No false errors on TrainingArguments' own fields (ThinkRec's subclass included)."""
    from transformers import TrainingArguments

    import run_thinkrec

    flags = ["--seed", "7"] if with_flags else []
    (plain,) = parse_args((TrainingArguments,), [write(tmp_path, _defaults(TrainingArguments)), *flags])
    assert plain.seed == (7 if with_flags else 42)
    values = {**_defaults(run_thinkrec.ModelArguments), **_defaults(run_thinkrec.DataArguments),
              **_defaults(run_thinkrec.ThinkRecTrainingArguments), "records_dir": "d"}
    model_args, data_args, training_args = run_thinkrec.parse_args([write(tmp_path, values), *flags])
    assert (data_args.records_dir, training_args.metric_for_best_model) == ("d", "auc")


def test_run_command_prints_input_errors_as_one_message(capsys):
    def main(argv):
        raise InputError("records.parquet: missing column 'label'")

    with pytest.raises(SystemExit) as stopped:
        run_command(main, [])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: records.parquet: missing column 'label'\n"


def test_run_command_keeps_the_traceback_of_real_bugs():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(main, [])


def _command(tmp_path, *args):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)


def test_a_command_with_bad_input_prints_one_line_and_exits_non_zero(tmp_path):
    table = tmp_path / "log.csv"
    table.write_text("user,item,time\n1,2,3\n")
    result = _command(tmp_path, str(REPO_ROOT / "prepare_data.py"), "--source", "table", "--data_path", str(table),
                      "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "user_id" in message[0], result.stderr


def test_a_json_file_with_an_override_runs_a_command(tmp_path):
    # prepare_data.py file.json --flag failed before the shared parser (it only took a lone .json file).
    path = write(tmp_path, {"source": "ml-100k", "output_dir": str(tmp_path / "ignored")})
    result = _command(tmp_path, str(REPO_ROOT / "prepare_data.py"), path, "--output_dir", str(tmp_path / "records"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "records" / "metadata.json").is_file() and not (tmp_path / "ignored").exists()


def test_the_library_imports_without_path_edits(tmp_path):
    # Run from a folder that is not the repository: the installed package and root modules resolve.
    result = _command(tmp_path, "-c", "import thinkrec.data.records, modeling_thinkrec, run_thinkrec; print('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


EXAMPLE_COMMANDS = {
    "prepare": "prepare_data", "records": "prepare_data", "cf": "train_collaborative", "mf": "train_collaborative",
    "stage": "run_thinkrec", "loop": "reflection_loop",
}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "**", "*.json"), recursive=True)),
                         ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_every_example_file_parses_with_its_command(path, tmp_path, monkeypatch):
    """An example naming a removed or misspelt argument fails at the user's first command, not here."""
    import importlib

    # Commands that check their input folder when parsing find one (the examples' paths are relative).
    monkeypatch.chdir(tmp_path)
    records_dir = json.loads(Path(path).read_text()).get("records_dir")
    if records_dir:
        (tmp_path / records_dir).mkdir(parents=True)
        (tmp_path / records_dir / "metadata.json").write_text("{}")
    name = os.path.basename(path)
    module = importlib.import_module(next(command for prefix, command in EXAMPLE_COMMANDS.items() if name.startswith(prefix)))
    parsed = getattr(module, "parse_arguments", None) or module.parse_args
    parsed = parsed([path])
    values = json.loads(Path(path).read_text())
    for key, value in values.items():
        found = [getattr(group, key) for group in parsed if hasattr(group, key)]
        assert found, f"{path}: {key!r} reached no argument of {module.__name__}"
        if not isinstance(value, (list, dict)):
            assert any(item == value or str(item) == str(value) for item in found), (key, value, found)


def test_the_games_example_prepares_a_second_domain_whose_prompts_speak_of_games(tmp_path, monkeypatch):
    """examples/games: the generated log goes through prepare_data.py with the example's own arguments;
    genres given as lists become 'A|B', the records say "game"/"games", and a ThinkRec-style history
    (liked and disliked) renders as such in the prompt."""
    import importlib.util

    from transformers import AutoTokenizer

    import prepare_data
    from data_collator import build_processor
    from modeling_thinkrec import add_slot_tokens
    from thinkrec.data.nouns import item_nouns_from_metadata
    from thinkrec.data.records import load_items, load_prepared
    from thinkrec.training.backbones import smollm2_tokenizer_dir

    spec = importlib.util.spec_from_file_location("generate_log", os.path.join(REPO_ROOT, "examples", "games", "generate_log.py"))
    generate_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_log)
    monkeypatch.chdir(tmp_path)
    summary = generate_log.main(["--output_dir", "outputs/games/raw", "--num_players", "60", "--num_games", "40"])
    assert summary["games"] == 40 and 0.2 < summary["liked_share"] < 0.8
    prepare_data.main([os.path.join(REPO_ROOT, "examples", "games", "records.json")])
    records = load_prepared("outputs/games/records")
    assert (records.metadata["item_noun"], records.metadata["item_noun_plural"]) == ("game", "games")
    items = load_items("outputs/games/records")
    raw = {json.loads(line)["name"]: json.loads(line)["categories"] for line in open("outputs/games/raw/games.jsonl")}
    assert len(items) == len(raw) and all(row["genres"] == "|".join(raw[row["title"]]) for _, row in items.iterrows())
    test = records.splits["test"]
    row = next(r for r in test.to_dict("records") if 0 < sum(r["HisItemLabels"]) < len(r["HisItemLabels"]))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    add_slot_tokens(tokenizer, "<|user_slot|>", "<|item_slot|>")
    processor = build_processor(tokenizer, template="text_only", **item_nouns_from_metadata(records.metadata))
    text, _, _ = processor.render_prompt(row, processor.templates[0], len(row["HisItemIDs"]))
    liked = [t for t, label in zip(row["HisItemTitles"], row["HisItemLabels"]) if label == 1]
    disliked = [t for t, label in zip(row["HisItemTitles"], row["HisItemLabels"]) if label == 0]
    assert "following games" in text and "game titled" in text and "movie" not in text
    assert "low ratings to the following games" in text
    assert all(f'"{title}"' in text for title in liked + disliked)
    assert text.index(f'"{liked[-1]}"') < text.index("low ratings") < text.index(f'"{disliked[-1]}"')
