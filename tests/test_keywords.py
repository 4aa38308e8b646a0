"""Item keywords: extraction (MiniLM, TF-IDF, a teacher over a scripted OpenAI-compatible server),
storage in the item table, the command, and the prompts that show them."""

import json

import pandas as pd
import pytest
from _run_fixtures import write_records
from _scripted_server import ScriptedServer

import extract_keywords
from thinkrec.data.keywords import (
    KEYWORD_PROMPT,
    attach_keywords,
    candidate_phrases,
    item_keywords,
    minilm_keywords,
    parse_keywords,
    save_item_keywords,
    teacher_keywords,
    tfidf_keywords,
)
from thinkrec.data.records import load_items, load_prepared
from thinkrec.reasons.remote_teacher import RemoteTeacher
from thinkrec.utils.errors import ExistingOutputError, InputError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyword_assets")
    write_records(root / "records")
    return {"records": root / "records"}


ITEMS = pd.DataFrame({
    "ItemID": [1, 2, 3, 4],
    "original_id": ["a", "b", "c", "d"],
    "title": ["Toy Story (1995)", "Heat (1995)", "", "Cold Mountain Heat (2003)"],
    "genres": ["Animation|Children's|Comedy", "Action|Crime|Thriller", "", "Drama|War"],
    "description": [None, "A heist crew in Los Angeles is hunted by a driven detective.", None, None],
})


def test_candidates_are_the_items_own_genres_and_ngrams_without_stopwords():
    phrases = candidate_phrases(ITEMS.iloc[1].to_dict())
    assert phrases[:3] == ["action", "crime", "thriller"]
    assert {"heat", "heist", "heist crew", "los angeles", "driven detective"} <= set(phrases)
    assert not {"a", "in", "by", "is", "1995"} & set(phrases)


def test_minilm_keywords_come_from_the_item_and_items_without_metadata_get_none():
    keywords, counters = minilm_keywords(ITEMS, max_keywords=4)
    assert counters.items == 4 and counters.without_metadata == 1 and counters.with_keywords == 3
    assert keywords[3] == []
    for item_id in (1, 2, 4):
        words = keywords[item_id]
        assert 1 <= len(words) <= 4
        assert set(words) <= set(candidate_phrases(ITEMS[ITEMS.ItemID == item_id].iloc[0].to_dict()))
        # No keyword repeats the words of another one ("toy" next to "toy story").
        assert not any(a != b and set(a.split()) <= set(b.split()) for a in words for b in words), words


def test_tfidf_ranks_a_phrase_of_one_item_above_one_all_items_share():
    items = pd.DataFrame({"ItemID": [1, 2, 3], "title": ["Alpha Heist", "Beta Heist", "Gamma Heist"],
                          "genres": ["", "", ""], "description": [None, None, None]})
    keywords, counters = tfidf_keywords(items, max_keywords=2)
    assert counters.with_keywords == 3
    # "heist" is in every item (lowest idf); each item's own name and bigram come first.
    # Ties keep the text's order: the unigram, then the bigram (not subsumed: it adds "heist").
    assert keywords == {1: ["alpha", "alpha heist"], 2: ["beta", "beta heist"], 3: ["gamma", "gamma heist"]}


def test_teacher_answers_are_parsed_counted_and_cached_for_a_resumed_run(tmp_path):
    scripts = {
        "Toy Story": [("ok", "Keywords: 1. Toys, friendship; \"Pixar\"\n- rivalry.")],
        "Heat": [("ok", "")],  # empty every time: retried, then failed, never cached
        "Cold Mountain Heat": [("ok", "war, drama, civil war, love story, journey, nurse, deserter, mountains, "
                                      "letters, winter, snow, north carolina")],
    }
    cache = tmp_path / "keywords.cache.jsonl"
    with ScriptedServer(scripts) as server:
        teacher = RemoteTeacher(server.url, "scripted-model", concurrency=2, max_retries=1, backoff_base=0.01, backoff_max=0.02)
        keywords, counters = teacher_keywords(teacher, ITEMS, cache, "scripted-model", item_noun="movie", max_keywords=10)
        asked_first = list(server.requests)
        again, counters_again = teacher_keywords(teacher, ITEMS, cache, "scripted-model", item_noun="movie")
    assert keywords[1] == ["toys", "friendship", "pixar", "rivalry"]
    assert keywords[2] == [] and keywords[3] == []
    assert len(keywords[4]) == 10 and keywords[4][:3] == ["war", "drama", "civil war"]
    assert counters.without_metadata == 1 and counters.failed == 1 and counters.with_keywords == 2
    assert asked_first.count("Heat") == 2  # one retry
    # The second run asks only for the item that failed.
    assert server.requests[len(asked_first):] == ["Heat", "Heat"]
    assert counters_again.cached == 2 and again[1] == keywords[1]
    # The published prompt, on the item text cut to 100 words.
    assert KEYWORD_PROMPT.startswith("Extract up to ten key words")


def test_parse_keywords_drops_marks_quotes_long_phrases_and_duplicates():
    assert parse_keywords("1) Heist\n2) heist\n3) a phrase that is far too long to be one keyword; `LA`.") == ["heist", "la"]
    assert parse_keywords("") == [] and parse_keywords(None) == []


def test_keywords_are_stored_with_the_item_table_and_attached_to_rows(assets, tmp_path):
    import shutil

    import datasets

    records_dir = tmp_path / "records"
    shutil.copytree(assets["records"], records_dir)
    before = load_prepared(records_dir)
    old_items_file = records_dir / before.metadata["files"]["items"]
    first = int(before.items["ItemID"].iloc[0])
    path = save_item_keywords(records_dir, {first: ["heist", "crime"]}, {"method": "test"})
    assert path.is_file() and not old_items_file.exists()
    items = load_items(records_dir)
    assert list(items.loc[items.ItemID == first, "keywords"].iloc[0]) == ["heist", "crime"]
    assert json.loads((records_dir / "metadata.json").read_text())["item_keywords"] == {"method": "test"}
    # The dataset card points `load_dataset(folder, "items")` at the new file, keywords included.
    hub_items = datasets.load_dataset(str(records_dir), "items")["train"]
    assert hub_items.features["keywords"] == datasets.List(datasets.Value("string"))
    with pytest.raises(InputError, match="not in the item table"):
        save_item_keywords(records_dir, {10**6: ["x"]}, {})
    rows = attach_keywords(before.splits["test"].head(3), item_keywords(items))
    for _, row in rows.iterrows():
        assert len(row["HisItemKeywords"]) == len(row["HisItemIDs"])
        assert row["TargetItemKeywords"] == (["heist", "crime"] if row["TargetItemID"] == first else [])


def test_extract_keywords_command_writes_counts_and_refuses_to_overwrite(assets, tmp_path, capsys):
    import shutil

    records_dir = tmp_path / "records"
    shutil.copytree(assets["records"], records_dir)
    summary = extract_keywords.main(["--records_dir", str(records_dir), "--method", "tfidf", "--max_keywords", "3"])
    items = load_items(records_dir)
    assert summary["items"] == len(items) and summary["with_keywords"] + summary["without_metadata"] == len(items)
    assert items["keywords"].map(len).max() <= 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "tfidf"
    with pytest.raises(ExistingOutputError, match="already have keywords"):
        extract_keywords.main(["--records_dir", str(records_dir)])
    with pytest.raises(InputError, match="no keywords"):
        item_keywords(ITEMS)


def test_extract_keywords_with_a_remote_teacher_and_its_own_cache_path(assets, tmp_path):
    import shutil

    records_dir = tmp_path / "records"
    shutil.copytree(assets["records"], records_dir)
    with pytest.raises(InputError, match="needs base_url and remote_model"):
        extract_keywords.main(["--records_dir", str(records_dir), "--method", "remote"])
    cache = tmp_path / "keywords.jsonl"
    with ScriptedServer({"Film": [("ok", "drama, classic")]}) as server:
        summary = extract_keywords.main(["--records_dir", str(records_dir), "--method", "remote", "--base_url", server.url,
                                         "--remote_model", "scripted-model", "--cache_path", str(cache)])
        asked = len(server.requests)
        again = extract_keywords.main(["--records_dir", str(records_dir), "--method", "remote", "--base_url", server.url,
                                       "--remote_model", "scripted-model", "--cache_path", str(cache), "--overwrite", "true"])
    items = load_items(records_dir)
    assert summary["with_keywords"] == asked == len(items) and again["cached"] == len(items) and len(server.requests) == asked
    assert all(list(words) == ["drama", "classic"] for words in items["keywords"])
