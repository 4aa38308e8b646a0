"""ThinkRecProcessor.recommend and recommend.py: the top-k of a user's candidates ranked as scoring each
alone ranks them (ties in input order), reasons that start with their score's verdict, the command's
table, the Hub path in a fresh interpreter with the repository blocked, and each bad input as one
message naming the user or item."""

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from _tiny_model import NUM_ITEMS, NUM_USERS, TITLES, make_cf_checkpoint, make_model, make_tokenizer
from test_modeling import BLOCK_REPOSITORY_IMPORTS
from transformers import AutoModelForCausalLM

import recommend
from data_collator import build_processor
from modeling_thinkrec import ThinkRecForCausalLM
from processing_thinkrec import ProcessorInputError, ThinkRecProcessor
from thinkrec.training.backbones import tiny_llama


USER = {"UserID": 4, "HisItemIDs": [10, 3, 7], "HisItemTitles": [TITLES[10], TITLES[3], TITLES[7]], "HisItemLabels": [1, 0, 1]}
CANDIDATES = [{"TargetItemID": item, "TargetItemTitle": TITLES[item]} for item in (5, 12, 1, 20, 8, 27, 14, 2, 30)]
ITEMS = {item: TITLES[item] for item in range(1, NUM_ITEMS)}
# The model's own score tolerance between shared-prefix and per-row scoring (fp32).
TOLERANCE = 1e-5


def alone_scores(model, processor, user, candidates) -> list[float]:
    """P(Yes) of every candidate from its own `model.score` call (the README's Hub example, one row)."""
    return [model.score(**processor({**user, **candidate})).item() for candidate in candidates]


def assert_ranked_as_alone(top, alone, candidates):
    """`top` holds the best len(top) candidates by `alone` scores, in their order (swaps only between scores
    closer than the tolerance), with those scores."""
    expected = sorted(range(len(candidates)), key=lambda i: -alone[i])
    position = {candidate["TargetItemID"]: i for i, candidate in enumerate(candidates)}
    assert [item.rank for item in top] == list(range(1, len(top) + 1))
    for item, best in zip(top, expected):
        index = position[item.item_id]
        assert item.title == candidates[index]["TargetItemTitle"]
        assert item.score == pytest.approx(alone[index], abs=TOLERANCE)
        assert alone[index] == pytest.approx(alone[best], abs=2 * TOLERANCE), "same order as scoring alone"
    assert [item.score for item in top] == sorted((item.score for item in top), reverse=True)


@pytest.fixture(scope="module")
def mf():
    model, tokenizer = make_model("mf", seed=2)
    return model, build_processor(tokenizer, template="collaborative", reason_template="reflection", history_item_slots=True)


@pytest.mark.parametrize("cf_model_type,template", [("mf", "collaborative"), ("sasrec", "collaborative"), ("none", "text_only")])
def test_recommend_ranks_as_scoring_each_candidate_alone(cf_model_type, template, monkeypatch):
    model, tokenizer = make_model(cf_model_type, seed=3)
    processor = build_processor(tokenizer, template=template, history_item_slots=cf_model_type != "none")
    calls, score = [], model.score
    monkeypatch.setattr(model, "score", lambda **batch: calls.append((batch["input_ids"].shape[0], batch["shared_prefix"])) or score(**batch))
    top = processor.recommend(model, USER, CANDIDATES, top_k=len(CANDIDATES), batch_size=4)
    assert calls == [(4, True), (4, True), (1, True)], "batches of one user's candidates, scored from a shared prefix"
    monkeypatch.undo()
    alone = alone_scores(model, processor, USER, CANDIDATES)
    assert_ranked_as_alone(top, alone, CANDIDATES)
    # top_k cuts the same ranking; bare ids with an item table rank the same items.
    first = processor.recommend(model, USER, [c["TargetItemID"] for c in CANDIDATES], top_k=3, items=ITEMS, batch_size=4)
    assert [asdict(item) for item in first] == [asdict(item) for item in top[:3]]


def test_ties_keep_the_candidates_order(mf):
    _, processor = mf

    class FixedScores:
        """A model whose score() returns given P(Yes) values, batch after batch."""

        device = torch.device("cpu")

        def __init__(self, scores):
            self.scores = list(scores)

        def score(self, shared_prefix, **batch):
            rows = batch["input_ids"].shape[0]
            taken, self.scores = self.scores[:rows], self.scores[rows:]
            return torch.tensor(taken)

    ids = [c["TargetItemID"] for c in CANDIDATES[:5]]
    top = processor.recommend(FixedScores([0.2, 0.5, 0.5, 0.1, 0.5]), USER, ids, top_k=4, items=ITEMS, batch_size=2)
    assert [item.item_id for item in top] == [ids[1], ids[2], ids[4], ids[0]]
    top = processor.recommend(FixedScores([0.3] * 5), USER, ids[::-1], top_k=5, items=ITEMS)
    assert [item.item_id for item in top] == ids[::-1]


def test_a_user_without_history_is_scored_as_model_score_scores_such_a_record(mf, caplog):
    model, processor = mf
    user = {"UserID": 6, "HisItemIDs": [], "HisItemTitles": []}
    with caplog.at_level(logging.WARNING):
        top = processor.recommend(model, user, CANDIDATES, top_k=len(CANDIDATES))
    assert "user 6 has no history" in caplog.text
    assert_ranked_as_alone(top, alone_scores(model, processor, user, CANDIDATES), CANDIDATES)


def test_reasons_start_with_the_verdict_of_their_score(mf, monkeypatch):
    import run_thinkrec

    model, processor = mf
    ranked = processor.recommend(model, USER, CANDIDATES, top_k=4)
    threshold = (ranked[1].score + ranked[2].score) / 2  # two Yes, two No
    generate_calls, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: generate_calls.append(kwargs["input_ids"].shape[0]) or generate(**kwargs))
    top = processor.recommend(model, USER, CANDIDATES, top_k=4, reasons=True, max_new_tokens=3, threshold=threshold, batch_size=2)
    assert generate_calls == [2, 2]
    assert [item.item_id for item in top] == [item.item_id for item in ranked]
    assert [item.reason[: 4 if item.reason.startswith("Yes") else 3] for item in top] == ["Yes.", "Yes.", "No.", "No."], [item.reason for item in top]
    assert all(item.reason is None for item in ranked)
    # The verdict is forced as run_thinkrec.py's predict forces it: the same texts from the same scores.
    monkeypatch.undo()
    records = [{**USER, **next(c for c in CANDIDATES if c["TargetItemID"] == item.item_id)} for item in top]
    logits = [math.log(item.score / (1 - item.score)) for item in top]
    assert run_thinkrec.generate_reasons(model, processor, records, logits, threshold, 3, 2) == [item.reason for item in top]


def test_keywords_come_with_the_candidates_and_the_user(mf):
    model, _ = mf
    processor = build_processor(make_tokenizer(), template="collaborative", title_keywords=1)
    items = {item: {"TargetItemTitle": TITLES[item], "TargetItemKeywords": [f"kw{item}"]} for item in range(1, NUM_ITEMS)}
    user = {**USER, "HisItemKeywords": [[f"kw{item}"] for item in USER["HisItemIDs"]]}
    records = processor.recommendation_records(user, [5, 12], 2, items)
    assert [record["TargetItemKeywords"] for record in records] == [["kw5"], ["kw12"]]
    assert "(kw12)" in processor.tokenizer.decode(processor(records)["input_ids"][1])
    with pytest.raises(ProcessorInputError, match=r"row \(user 4, candidate 5\): the prompts show item keywords .* \['HisItemKeywords'\]"):
        processor.recommend(model, USER, [5, 12], top_k=1, items=items)


BAD_INPUTS = [
    ({"candidates": [5, 99]}, r"user 4: candidate 99 is not in the item table \(30 items\)\."),
    ({"candidates": [{"TargetItemID": 5}], "items": None}, r"user 4: candidate 5 has no title \(TargetItemTitle: none\); give its TargetItemTitle, or pass `items`"),
    ({"candidates": [{"TargetItemID": 5, "TargetItemTitle": " "}], "items": None}, r"user 4: candidate 5 has no title \(TargetItemTitle: ' '\)"),
    ({"candidates": [5, 12], "items": None}, r"user 4: candidate 5 has no title .* pass `items` \(item id -> title\)"),
    ({"candidates": [{"TargetItemTitle": "Big"}]}, r"user 4: candidate at position 0 has no TargetItemID"),
    ({"candidates": ["5"]}, r"user 4: candidate at position 0 is '5'; expected a mapping with TargetItemID"),
    ({"candidates": [5, 12, {"TargetItemID": 5, "TargetItemTitle": "Again"}]}, r"user 4: candidate 5 is listed twice \(positions 0 and 2\)"),
    ({"candidates": [5, 12, 1], "top_k": 5}, r"user 4: top_k=5 is more than the 3 candidates; ask for at most 3\."),
    ({"candidates": [5, 12], "top_k": 0}, r"user 4: top_k must be an integer >= 1, got 0\."),
    ({"candidates": []}, r"user 4: the candidate list is empty"),
    ({"candidates": 5}, r"user 4: candidates must be a list of items, found int"),
    ({"user": {"UserID": 4, "HisItemIDs": [3]}}, r"user 4: missing fields \['HisItemTitles'\]; a user record needs"),
    ({"user": {**USER, "TargetItemID": 5}}, r"user 4: the user record holds \['TargetItemID'\]; the targets are the candidates"),
    ({"user": {**USER, "HisItemTitles": [TITLES[10]]}}, r"row \(user 4, candidate 5\): 3 HisItemIDs but 1 HisItemTitles"),
]


BAD_INPUT_IDS = ["not-in-item-table", "no-title", "blank-title", "bare-id-without-items", "no-id", "not-an-id", "duplicate",
                 "top-k-over-pool", "top-k-zero", "empty-list", "not-a-list", "user-without-titles", "user-with-target",
                 "history-mismatch"]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=BAD_INPUT_IDS)
def test_bad_input_is_one_message_naming_the_user_or_item(mf, change, message):
    model, processor = mf
    arguments = {"user": USER, "candidates": [5, 12], "top_k": 1, "items": ITEMS, **change}
    with pytest.raises(ProcessorInputError, match=message):
        processor.recommend(model, arguments.pop("user"), arguments.pop("candidates"), **arguments)


def test_ids_outside_the_cf_tables_are_the_models_own_message_with_the_user_and_candidates(mf):
    model, processor = mf
    outside = [{"TargetItemID": 5, "TargetItemTitle": TITLES[5]}, {"TargetItemID": NUM_ITEMS + 3, "TargetItemTitle": "Unknown"}]
    with pytest.raises(ProcessorInputError, match=rf"user 4, candidates \[5, {NUM_ITEMS + 3}\] \(batch rows 0..1\): item_slot_ids: "
                                                  rf"row 1 holds id {NUM_ITEMS + 3}, outside the CF table \(0..{NUM_ITEMS - 1}\)"):
        processor.recommend(model, USER, outside, top_k=1)
    with pytest.raises(ProcessorInputError, match=rf"user {NUM_USERS + 2}, candidates \[5\] .*user_slot_ids: row 0 holds id {NUM_USERS + 2}"):
        processor.recommend(model, {**USER, "UserID": NUM_USERS + 2}, [5], top_k=1, items=ITEMS)


# ------------------------------------------------------------------------------------------ saved folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small-format checkpoint (LoRA model around a backbone folder) with its processor, and the input files."""
    root = tmp_path_factory.mktemp("recommend")
    tokenizer = make_tokenizer(with_slots=False)
    tiny_llama(len(tokenizer), hidden_size=32, num_attention_heads=2, seed=5).save_pretrained(root / "backbone")
    model = ThinkRecForCausalLM.from_language_model(AutoModelForCausalLM.from_pretrained(root / "backbone"), tokenizer,
                                                    make_cf_checkpoint("mf", 1))
    model.add_lora()
    processor = build_processor(tokenizer, template="collaborative", reason_template="reflection", history_item_slots=True)
    model.eval().save_pretrained(root / "repo")
    processor.save_pretrained(root / "repo")
    (root / "user.json").write_text(json.dumps(USER))
    (root / "user.jsonl").write_text(json.dumps(USER) + "\n")
    (root / "candidates.txt").write_text("\n".join(str(c["TargetItemID"]) for c in CANDIDATES) + "\n")
    (root / "candidates.json").write_text(json.dumps(CANDIDATES))
    (root / "items.jsonl").write_text("".join(json.dumps({"ItemID": item, "title": title}) + "\n" for item, title in ITEMS.items()))
    return root


def expected_top(folder, top_k, **kwargs):
    model = ThinkRecForCausalLM.from_pretrained(folder).eval()
    return ThinkRecProcessor.from_pretrained(folder).recommend(model, USER, CANDIDATES, top_k=top_k, **kwargs)


def test_the_command_prints_the_top_k_table_with_reasons(saved, capsys):
    recommend.main(["--model_dir", str(saved / "repo"), "--user", str(saved / "user.jsonl"), "--candidates",
                    str(saved / "candidates.txt"), "--items", str(saved / "items.jsonl"), "--top_k", "3", "--reasons",
                    "--max_new_tokens", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    expected = expected_top(saved / "repo", 3, reasons=True, max_new_tokens=3)
    assert lines[0] == f"top 3 of {len(CANDIDATES)} candidates for user 4 ({saved / 'repo'})"
    assert lines[1].split() == ["rank", "item", "id", "P(Yes)", "title", "reason"] and set(lines[2]) == {"-"}
    for line, item in zip(lines[3:6], expected):
        rank, item_id, score, rest = line.split(maxsplit=3)
        assert (int(rank), int(item_id), score) == (item.rank, item.item_id, f"{item.score:.4f}")
        assert rest.startswith(item.title) and rest.endswith(" ".join(item.reason.split()))
    result = json.loads(lines[6])
    assert [entry["item_id"] for entry in result["recommendations"]] == [item.item_id for item in expected]
    assert result["recommendations"][0]["reason"].startswith(("Yes.", "No."))


COMMAND_ERRORS = [
    (["--candidates", "candidates.txt", "--items", "items.jsonl", "--top_k", "12"], f"user 4: top_k=12 is more than the {len(CANDIDATES)} candidates"),
    (["--candidates", "bad_ids.txt", "--items", "items.jsonl", "--top_k", "1"], "bad_ids.txt line 2: '12,' is not an item id"),
    (["--candidates", "unknown.txt", "--items", "items.jsonl", "--top_k", "1"], "user 4: candidate 99 is not in the item table (30 items)."),
    (["--candidates", "candidates.txt", "--top_k", "1"], "user 4: candidate 5 has no title (TargetItemTitle: none); give its TargetItemTitle, or pass `items`"),
    (["--candidates", "outside.json", "--top_k", "1"], f"user 4, candidates [5, {NUM_ITEMS + 3}] (batch rows 0..1): item_slot_ids: row 1 holds id "
                                       f"{NUM_ITEMS + 3}, outside the CF table"),
    (["--candidates", "candidates.json", "--top_k", "0"], "top_k must be >= 1, got 0."),
    (["--user", "two_users.jsonl", "--candidates", "candidates.json"], "two_users.jsonl: holds 2 records; --user takes one user record"),
]


@pytest.mark.parametrize("flags,message", COMMAND_ERRORS, ids=["top-k-over-pool", "not-an-id-line", "not-in-item-table", "no-title", "outside-cf-table", "top-k-zero",
                              "two-users"])
def test_the_command_stops_on_bad_input_with_one_line(saved, capsys, flags, message):
    (saved / "bad_ids.txt").write_text("5\n12,\n")
    (saved / "unknown.txt").write_text("5\n99\n")
    (saved / "two_users.jsonl").write_text(json.dumps(USER) + "\n" + json.dumps({**USER, "UserID": 5}) + "\n")
    (saved / "outside.json").write_text(json.dumps([CANDIDATES[0], {"TargetItemID": NUM_ITEMS + 3, "TargetItemTitle": "Unknown"}]))
    flags = [str(saved / flag) if os.path.exists(saved / flag) else flag for flag in flags]
    with pytest.raises(SystemExit) as stopped:
        recommend.run_command(recommend.main, ["--model_dir", str(saved / "repo"), "--user", str(saved / "user.json"), *flags])
    assert stopped.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


# The method from a saved folder in a fresh interpreter, the repository's own modules blocked (a Hub user's view).
HUB_RECOMMEND = """
import json
from dataclasses import asdict
from transformers import AutoModelForCausalLM, AutoProcessor
REPOSITORY_MODULES |= {"prefix_thinkrec", "recommend", "reflect", "judge_reasons", "compare_predictions"}

processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
top = processor.recommend(model, user, candidates, top_k=3, reasons=True, max_new_tokens=3)
print(json.dumps({"top": [asdict(item) for item in top], "processor": type(processor).__module__,
                  "model": type(model).__module__}))
"""


def test_recommend_runs_from_a_saved_folder_without_the_repository(saved):
    script = (BLOCK_REPOSITORY_IMPORTS + f"repo = {str(saved / 'repo')!r}\nuser = {USER!r}\ncandidates = {CANDIDATES!r}\n"
              + HUB_RECOMMEND)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(saved / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=saved, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["processor"].startswith("transformers_modules.") and found["model"].startswith("transformers_modules.")
    expected = expected_top(saved / "repo", 3, reasons=True, max_new_tokens=3)
    assert [entry["item_id"] for entry in found["top"]] == [item.item_id for item in expected]
    assert [entry["score"] for entry in found["top"]] == pytest.approx([item.score for item in expected], abs=TOLERANCE)
    assert [entry["reason"] for entry in found["top"]] == [item.reason for item in expected]
