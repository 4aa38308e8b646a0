"""ThinkRecProcessor and the tokenise-once pipeline: the same batches as the collator before it (a
frozen copy in _reference_collator.py), truncation by per-title token counts, caching, saving with
the checkpoint, AutoProcessor loading, the README's Hub example in a fresh interpreter, and
length-grouped evaluation that keeps metrics and prediction order."""

import json
import os
import subprocess
import sys

import _reference_collator as reference
import datasets
import numpy as np
import pytest
import torch
from _tiny_model import NUM_ITEMS, TITLES, make_cf_checkpoint, make_model, make_records, make_tokenizer
from test_modeling import BLOCK_REPOSITORY_IMPORTS
from transformers import AutoModelForCausalLM, AutoProcessor, TrainingArguments

from data_collator import METRIC_COLUMNS, ThinkRecCollator, build_processor, tokenize_dataset
from processing_thinkrec import MODEL_INPUTS, ThinkRecProcessor
from thinkrec.training.backbones import tiny_llama
from thinkrec.training.trainer import LengthSortedSampler, ThinkRecTrainer, length_order, metrics_for
from thinkrec.utils.errors import InputError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def parity_records(seed: int, num_rows: int = 24) -> list[dict]:
    """Rec and reason rows; every third history carries dislikes (HisItemLabels), the others none."""
    records = make_records(num_rows, seed=seed, max_history=9)
    for row, record in enumerate(records):
        record["HisItemLabels"] = [int(i % 3 != 1) for i in range(len(record["HisItemIDs"]))] if row % 3 == 0 else None
    return records


def budget_for(tokenizer, records, **settings) -> int:
    """A budget that every question fits without history but that cuts most full histories."""
    without_history = [{**record, "HisItemIDs": [], "HisItemTitles": [], "HisItemLabels": None} for record in records]
    bare = reference.ThinkRecCollator(tokenizer, include_answers=False, **settings)(without_history)["attention_mask"].sum(-1)
    full = reference.ThinkRecCollator(tokenizer, include_answers=False, **settings)(records)["attention_mask"].sum(-1)
    return max(int(bare.max()) + 4, int(full.float().quantile(0.3)))


def assert_same_batches(expected: dict, found: dict) -> None:
    assert sorted(expected) == sorted(found)
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


TEMPLATE_PAIRS = [("text_only", "reflection_text_only"), ("collaborative", "reflection"), ("reflection", None),
                  ("reflection_text_only", None)]
SETTINGS = [
    {},
    {"history_item_slots": True},
    {"budget": True},
    {"history_item_slots": True, "budget": True, "tokens_per_id": 2},
    {"use_chat_template": True, "budget": True},
    {"use_chat_template": True, "system_prompt": "You recommend movies.", "history_item_slots": True},
]


@pytest.mark.parametrize("template,reason_template", TEMPLATE_PAIRS)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(sorted(s)) or "plain")
def test_the_pipeline_gives_the_batches_of_the_collator_it_replaces(tokenizer, template, reason_template, settings):
    records = parity_records(seed=len(template) + len(settings))
    settings = {"template": template, "reason_template": reason_template, **settings}
    if settings.pop("budget", False):
        settings["max_prompt_tokens"] = budget_for(tokenizer, records, **settings)
    mapped = tokenize_dataset(datasets.Dataset.from_list(records), build_processor(tokenizer, **settings))
    for include_answers in (True, False):
        before = reference.ThinkRecCollator(tokenizer, include_answers=include_answers, **settings)
        after = ThinkRecCollator(tokenizer, include_answers=include_answers, **settings)
        for start in range(0, len(records), 8):
            expected = before(records[start : start + 8])
            # Raw records (reflect.py, tests) and rows encoded once by Dataset.map (run_thinkrec.py).
            assert_same_batches(expected, after(records[start : start + 8]))
            assert_same_batches(expected, after([mapped[row] for row in range(start, min(start + 8, len(records)))]))
    if "max_prompt_tokens" in settings:
        unlimited = {key: value for key, value in settings.items() if key != "max_prompt_tokens"}
        full = ThinkRecCollator(tokenizer, include_answers=False, **unlimited)(records)["attention_mask"].sum(-1)
        assert (torch.tensor(mapped["prompt_length"]) < full).sum() >= len(records) // 2, "the budget cut most histories"


def test_a_long_history_is_cut_with_a_few_tokenisations_not_one_per_dropped_title(tokenizer):
    record = {"UserID": 3, "HisItemIDs": list(range(1, NUM_ITEMS)), "HisItemTitles": TITLES[1:], "HisItemLabels": None,
              "TargetItemID": 2, "TargetItemTitle": TITLES[2], "label": 1, "mode": "rec", "reason": ""}
    settings = {"template": "collaborative", "history_item_slots": True, "max_prompt_tokens": 140}
    processor = build_processor(tokenizer, **settings)
    calls = []
    tokenize_prompts = processor._tokenize_prompts
    processor._tokenize_prompts = lambda texts: calls.append(len(texts)) or tokenize_prompts(texts)
    encoded = processor.encode([record])
    expected = reference.ThinkRecCollator(tokenizer, **settings).build_prompt(record, 0)
    assert (encoded["prompt_ids"][0], encoded["user_slot_ids"][0], encoded["item_slot_ids"][0]) == expected
    kept = len(encoded["item_slot_ids"][0]) - 1
    assert 0 < kept < len(record["HisItemIDs"]) - 20, "most titles dropped"
    assert len(calls) <= 3, f"whole-prompt tokenisations: {len(calls)} for {len(record['HisItemIDs']) - kept} dropped titles"


def test_a_hub_call_needs_no_label_and_returns_model_inputs(tokenizer):
    processor = build_processor(tokenizer, template="collaborative", reason_template="reflection")
    record = {"UserID": 4, "HisItemIDs": [10, 3], "HisItemTitles": ["Heat (1995)", "Fargo (1996)"], "TargetItemID": 5,
              "TargetItemTitle": "Big (1988)"}
    inputs = processor(record)
    assert list(inputs) == list(MODEL_INPUTS) and inputs["input_ids"].shape[0] == 1
    assert "Please begin your answer" in tokenizer.decode(inputs["input_ids"][0])
    assert "explain the reason" in tokenizer.decode(processor(record, mode="reason")["input_ids"][0])
    training = processor([{**record, "label": 1, "mode": "rec"}], include_answers=True)
    assert tokenizer.decode(training["input_ids"][0][training["labels"][0] != -100]) == "Yes" + tokenizer.eos_token
    with pytest.raises(ValueError, match=r"row 0: missing fields \['TargetItemTitle'\]"):
        processor({key: value for key, value in record.items() if key != "TargetItemTitle"})


def test_several_templates_are_picked_per_record_and_stay_put(tokenizer, tmp_path):
    custom = tmp_path / "two.txt"
    custom.write_text("First: <ItemTitleList>. <TargetItemTitle>?\\n#Answer:\nSecond: <ItemTitleList>. <TargetItemTitle>?\\n#Answer:\n")
    processor = build_processor(tokenizer, template=str(custom))
    records = make_records(40, seed=1, modes=("rec",))
    first = [tokenizer.decode(ids) for ids in processor.encode(records)["prompt_ids"]]
    again = [tokenizer.decode(ids) for ids in build_processor(tokenizer, template=str(custom)).encode(records[::-1])["prompt_ids"]]
    assert first == again[::-1], "a record's template does not depend on the order or batch it comes in"
    assert {text.split(":")[0] for text in first} == {"First", "Second"}


def test_the_processor_saves_the_templates_text_and_reloads_with_auto_processor(tokenizer, tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("Liked: <ItemTitleList><IfDisliked>; disliked: <DislikedItemTitleList></IfDisliked>. "
                      "The <ItemNoun> <TargetItemTitle> <TargetItemID>?\\n#Answer:\n")
    processor = build_processor(tokenizer, template=str(custom), reason_template="reflection", history_item_slots=True,
                                max_prompt_tokens=200, item_noun="game", item_noun_plural="games", tokens_per_id=2)
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    custom.unlink()  # a Hub user has no template files
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["templates"][0].startswith("Liked: <ItemTitleList>") and config["template_origins"] == ["mine.txt line 1"]
    assert str(tmp_path) not in (folder / "processor_config.json").read_text()
    assert config["auto_map"]["AutoProcessor"] == "processing_thinkrec.ThinkRecProcessor"
    assert (folder / "processing_thinkrec.py").is_file() and (folder / "configuration_thinkrec.py").is_file()
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "ThinkRecProcessor"
    records = parity_records(seed=5)
    assert loaded.encode(records) == processor.encode(records)
    settings = lambda p: {key: value for key, value in p.to_dict().items() if key != "auto_map"}  # noqa: E731
    assert settings(loaded) == settings(processor)


def test_bad_input_names_the_template_line_or_dataset_row(tokenizer, tmp_path):
    records = parity_records(seed=6)
    records[5]["HisItemTitles"] = records[5]["HisItemTitles"] + ["extra"]
    with pytest.raises(InputError, match=r"row 5: .* HisItemIDs but .* HisItemTitles"):
        tokenize_dataset(datasets.Dataset.from_list(records), build_processor(tokenizer), batch_size=4)
    with pytest.raises(ValueError, match=r"templates\[0\]: a template must name the target"):
        ThinkRecProcessor(tokenizer, templates=["A user liked <ItemTitleList>.\n#Answer:"])
    with pytest.raises(ValueError, match=r"templates\[0\] \(<ItemNoun>/<ItemNounPlural>\): item_noun must be"):
        ThinkRecProcessor(tokenizer, templates=["The <ItemNoun> <TargetItemTitle>?"], item_noun="")


def test_records_are_tokenised_once_and_cached_under_the_processors_settings(tokenizer, tmp_path):
    datasets.Dataset.from_list(parity_records(seed=7)).save_to_disk(tmp_path / "records")
    rows = datasets.load_from_disk(tmp_path / "records")  # file-backed, like load_dataset's splits
    processor = build_processor(tokenizer, template="collaborative")
    encoded = tokenize_dataset(rows, processor, keep_columns=METRIC_COLUMNS)
    assert set(encoded.column_names) == {*METRIC_COLUMNS, "prompt_ids", "answer_ids", "user_slot_ids", "item_slot_ids",
                                         "history_item_ids", "prompt_length", "answer_length"}
    calls = []
    encode_columns = processor.encode_columns
    processor.encode_columns = lambda *args: calls.append(1) or encode_columns(*args)
    again = tokenize_dataset(rows, processor, keep_columns=METRIC_COLUMNS)
    assert not calls and again.cache_files == encoded.cache_files, "the second epoch / run reads the cache"
    other = tokenize_dataset(rows, build_processor(tokenizer, template="collaborative", max_prompt_tokens=90), keep_columns=METRIC_COLUMNS)
    assert other.cache_files != encoded.cache_files, "other settings, other cache"


def hub_folder(tmp_path):
    """A small-format checkpoint (LoRA model around a backbone folder) with its processor."""
    tokenizer = make_tokenizer(with_slots=False)
    tiny_llama(len(tokenizer), hidden_size=32, num_attention_heads=2, seed=3).save_pretrained(tmp_path / "backbone")
    language_model = AutoModelForCausalLM.from_pretrained(tmp_path / "backbone")
    from modeling_thinkrec import ThinkRecForCausalLM

    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, make_cf_checkpoint("mf", 0))
    model.add_lora()
    processor = build_processor(tokenizer, template="collaborative", reason_template="reflection", history_item_slots=True,
                                max_prompt_tokens=512)
    folder = tmp_path / "repo"
    model.eval().save_pretrained(folder)
    assert (folder / "processing_thinkrec.py").is_file(), "the model's save_pretrained carries the processor's code"
    processor.save_pretrained(folder)
    return folder, model, processor


# The README's "Publishing / Hub example", run as written (with `repo` pointing at a saved folder).
HUB_EXAMPLE = """
from transformers import AutoModelForCausalLM, AutoProcessor

processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
record = {"UserID": 4, "HisItemIDs": [10, 3, 7], "HisItemTitles": ["Heat (1995)", "Fargo (1996)", "Alien (1979)"],
          "TargetItemID": 5, "TargetItemTitle": "Big (1988)"}
p_yes = model.score(**processor(record)).item()
prompt = processor(record, mode="reason")
reason = processor.decode(model.generate(**prompt, max_new_tokens=128)[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
"""


def test_the_readme_hub_example_runs_in_a_fresh_interpreter(tmp_path):
    folder, model, processor = hub_folder(tmp_path)
    script = BLOCK_REPOSITORY_IMPORTS + f"repo = {str(folder)!r}\n" + HUB_EXAMPLE + (
        "import json\n"
        "print(json.dumps({'p_yes': p_yes, 'reason': reason, 'processor': type(processor).__module__,"
        " 'model': type(model).__module__}))\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["processor"].startswith("transformers_modules.") and found["model"].startswith("transformers_modules.")
    record = {"UserID": 4, "HisItemIDs": [10, 3, 7], "HisItemTitles": ["Heat (1995)", "Fargo (1996)", "Alien (1979)"],
              "TargetItemID": 5, "TargetItemTitle": "Big (1988)"}
    assert found["p_yes"] == pytest.approx(model.score(**processor(record)).item(), abs=1e-5)
    assert isinstance(found["reason"], str)


def test_evaluation_groups_rows_by_length_and_keeps_metrics_and_order(tmp_path):
    model, tokenizer = make_model("mf", seed=2)
    records = make_records(37, seed=9, modes=("rec",), max_history=9)
    for record in records:
        record["not_cold"] = record["UserID"] % 2
    processor = build_processor(tokenizer, template="collaborative", history_item_slots=True)
    raw = datasets.Dataset.from_list(records)
    encoded = tokenize_dataset(raw, processor, keep_columns=METRIC_COLUMNS)
    order = length_order(encoded)
    assert length_order(raw) is None and sorted(order.tolist()) == list(range(len(records)))
    lengths = np.asarray(encoded["prompt_length"])
    assert (np.diff(lengths[order]) <= 0).all(), "longest prompts first"
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, remove_unused_columns=False,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    results = {}
    for name, dataset in (("sequential", raw), ("grouped", encoded)):
        trainer = ThinkRecTrainer(model=model, args=args, data_collator=ThinkRecCollator(processor=processor),
                                  compute_metrics=metrics_for(dataset))
        assert isinstance(trainer._get_eval_sampler(dataset), LengthSortedSampler) == (name == "grouped")
        results[name] = trainer.predict(dataset)
    np.testing.assert_allclose(results["grouped"].predictions, results["sequential"].predictions, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(results["grouped"].label_ids, [record["label"] for record in records])
    # Ranking metrics are the same; timings and Trainer's batch-mean loss (its last, short batch holds other rows) are not.
    metric_names = [key for key in results["sequential"].metrics if not key.endswith(("runtime", "per_second", "time", "_loss"))]
    assert "test_auc" in metric_names and "test_uauc" in metric_names
    for key in metric_names:
        assert results["grouped"].metrics[key] == pytest.approx(results["sequential"].metrics[key], abs=1e-6), key

    def padding(indices):
        batches = [indices[i : i + 4] for i in range(0, len(indices), 4)]
        total = sum(len(batch) * int(lengths[batch].max()) for batch in batches)
        return 1 - lengths.sum() / total

    assert padding(order) < padding(np.arange(len(records)))


# ------------------------------------------------------------------------------------------ keywords


def keyword_record(record: dict) -> dict:
    """`record` with keywords for its target and every history item (item i -> kw<i>a, kw<i>b)."""
    words = lambda item: [f"kw{item}a", f"kw{item}b"]  # noqa: E731
    return {**record, "TargetItemKeywords": words(record["TargetItemID"]),
            "HisItemKeywords": [words(item) for item in record["HisItemIDs"]]}


def test_titles_are_shown_with_their_keywords_when_asked(tokenizer):
    record = keyword_record(make_records(1, seed=3, max_history=3)[0])
    plain = build_processor(tokenizer, template="text_only")
    with_keywords = build_processor(tokenizer, template="text_only", title_keywords=1)
    decode = lambda processor: tokenizer.decode(processor.encode([record], with_answers=False)["prompt_ids"][0])  # noqa: E731
    text = decode(with_keywords)
    target, first = record["TargetItemID"], record["HisItemIDs"][0]
    assert f'"{record["TargetItemTitle"]}" (kw{target}a)' in text
    assert f'"{record["HisItemTitles"][0]}" (kw{first}a)' in text and f"kw{first}b" not in text
    # Without the setting the same record renders as before, keywords ignored.
    assert "kw" not in decode(plain)


def test_the_target_keywords_placeholder_and_missing_keywords(tokenizer, tmp_path):
    template = tmp_path / "keywords.txt"
    template.write_text("Would the user enjoy <TargetItemTitle> (about <TargetItemKeywords>)? Answer:\n")
    processor = build_processor(tokenizer, template=str(template))
    record = make_records(2, seed=4, max_history=2)
    text = tokenizer.decode(processor.encode([keyword_record(record[0])], with_answers=False)["prompt_ids"][0])
    target = record[0]["TargetItemID"]
    assert text.endswith(f'(about kw{target}a, kw{target}b)? Answer:')
    with pytest.raises(ValueError, match=r"row 1: the prompts show item keywords .* no \['TargetItemKeywords', 'HisItemKeywords'\]"):
        processor.encode([keyword_record(record[0]), record[1]], with_answers=False)


def test_the_budget_still_holds_with_keywords_after_every_title(tokenizer):
    records = [keyword_record(record) for record in make_records(12, seed=5, max_history=9)]
    processor = build_processor(tokenizer, template="collaborative", title_keywords=2, max_prompt_tokens=130)
    encoded = processor.encode(records, with_answers=False)
    assert max(encoded["prompt_length"]) <= 130
    # The most recent titles are the ones kept: each kept prompt ends its list with the newest item.
    for record, ids in zip(records, encoded["prompt_ids"]):
        if record["HisItemIDs"]:
            assert f'"{record["HisItemTitles"][-1]}"' in tokenizer.decode(ids)
