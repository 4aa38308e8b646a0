"""reflect.py: the validation threshold, and the loop end to end on a tiny ThinkRec model with the
synthesiser (and with a teacher that is down), feeding run_thinkrec's reason_records."""

import json
import socket

import datasets
import numpy as np
import pandas as pd
import pytest
from _run_fixtures import write_records
from _scripted_server import ScriptedServer
from transformers import AutoTokenizer

import reflect
import run_thinkrec
from data_collator import ThinkRecCollator
from modeling_thinkrec import ThinkRecForCausalLM
from thinkrec.data.records import load_prepared
from thinkrec.evaluation.reporting import verdict_of
from thinkrec.reasons import reflection
from thinkrec.training.backbones import smollm2_tokenizer_dir, tiny_llama
from thinkrec.training.trainer import interleave_reasoning_rows


# ---------------------------------------------------------------------------------- threshold


def test_threshold_maximises_accuracy_between_scores():
    threshold, accuracy = reflection.choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert accuracy == 1.0 and 0.2 < threshold <= 0.3
    # A model whose scores sit far from 0.5 still gets a useful cut (not the raw 0.5).
    threshold, accuracy = reflection.choose_threshold([0, 0, 1, 1, 1], [0.80, 0.82, 0.85, 0.9, 0.95])
    assert accuracy == 1.0 and 0.82 < threshold <= 0.85


def test_threshold_maximising_f1_by_hand():
    labels, scores = [0, 1, 0, 1, 1], [0.1, 0.6, 0.6, 0.7, 0.3]
    # Cuts: Yes for {0.7}: F1 2/4; {0.7, 0.6, 0.6}: 4/6; all but 0.1: 6/7; all: 6/8.
    threshold, f1 = reflection.choose_threshold(labels, scores, "f1")
    assert f1 == pytest.approx(6 / 7) and 0.1 < threshold <= 0.3
    predicted = (np.array(scores) >= threshold).astype(int)
    assert predicted.tolist() == [0, 1, 1, 1, 1]


def test_threshold_with_one_distinct_score_and_no_rows():
    threshold, accuracy = reflection.choose_threshold([0, 1, 1], [0.4, 0.4, 0.4])
    assert accuracy == pytest.approx(2 / 3) and threshold == pytest.approx(0.4)  # everything Yes
    with pytest.raises(ValueError, match="no rows"):
        reflection.choose_threshold([], [])


# ----------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Prepared toy records and a tiny text-only ThinkRec model with a LoRA adapter, saved as a folder."""
    root = tmp_path_factory.mktemp("reflect")
    write_records(root / "records")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    language_model = tiny_llama(len(tokenizer) + 2, hidden_size=32, num_attention_heads=2, seed=0)
    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, None)
    model.add_lora()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def run_reflect(tmp_path, **arguments):
    path = tmp_path / "reflect.json"
    path.write_text(json.dumps(arguments))
    return reflect.main([str(path)])


def test_reflect_explains_the_mispredicted_train_rows(assets, tmp_path, capsys):
    output = tmp_path / "reasons" / "round1.parquet"
    summary = run_reflect(tmp_path, model_dir=str(assets / "model"), records_dir=str(assets / "records"),
                          output_path=str(output), max_train_samples=40, max_eval_samples=20, batch_size=20,
                          max_reason_tokens=30, seed=3, balance_verdicts=False)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["explained"] == summary["explained"]
    saved = json.loads(output.with_suffix(".summary.json").read_text())
    assert saved["rows_scored"] == 40 and saved["validation_rows"] == 20
    assert saved["explained"] + saved["rejected"] + saved["failed"] == saved["asked"] == saved["mispredicted"]
    reasons = pd.read_parquet(output)
    assert len(reasons) == saved["explained"] > 0
    assert set(reasons["mode"]) == {"reason"}
    assert [verdict_of(text) for text in reasons["reason"]] == reasons["label"].tolist()
    records = load_prepared(assets / "records")
    assert list(reasons.columns) == list(records.splits["train"].columns)
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    assert max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in reasons["reason"]) <= 30

    # The rows are exactly the train rows the model gets wrong at the chosen threshold.
    model = ThinkRecForCausalLM.from_pretrained(assets / "model").eval()
    collator = ThinkRecCollator(tokenizer, template="text_only", include_answers=False, max_prompt_tokens=512)
    scores = reflection.score_rows(model, collator, reasons, batch_size=16)
    assert ((scores >= saved["threshold"]).astype(int) != reasons["label"].to_numpy()).all()
    keys = set(zip(records.splits["train"]["UserID"], records.splits["train"]["TargetItemID"]))
    assert set(zip(reasons["UserID"], reasons["TargetItemID"])) <= keys

    # run_thinkrec reads it as reasoning rows and mixes them in.
    reason_rows = run_thinkrec.load_reason_rows(str(output))
    train = datasets.Dataset.from_pandas(records.splits["train"], preserve_index=False)
    mixed = interleave_reasoning_rows(train, reason_rows, 0.2, seed=0)
    assert sum(mode == "reason" for mode in mixed["mode"]) > 0

    # A second round does not silently replace the file; overwrite or another name does.
    with pytest.raises(FileExistsError, match="overwrite"):
        run_reflect(tmp_path, model_dir=str(assets / "model"), records_dir=str(assets / "records"), output_path=str(output),
                    max_train_samples=8, max_eval_samples=8)
    again = run_reflect(tmp_path, model_dir=str(assets / "model"), records_dir=str(assets / "records"), output_path=str(output),
                        max_train_samples=40, max_eval_samples=20, batch_size=20, max_reason_tokens=30, seed=3, overwrite=True)
    assert again["mispredicted"] == summary["mispredicted"] and again["threshold"] == summary["threshold"]


def test_balance_by_label_adds_rows_of_the_rarer_label_in_split_order():
    chosen = pd.DataFrame({"label": [0, 0, 0, 1]}, index=[1, 4, 6, 9])
    pool = pd.DataFrame({"label": [1, 0, 1, 1]}, index=[0, 2, 3, 8])
    balanced, added = reflection.balance_by_label(chosen, pool, seed=0)
    assert added == 2 and balanced["label"].value_counts().to_dict() == {0: 3, 1: 3}
    assert list(balanced.index) == sorted(balanced.index) and set(chosen.index) <= set(balanced.index)
    assert not set(balanced.index) & {2}  # only rows of the rarer label are added
    # A pool too small adds what it has; balanced input is left alone.
    assert reflection.balance_by_label(pd.DataFrame({"label": [0] * 5}), pool.iloc[:1], seed=0)[1] == 1
    assert reflection.balance_by_label(pd.DataFrame({"label": [0, 1]}), pool, seed=0)[1] == 0


def test_reflect_balance_verdicts_explains_both_labels(assets, tmp_path):
    common = {"model_dir": str(assets / "model"), "records_dir": str(assets / "records"), "max_train_samples": 40,
              "max_eval_samples": 20, "batch_size": 20, "max_reason_tokens": 30, "seed": 3}
    plain = run_reflect(tmp_path, output_path=str(tmp_path / "plain.parquet"), balance_verdicts=False, **common)
    # Balanced is the default: a one-sided reason split teaches one verdict for every row.
    balanced = run_reflect(tmp_path, output_path=str(tmp_path / "balanced.parquet"), **common)
    assert balanced["mispredicted"] == plain["mispredicted"]
    assert balanced["asked"] == plain["asked"] + balanced["added_for_balance"]
    counts = pd.read_parquet(tmp_path / "balanced.parquet")["label"].value_counts()
    plain_counts = pd.read_parquet(tmp_path / "plain.parquet")["label"].value_counts()
    minority = 1 if plain_counts.get(1, 0) < plain_counts.get(0, 0) else 0
    assert counts.get(minority, 0) == plain_counts.get(minority, 0) + balanced["added_for_balance"]
    assert counts.get(1 - minority, 0) == plain_counts.get(1 - minority, 0)
    assert counts.get(minority, 0) <= counts.get(1 - minority, 0)  # never overshoots
    assert balanced["added_for_balance"] > 0, (plain_counts, counts)  # the tiny model is one-sided: something was added


def test_reflect_default_output_sits_next_to_the_records(assets, tmp_path):
    summary = run_reflect(tmp_path, model_dir=str(assets / "model"), records_dir=str(assets / "records"),
                          max_train_samples=12, max_eval_samples=12, max_reasons=3, threshold_metric="f1", overwrite=True,
                          balance_verdicts=False)
    assert summary["output_path"] == str(assets / "records" / "reasons" / "reasons-model.parquet")
    assert summary["asked"] == min(3, summary["mispredicted"])
    # The records folder still loads (the reasons live in a subfolder load_prepared does not read).
    assert len(load_prepared(assets / "records").splits["train"]) > 0


def test_reflect_with_a_teacher_that_is_down_stops_and_keeps_the_earlier_split(assets, tmp_path):
    """A teacher nobody can reach is an error naming it, even with the synthesiser as fallback (which is
    for rows the teacher failed, not for a teacher that is not there); it used to exit 0 with an empty
    reason split over the earlier one."""
    from thinkrec.utils.errors import InputError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    earlier = tmp_path / "reasons.parquet"
    common = dict(model_dir=str(assets / "model"), records_dir=str(assets / "records"), max_train_samples=16,
                  max_eval_samples=12, max_reasons=4, output_path=str(earlier))
    run_reflect(tmp_path, **common)
    written = earlier.read_bytes()
    down = dict(common, source="remote", base_url=f"http://127.0.0.1:{port}/v1", remote_model="teacher", max_retries=0,
                request_timeout=2.0, overwrite=True)
    for fallback in (False, True):
        with pytest.raises(InputError, match=f"127.0.0.1:{port}.* is unreachable"):
            run_reflect(tmp_path, fallback_to_synthesised=fallback, **down)
        assert earlier.read_bytes() == written


def test_reflect_falls_back_to_the_synthesiser_for_rows_the_teacher_failed(assets, tmp_path):
    common = dict(model_dir=str(assets / "model"), records_dir=str(assets / "records"), max_train_samples=16,
                  max_eval_samples=12, max_reasons=4, source="remote", remote_model="teacher", max_retries=0)
    with ScriptedServer({"Film": [("ok", "The user might like it.")]}) as server:  # never a verdict
        with pytest.raises(ValueError, match="none of the .* rows asked got a usable reason"):
            run_reflect(tmp_path, output_path=str(tmp_path / "none.parquet"), base_url=server.url, **common)
        fallback = run_reflect(tmp_path, output_path=str(tmp_path / "fallback.parquet"), base_url=server.url,
                               fallback_to_synthesised=True, **common)
    assert not (tmp_path / "none.parquet").exists()
    assert fallback["failed"] == fallback["asked"] > 0
    assert fallback["explained"] == fallback["asked"] and fallback["fallback_counters"]["asked"] == fallback["asked"]


def test_reflect_rejects_unknown_keys_and_bad_sources(assets, tmp_path):
    with pytest.raises(ValueError, match="max_train_rows"):
        run_reflect(tmp_path, model_dir="m", records_dir="r", max_train_rows=3)
    with pytest.raises(ValueError, match="source must be one of"):
        run_reflect(tmp_path, model_dir="m", records_dir="r", source="oracle")
    with pytest.raises(ValueError, match="base_url and remote_model"):
        run_reflect(tmp_path, model_dir="m", records_dir="r", source="remote")
    with pytest.raises(FileNotFoundError, match="not a ThinkRec model folder"):
        run_reflect(tmp_path, model_dir=str(tmp_path), records_dir=str(assets / "records"), output_path=str(tmp_path / "x.parquet"))
