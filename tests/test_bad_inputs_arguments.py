"""Bad values in an arguments `.json` file: each stops the command with one line naming the file, the
field, what it must be and what was found, before any records or model load (records_dir names a folder
that does not exist, and that is not what is reported); the file is untouched and nothing is written."""

import json

import pytest
from _bad_inputs import assert_inputs_unchanged, assert_one_line_error, file_hashes, run_main

import prepare_data
import run_thinkrec
import train_collaborative


COMMANDS = {"run_thinkrec": run_thinkrec.main, "prepare_data": prepare_data.main,
            "train_collaborative": train_collaborative.main}


def base_arguments(command, tmp_path):
    """Arguments that would otherwise run until they find their missing input."""
    if command == "prepare_data":
        return {"source": "table", "data_path": str(tmp_path / "missing.csv"), "item_noun": "game", "item_noun_plural": "games"}
    return {"records_dir": str(tmp_path / "missing-records")}


CASES = [
    # (id, command, values in the file, flags after the file, what the one error line names)
    ("batch-size-as-a-string", "run_thinkrec", {"per_device_train_batch_size": "16"}, [],
     ("args.json", "per_device_train_batch_size", "must be an integer", 'the string "16"', "without quotes")),
    ("batch-size-as-a-string-then-a-flag", "run_thinkrec", {"per_device_train_batch_size": "16"}, ["--seed", "1"],
     ("args.json", "per_device_train_batch_size", "integer", '"16"')),
    ("do-train-false-as-a-string", "run_thinkrec", {"do_train": "false"}, [],
     ("args.json", "do_train", "true or false", 'the string "false"', "write false without quotes")),
    ("do-train-false-as-a-string-then-a-flag", "run_thinkrec", {"do_train": "false"}, ["--learning_rate", "5e-4"],
     ("args.json", "do_train", "true or false", '"false"')),
    ("learning-rate-as-a-string", "run_thinkrec", {"learning_rate": "1e-3"}, [],
     ("learning_rate", "must be a number", '"1e-3"', "write 1e-3 without quotes")),
    ("epochs-as-a-word", "run_thinkrec", {"num_train_epochs": "one"}, [], ("num_train_epochs", "a number", '"one"')),
    ("batch-size-with-a-fraction", "run_thinkrec", {"per_device_train_batch_size": 16.7}, [],
     ("per_device_train_batch_size", "integer", "the number 16.7")),
    ("lora-rank-null", "run_thinkrec", {"lora_r": None}, [], ("lora_r", "must be an integer,", "found null")),
    ("prompt-tokens-as-a-list", "run_thinkrec", {"max_prompt_tokens": [160]}, [],
     ("max_prompt_tokens", "an integer or null", "the list [160]")),
    ("seed-as-a-boolean", "run_thinkrec", {"seed": True}, [], ("seed", "integer", "true")),
    ("expert-layers-as-strings", "run_thinkrec", {"expert_layers": ["-1", "-2"]}, [],
     ("expert_layers", "a list of integers or null", '["-1", "-2"]')),
    ("misspelt-eval-strategy", "run_thinkrec", {"eval_strategy": "epochs"}, [],
     ("eval_strategy", '"epoch"', '"steps"', 'the string "epochs"')),
    ("report-to-a-number", "run_thinkrec", {"report_to": 1}, [], ("report_to", "a string, a list of strings or null", "the number 1")),
    ("zero-batch-size", "run_thinkrec", {"per_device_train_batch_size": 0}, [], ("per_device_train_batch_size", ">= 1", "got 0")),
    ("negative-accumulation-steps-flag", "run_thinkrec", {}, ["--gradient_accumulation_steps", "-1"],
     ("gradient_accumulation_steps", ">= 1", "got -1")),
    ("misspelt-metric-for-best-model", "run_thinkrec", {"metric_for_best_model": "aucc"}, [],
     ("metric_for_best_model", "'aucc'", "'auc'", "'uauc'", "'loss'")),
    ("max-history-as-a-string", "prepare_data", {"max_history": "10"}, [], ("max_history", "integer", '"10"')),
    ("split-ratios-as-a-string", "prepare_data", {"split_ratios": "0.8,0.1,0.1"}, ["--seed", "3"],
     ("split_ratios", "a list of numbers", '"0.8,0.1,0.1"')),
    ("embedding-dim-as-a-string", "train_collaborative", {"embedding_dim": "64"}, [], ("embedding_dim", "integer or null", '"64"')),
    ("unknown-optimizer", "train_collaborative", {"optimizer": "sgd"}, [], ("optimizer", '["adam", "adamw"]', '"sgd"')),
]


@pytest.mark.parametrize("command, values, flags, needles", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_argument_value_stops_the_command_before_anything_loads(command, values, flags, needles, tmp_path, capsys):
    output_dir = tmp_path / "out"
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**base_arguments(command, tmp_path), **values, "output_dir": str(output_dir)}, indent=2))
    before = file_hashes([path])
    outcome = run_main(COMMANDS[command], [str(path), *flags], capsys)
    assert_one_line_error(outcome, *needles)
    assert_inputs_unchanged(before)
    assert not output_dir.exists() or not any(output_dir.iterdir()), sorted(output_dir.rglob("*"))


# Text the file holds as written: NaN / Infinity are not JSON, and a key given twice has no one value.
RAW_CASES = [
    ("learning-rate-NaN", '{{"records_dir": "{records}", "output_dir": "{output}", "learning_rate": NaN}}',
     ("args.json", "learning_rate", "NaN", "not JSON")),
    ("weight-decay-minus-Infinity", '{{"records_dir": "{records}", "output_dir": "{output}", "weight_decay": -Infinity}}',
     ("args.json", "weight_decay", "-Infinity", "not JSON")),
    ("NaN-inside-a-list", '{{"records_dir": "{records}", "output_dir": "{output}", "expert_layers": [1, NaN]}}',
     ("args.json", "expert_layers", "NaN", "not JSON")),
    ("key-given-twice", '{{"records_dir": "{records}", "output_dir": "{output}", "seed": 1, "seed": 2}}',
     ("args.json", "'seed'", "twice")),
    ("key-given-twice-in-a-nested-object",
     '{{"records_dir": "{records}", "output_dir": "{output}", "fsdp_config": {{"version": 2, "version": 1}}}}',
     ("args.json", "'version'", "twice")),
]


@pytest.mark.parametrize("text, needles", [case[1:] for case in RAW_CASES], ids=[case[0] for case in RAW_CASES])
def test_a_file_that_is_not_strict_json_stops_the_command_naming_the_key(text, needles, tmp_path, capsys):
    output_dir = tmp_path / "out"
    path = tmp_path / "args.json"
    path.write_text(text.format(records=tmp_path / "missing-records", output=output_dir))
    before = file_hashes([path])
    outcome = run_main(run_thinkrec.main, [str(path)], capsys)
    assert_one_line_error(outcome, *needles)
    assert_inputs_unchanged(before)
    assert not output_dir.exists() or not any(output_dir.iterdir()), sorted(output_dir.rglob("*"))


# Values transformers accepts though the field's annotation is narrower: they pass the type check, and the
# command goes on until it finds that records_dir does not exist.
WIDER_CASES = [
    ("fsdp-true", {"fsdp": True}),
    ("fsdp-a-list-of-options", {"fsdp": ["full_shard", "auto_wrap"]}),
    ("fsdp-a-string-of-options", {"fsdp": "full_shard auto_wrap"}),
    ("debug-null", {"debug": None}),
    ("accelerator-config-an-object", {"accelerator_config": {"split_batches": False}}),
    ("report-to-a-list", {"report_to": ["none"]}),
]


@pytest.mark.parametrize("values", [case[1] for case in WIDER_CASES], ids=[case[0] for case in WIDER_CASES])
def test_a_value_transformers_accepts_passes_the_type_check(values, tmp_path, capsys):
    path = tmp_path / "args.json"
    records = tmp_path / "missing-records"
    path.write_text(json.dumps({"records_dir": str(records), **values, "output_dir": str(tmp_path / "out")}))
    before = file_hashes([path])
    outcome = run_main(run_thinkrec.main, [str(path), "--seed", "1"], capsys)
    assert_one_line_error(outcome, str(records))
    assert_inputs_unchanged(before)
