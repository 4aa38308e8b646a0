"""ThinkRecCollator invariants: padding sides, masked labels, truncation that keeps question and
answer, empty histories, slot ids in order of appearance, mixed modes, templates."""

import doctest

import pytest
import torch
from _tiny_model import make_records, make_tokenizer

import data_collator
from data_collator import TEMPLATE_DIR, ThinkRecCollator, build_processor, load_templates
from thinkrec.utils.errors import InputError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def user_slot_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|user_slot|>")


def item_slot_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|item_slot|>")


def test_docstring_example_runs():
    result = doctest.testmod(data_collator, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_left_padded_prompts_right_padded_answers_and_masked_labels(tokenizer):
    records = make_records(6, seed=1)
    collator = ThinkRecCollator(tokenizer)
    batch = collator(records)
    encoded = collator.processor.encode(records)
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    answer_start = (labels != -100).int().argmax(-1)
    assert (answer_start == answer_start[0]).all(), "the last prompt position must be one column"
    start = int(answer_start[0])
    assert (mask[:, start - 1] == 1).all()
    for row, record in enumerate(records):
        prompt_ids, answer_ids = encoded["prompt_ids"][row], encoded["answer_ids"][row]
        prompt_mask, answer_mask = mask[row, :start], mask[row, start:]
        # Prompt: zeros then ones (left padding); answer: ones then zeros (right padding).
        assert prompt_mask.tolist() == [0] * (start - len(prompt_ids)) + [1] * len(prompt_ids)
        assert answer_mask.tolist() == [1] * len(answer_ids) + [0] * (len(answer_mask) - len(answer_ids))
        assert input_ids[row, start - len(prompt_ids) : start].tolist() == prompt_ids
        assert labels[row, :start].eq(-100).all()
        assert labels[row, start : start + len(answer_ids)].tolist() == answer_ids
        assert labels[row, start + len(answer_ids) :].eq(-100).all()
        assert answer_ids[-1] == tokenizer.eos_token_id
    assert batch["labels"].shape == input_ids.shape == mask.shape


def test_answers_follow_the_mode_and_both_modes_mix(tokenizer):
    records = make_records(4, seed=2)
    batch = ThinkRecCollator(tokenizer)(records)
    assert batch["mode"].tolist() == [0, 1, 0, 1]
    assert batch["target_labels"].dtype == torch.float32
    for row, record in enumerate(records):
        answer = tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != -100])
        expected = record["reason"] if record["mode"] == "reason" else ("Yes" if record["label"] else "No")
        assert answer == expected + tokenizer.eos_token
    assert batch["user_ids"].tolist() == [r["UserID"] for r in records]
    assert batch["item_ids"].tolist() == [r["TargetItemID"] for r in records]


def test_truncation_drops_oldest_history_and_keeps_question_and_answer(tokenizer):
    record = make_records(1, seed=3, modes=("reason",), max_history=5)[0]
    record["reason"] = "Yes. " + "A long reason that must never be cut. " * 20
    full_prompt = build_processor(tokenizer, history_item_slots=True).encode([record])["prompt_ids"][0]
    budget = len(full_prompt) - 12
    collator = ThinkRecCollator(tokenizer, history_item_slots=True, max_prompt_tokens=budget)
    batch = collator([record])
    labels = batch["labels"][0]
    prompt = batch["input_ids"][0][(labels == -100) & (batch["attention_mask"][0] == 1)]
    assert 0 < len(prompt) <= budget
    text = tokenizer.decode(prompt)
    titles = record["HisItemTitles"]
    kept = [title for title in titles if f'"{title}"' in text]
    assert kept and kept == titles[len(titles) - len(kept) :] and len(kept) < len(titles), "oldest dropped first"
    assert text.startswith("#Question:") and text.endswith("#Answer:")
    assert f'"{record["TargetItemTitle"]}"' in text
    assert tokenizer.decode(batch["input_ids"][0][labels != -100]) == record["reason"] + tokenizer.eos_token
    # History slots shrink with the titles; the target slot stays last.
    assert batch["item_slot_ids"][0].tolist() == record["HisItemIDs"][-len(kept) :] + [record["TargetItemID"]]
    assert int((prompt == item_slot_id(tokenizer)).sum()) == len(kept) + 1
    # The SASRec history is not cut by the text budget.
    assert batch["history_item_ids"][0].tolist() == record["HisItemIDs"]


def test_budget_below_the_question_raises_naming_the_row(tokenizer):
    records = make_records(3, seed=4)
    with pytest.raises(ValueError, match="row 0: the question without any history takes"):
        ThinkRecCollator(tokenizer, max_prompt_tokens=10)(records)


def test_empty_history_is_a_prompt_with_zero_history_slots(tokenizer):
    records = make_records(2, seed=5)
    records[1]["HisItemIDs"], records[1]["HisItemTitles"] = [], []
    batch = ThinkRecCollator(tokenizer, history_item_slots=True)(records)
    row = batch["input_ids"][1][batch["attention_mask"][1] == 1]
    assert int((row == item_slot_id(tokenizer)).sum()) == 1  # the target only
    assert batch["item_slot_ids"][1].tolist()[0] == records[1]["TargetItemID"]
    assert batch["item_slot_ids"][1, 1:].eq(0).all()
    assert batch["history_item_ids"][1].eq(0).all()
    assert "following movies: none." in tokenizer.decode(row)


def test_slot_ids_match_slot_tokens_in_order(tokenizer):
    records = make_records(5, seed=6)
    batch = ThinkRecCollator(tokenizer, history_item_slots=True)(records)
    for row, record in enumerate(records):
        tokens = batch["input_ids"][row]
        assert int((tokens == user_slot_id(tokenizer)).sum()) == int((batch["user_slot_ids"][row] != 0).sum()) == 1
        item_ids = batch["item_slot_ids"][row]
        assert int((tokens == item_slot_id(tokenizer)).sum()) == int((item_ids != 0).sum())
        assert item_ids[item_ids != 0].tolist() == record["HisItemIDs"] + [record["TargetItemID"]]
        history = batch["history_item_ids"][row]
        assert history[history != 0].tolist() == record["HisItemIDs"]
        assert history[: len(history) - len(record["HisItemIDs"])].eq(0).all(), "history is left-padded"


@pytest.mark.parametrize("template,reason_template", [("text_only", "reflection_text_only"), ("collaborative", "reflection")])
def test_reasoning_rows_get_the_prompt_that_asks_for_an_explanation(tokenizer, template, reason_template):
    records = make_records(4, seed=2)  # modes rec, reason, rec, reason
    collator = ThinkRecCollator(tokenizer, template=template, reason_template=reason_template)
    batch = collator(records)
    for row, record in enumerate(records):
        start = int((batch["labels"][row] != -100).int().argmax())
        prompt = tokenizer.decode(batch["input_ids"][row][:start][batch["attention_mask"][row][:start] == 1])
        assert ("explain the reason" in prompt) == (record["mode"] == "reason"), prompt
        assert prompt.rstrip().endswith("#Answer:")
    # The id slots still line up with the slot tokens in both kinds of prompt.
    assert (batch["input_ids"] == item_slot_id(tokenizer)).sum() == (batch["item_slot_ids"] > 0).sum()
    # Without reason_template every row shares the recommendation prompt (the earlier behaviour).
    plain = ThinkRecCollator(tokenizer, template=template)(records)
    assert not any("explain the reason" in tokenizer.decode(ids) for ids in plain["input_ids"])


def test_text_only_template_has_no_slots(tokenizer):
    batch = ThinkRecCollator(tokenizer, template="text_only")(make_records(3, seed=7))
    assert not (batch["input_ids"] == user_slot_id(tokenizer)).any()
    assert not (batch["input_ids"] == item_slot_id(tokenizer)).any()
    assert batch["user_slot_ids"].shape == (3, 0) and batch["item_slot_ids"].shape == (3, 0)


def test_prompt_only_batches_end_in_one_column(tokenizer):
    records = make_records(4, seed=8)
    batch = ThinkRecCollator(tokenizer, include_answers=False)(records)
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].eq(1).all()
    with_answers = ThinkRecCollator(tokenizer)(records)
    prompt_length = batch["input_ids"].shape[1]
    assert torch.equal(with_answers["input_ids"][:, :prompt_length], batch["input_ids"])


def test_chat_template_wraps_the_question(tokenizer):
    records = make_records(2, seed=9)
    batch = ThinkRecCollator(tokenizer, use_chat_template=True)(records)
    start = int((batch["labels"][0] != -100).int().argmax())
    prompt = tokenizer.decode(batch["input_ids"][0, :start][batch["attention_mask"][0, :start] == 1])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert "#Question:" in prompt
    custom = ThinkRecCollator(tokenizer, use_chat_template=True, system_prompt="You recommend movies.")(records)
    assert "You recommend movies." in tokenizer.decode(custom["input_ids"][0])


def test_several_tokens_per_id(tokenizer):
    batch = ThinkRecCollator(tokenizer, tokens_per_id=3)(make_records(2, seed=10))
    assert int((batch["input_ids"][0] == user_slot_id(tokenizer)).sum()) == 3
    assert batch["user_slot_ids"].shape == (2, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("TargetItemTitle"), r"row 1: missing fields \['TargetItemTitle'\]"),
        (lambda r: r.update(mode="explain"), "row 1: mode must be one of"),
        (lambda r: r.update(mode="reason", reason=""), "row 1: mode is 'reason' but the 'reason' field is empty"),
        (lambda r: r.update(HisItemTitles=r["HisItemTitles"] + ["extra"]), "row 1: .* HisItemIDs but .* HisItemTitles"),
        (lambda r: r.update(label=2), "row 1: label must be 0 or 1"),
    ],
)
def test_bad_records_raise_naming_row_and_field(tokenizer, change, message):
    records = make_records(2, seed=11)
    change(records[1])
    with pytest.raises(ValueError, match=message):
        ThinkRecCollator(tokenizer)(records)


def test_the_collator_pads_with_the_processor_it_is_given(tokenizer, monkeypatch):
    """One renderer: the collator encodes raw rows with its processor and builds none of its own."""
    processor = build_processor(tokenizer, template="text_only", history_item_slots=True)
    collator = ThinkRecCollator(processor=processor)
    assert collator.processor is processor
    records = make_records(4, seed=12)
    features = processor.encode_features(records[:2])
    calls = []
    encode_features = processor.encode_features
    monkeypatch.setattr(processor, "encode_features", lambda records, **kwargs: calls.append(kwargs["rows"]) or encode_features(records, **kwargs))
    mixed = collator(features + records[2:])  # encoded rows are only padded; the raw ones go through the processor
    assert calls == [[2, 3]]
    expected = processor.pad(encode_features(records))
    assert sorted(mixed) == sorted(expected) and all(torch.equal(mixed[name], expected[name]) for name in expected)


def test_a_processor_and_settings_together_are_refused(tokenizer):
    processor = build_processor(tokenizer)
    with pytest.raises(ValueError, match=r"given a processor, \['template'\] would be ignored"):
        ThinkRecCollator(processor=processor, template="text_only")
    with pytest.raises(ValueError, match=r"given a processor, \['tokenizer'\] would be ignored"):
        ThinkRecCollator(tokenizer, processor=processor)
    with pytest.raises(ValueError, match="needs a processor, or a tokenizer"):
        ThinkRecCollator()


def test_tokenizer_without_slot_tokens_is_rejected():
    with pytest.raises(ValueError, match="slot token '<\\|user_slot\\|>' is not in the tokenizer"):
        ThinkRecCollator(make_tokenizer(with_slots=False))


def test_template_files(tmp_path):
    for name in ("text_only", "collaborative", "reflection"):
        templates = load_templates(name)
        assert len(templates) == 1 and templates[0].endswith("\n#Answer:")
        assert "<ItemTitleList>" in templates[0] and "<TargetItemTitle>" in templates[0]
    assert "<UserID>" in load_templates("collaborative")[0] and "<TargetItemID>" in load_templates("collaborative")[0]
    custom = tmp_path / "two.txt"
    custom.write_text("Q1 <TargetItemTitle>\\n#Answer:\n\nQ2 <TargetItemID>\\n#Answer:\n")
    assert load_templates(str(custom)) == ["Q1 <TargetItemTitle>\n#Answer:", "Q2 <TargetItemID>\n#Answer:"]
    with pytest.raises(FileNotFoundError, match="not one of"):
        load_templates("no_such_template")
    assert TEMPLATE_DIR.endswith("templates")


def test_sasrec_history_keeps_only_liked_items(tokenizer):
    """ThinkRec-style histories carry dislikes too; SASRec was trained on liked items only."""
    collator = ThinkRecCollator(tokenizer, template="collaborative")
    record = {"UserID": 1, "HisItemIDs": [4, 5, 6], "HisItemTitles": ["A (1990)", "B (1991)", "C (1992)"],
              "HisItemLabels": [1, 0, 1], "TargetItemID": 7, "TargetItemTitle": "D (1993)", "label": 1,
              "mode": "rec", "reason": ""}
    assert collator([record])["history_item_ids"].tolist() == [[4, 6]]


def _prompt_text(tokenizer, batch, row=0):
    ids = batch["input_ids"][row][batch["attention_mask"][row] == 1]
    return tokenizer.decode(ids)


def labelled_record(labels=(1, 0, 1), **changes):
    titles = ["A (1990)", "B (1991)", "C (1992)"]
    record = {"UserID": 1, "HisItemIDs": [4, 5, 6], "HisItemTitles": titles, "HisItemLabels": list(labels),
              "TargetItemID": 7, "TargetItemTitle": "D (1993)", "label": 1, "mode": "rec", "reason": ""}
    return dict(record, **changes)


@pytest.mark.parametrize("template", ["text_only", "collaborative", "reflection", "reflection_text_only"])
def test_disliked_history_items_are_not_shown_as_liked(tokenizer, template):
    """history_mode='all' histories: liked and disliked titles each under their own words."""
    batch = ThinkRecCollator(tokenizer, template=template, include_answers=False)([labelled_record()])
    text = _prompt_text(tokenizer, batch)
    assert 'high ratings to the following movies: "A (1990)", "C (1992)". ' in text
    assert 'low ratings to the following movies: "B (1991)". ' in text
    assert text.count('"B (1991)"') == 1


def test_liked_and_disliked_lists_carry_their_id_slots_in_order(tokenizer):
    batch = ThinkRecCollator(tokenizer, template="collaborative", history_item_slots=True)([labelled_record()])
    assert batch["item_slot_ids"][0].tolist() == [4, 6, 5, 7]  # liked, disliked, then the target
    assert int((batch["input_ids"][0] == item_slot_id(tokenizer)).sum()) == 4
    assert batch["history_item_ids"][0].tolist() == [4, 6]  # SASRec still reads liked items only


def test_a_history_of_liked_items_renders_as_the_published_prompt(tokenizer):
    liked = labelled_record(labels=(1, 1, 1))
    unlabelled = {key: value for key, value in liked.items() if key != "HisItemLabels"}
    for record in (liked, unlabelled):
        text = _prompt_text(tokenizer, ThinkRecCollator(tokenizer, template="text_only", include_answers=False)([record]))
        assert text.startswith('#Question: A user has given high ratings to the following movies: "A (1990)", "B (1991)", '
                               '"C (1992)". Leverage the information to predict whether the user would enjoy the movie titled '
                               '"D (1993)"?')
    only_disliked = _prompt_text(tokenizer, ThinkRecCollator(tokenizer, template="text_only")([labelled_record(labels=(0, 0, 0))]))
    assert "following movies: none. The user has given low ratings to the following movies:" in only_disliked


def test_a_template_asking_for_disliked_titles_needs_labelled_histories(tokenizer, tmp_path):
    custom = tmp_path / "liked_disliked.txt"
    custom.write_text('Liked: <LikedItemTitleList>; disliked: <DislikedItemTitleList>. Would they like <TargetItemTitle>?\\n#Answer:\n'
                      "\n"
                      'Liked: <LikedItemTitleList>; disliked: <DislikedItemTitleList>. And <TargetItemTitle>?\\n#Answer:\n')
    collator = ThinkRecCollator(tokenizer, template=str(custom), include_answers=False)
    text = _prompt_text(tokenizer, collator([labelled_record(labels=(0, 1, 1))]))
    assert 'Liked: "B (1991)", "C (1992)"; disliked: "A (1990)".' in text
    unlabelled = {key: value for key, value in labelled_record().items() if key != "HisItemLabels"}
    with pytest.raises(InputError, match=r"liked_disliked.txt line [13]: the template asks for disliked titles "
                                         r"\(<DislikedItemTitleList>\) but row 1 has no HisItemLabels"):
        collator([labelled_record(), unlabelled])


def test_item_nouns_fill_the_templates(tokenizer):
    collator = ThinkRecCollator(tokenizer, template="collaborative", reason_template="reflection", item_noun="game",
                                item_noun_plural="games")
    batch = collator([labelled_record(), labelled_record(mode="reason", reason="Yes. Fun.")])
    for row in range(2):
        text = _prompt_text(tokenizer, batch, row)
        assert "following games:" in text and 'the game titled "D (1993)"' in text
        assert "movie" not in text.lower()
    for name in ("text_only", "collaborative", "reflection", "reflection_text_only"):
        assert not any(word in load_templates(name)[0].lower() for word in ("movie", "film"))


@pytest.mark.parametrize("nouns", [{"item_noun": None}, {"item_noun_plural": ""}])
def test_a_template_naming_items_needs_the_item_noun(tokenizer, nouns):
    with pytest.raises(InputError, match=r"templates/text_only.txt line 1 \(<ItemNoun>/<ItemNounPlural>\): item_noun"):
        ThinkRecCollator(tokenizer, template="text_only", **nouns)


def test_unbalanced_if_disliked_block_names_the_line(tmp_path):
    custom = tmp_path / "broken.txt"
    custom.write_text("Likes <ItemTitleList>.<IfDisliked> Dislikes <DislikedItemTitleList>. <TargetItemTitle>?\\n#Answer:\n")
    with pytest.raises(InputError, match=r"broken.txt line 1: every <IfDisliked> needs its own </IfDisliked>"):
        load_templates(str(custom))


def test_history_labels_must_match_the_history(tokenizer):
    with pytest.raises(InputError, match=r"row 0: 3 HisItemIDs but 2 HisItemLabels"):
        ThinkRecCollator(tokenizer)([labelled_record(labels=(1, 0))])
