"""judge_reasons.py: metric values on hand-made reasons, METEOR skipped with a reason without WordNet,
and the command on a predictions file against a reference file."""

import json

import numpy as np
import pandas as pd
import pytest

import judge_reasons
from thinkrec.reasons import judge as judging
from thinkrec.reasons.judge import judge, load_wordnet, repeated_ngram_rate, wordnet_reader


REFERENCES = [
    "Yes. The user loves science fiction films such as Alien, and this one is a classic of the genre.",
    "No. The user rarely enjoys romantic comedies and disliked two similar titles.",
    "Yes. It is a popular drama, and the user rated several dramas highly.",
]


def test_repeated_ngram_rate_by_hand():
    assert repeated_ngram_rate("a b c d e", 3) == 0.0
    # "a b a b a b": trigrams aba, bab, aba, bab -> 2 unique of 4.
    assert repeated_ngram_rate("a b a b a b", 3) == pytest.approx(0.5)
    assert repeated_ngram_rate("too short", 3) == 0.0


def test_identical_reasons_score_perfectly_and_verdicts_are_compared():
    result = judge(REFERENCES, REFERENCES, scores=[0.9, 0.2, 0.4], labels=[1, 0, 0])
    assert result["bleu"] == pytest.approx(100.0)
    assert result["rouge_l"] == pytest.approx(1.0)
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["verdict_agrees_with_score"] == pytest.approx(2 / 3)  # the third says Yes, its score says No
    assert result["verdict_agrees_with_label"] == pytest.approx(2 / 3)
    assert result["verdict_missing"] == 0.0
    lengths = [len(judging.words(text)) for text in REFERENCES]
    assert result["words_mean"] == pytest.approx(np.mean(lengths)) and result["words_max"] == max(lengths)
    if "meteor" in result:
        assert result["meteor"] > 0.99
    else:
        assert "WordNet" in result["skipped"]["meteor"]


def test_different_reasons_score_lower_and_repetition_is_measured():
    generated = [
        "Yes. Yes. The the the the the the the movie movie movie movie.",
        "Maybe the user likes it.",
        "Yes. It is a popular drama, and the user rated several dramas highly.",
    ]
    result = judge(generated, REFERENCES, scores=[0.9, 0.2, 0.8], labels=[1, 0, 1])
    assert 0 < result["bleu"] < 100 and 0 < result["rouge_l"] < 1 and result["cosine"] < 0.95
    assert result["verdict_missing"] == pytest.approx(1 / 3)
    assert result["verdict_agrees_with_score"] == pytest.approx(2 / 3)  # a missing verdict never agrees
    assert result["repeated_3gram_rate"] == pytest.approx(np.mean([repeated_ngram_rate(text) for text in generated]))
    assert repeated_ngram_rate(generated[0]) > 0.4 and repeated_ngram_rate(generated[2]) == 0.0


def test_without_references_or_scores_the_skips_say_why():
    result = judge(["Yes. Fine."], use_embeddings=False)
    assert result["skipped"]["bleu"] == "no references"
    assert result["skipped"]["verdict_agrees_with_score"] == "no score column"
    with pytest.raises(ValueError, match="1 generated reasons but 2 references"):
        judge(["Yes."], ["Yes.", "No."])


def test_meteor_is_skipped_with_a_reason_where_wordnet_is_absent(tmp_path):
    reader, reason = load_wordnet([str(tmp_path)], try_nltk=False)
    assert reader is None and "wordnet-base" in reason


@pytest.mark.skipif(wordnet_reader()[0] is None, reason=f"WordNet not installed: {wordnet_reader()[1]}")
def test_meteor_uses_wordnet_synonyms_where_installed():
    # nltk matches synonyms after stemming the leftovers, so use words that are their own stems.
    value, _ = judging.meteor(["the car was fast"], ["the auto was fast"])
    unrelated, _ = judging.meteor(["the car was fast"], ["the banana was fast"])
    assert value > unrelated  # car/auto match through a WordNet synset


@pytest.fixture()
def files(tmp_path):
    references = pd.DataFrame({"UserID": [1, 2, 3, 4], "TargetItemID": [10, 20, 30, 40],
                               "reason": REFERENCES + ["No. Not in the history."], "mode": "reason"})
    predictions = pd.DataFrame({
        "UserID": [1, 2, 3, 5], "TargetItemID": [10, 20, 30, 50], "label": [1, 0, 1, 0],
        "score": [0.8, 0.3, 0.6, 0.1],
        "generated": [REFERENCES[0], "No. The user avoids romantic comedies.", None, "No. Nothing similar."],
    })
    references.to_parquet(tmp_path / "references.parquet", index=False)
    predictions.to_parquet(tmp_path / "test_predictions.parquet", index=False)
    return tmp_path


def test_command_prints_a_table_and_json_last(files, capsys):
    result = judge_reasons.main(["--predictions", str(files / "test_predictions.parquet"),
                                 "--references", str(files / "references.parquet"), "--output_json", str(files / "j.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("bleu") for line in lines)
    last = json.loads(lines[-1])
    assert last["rows"] == 2 and last["rows_without_reference"] == 1  # row 3 has no text; user 5 no reference
    assert last["verdict_agrees_with_score"] == 1.0 and last["verdict_agrees_with_label"] == 1.0
    assert json.loads((files / "j.json").read_text()) == result


def test_command_names_the_file_for_bad_input(files, tmp_path):
    pd.DataFrame({"UserID": [1], "TargetItemID": [10], "text": ["Yes."]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) \['reason'\]"):
        judge_reasons.main(["--predictions", str(files / "test_predictions.parquet"), "--references", str(tmp_path / "bad.parquet")])
    pd.DataFrame({"UserID": [1, 1], "TargetItemID": [10, 10], "reason": ["Yes.", "No."]}).to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match=r"dup.parquet: 1 duplicate .* \(1, 10\)"):
        judge_reasons.main(["--predictions", str(files / "test_predictions.parquet"), "--references", str(tmp_path / "dup.parquet")])
    pd.DataFrame({"UserID": [1], "TargetItemID": [10]}).to_parquet(tmp_path / "nogen.parquet")
    with pytest.raises(ValueError, match="generate_reasons_for"):
        judge_reasons.main(["--predictions", str(tmp_path / "nogen.parquet")])


# ---------------------------------------------------------------------------------- stance, grounding

POSITIVE_BODIES = [
    "The user loves {0} and this is exactly that kind of story, a perfect fit.",
    "It matches the {0} the user rated highly, so they will enjoy it.",
    "Everything the user liked points to {0}, and this one delivers it well.",
]
NEGATIVE_BODIES = [
    "The user dislikes {0} and has rejected several titles like this one.",
    "Nothing the user enjoyed is about {0}; this is a poor fit for them.",
    "The user rated {0} badly, so this is unlikely to please them.",
]
TOPICS = ["westerns", "space operas", "heist thrillers", "family comedies", "war dramas", "musicals", "horror films",
          "courtroom dramas"]


def stance_references():
    texts = [f"Yes. {body.format(topic)}" for body in POSITIVE_BODIES for topic in TOPICS]
    return texts + [f"No. {body.format(topic)}" for body in NEGATIVE_BODIES for topic in TOPICS]


def test_the_stance_checker_reads_the_body_not_the_verdict_word():
    checker = judging.StanceChecker.fit(stance_references(), held_out=0.25, seed=0)
    assert checker.accuracy == 1.0 and checker.train_rows == 36 and checker.test_rows == 12
    body = "The user loves sports films and this is exactly that kind of story, a perfect fit."
    # Same body under both verdicts: only the "Yes." one argues for its verdict.
    assert checker.agrees([f"Yes. {body}", f"No. {body}"]) == 0.5
    assert list(checker.stances([f"No. {body}", "Yes.", "No. The user dislikes sports films and rejected titles like this."])) == [1, -1, 0]
    # An empty body argues for nothing: it does not agree.
    assert checker.agrees(["Yes.", f"Yes. {body}"]) == 0.5
    with pytest.raises(ValueError, match="at least 5 reasons of each verdict"):
        judging.StanceChecker.fit(stance_references()[:24])


ITEMS = pd.DataFrame({
    "ItemID": [1, 2, 3],
    "title": ["Heat (1995)", "Fargo (1996)", "Big (1988)"],
    "genres": ["Action|Crime", "Crime|Drama", "Comedy"],
    "keywords": [["heist", "los angeles"], ["kidnapping", "snow"], ["toys"]],
})


def test_grounding_counts_names_of_the_rows_own_items_by_hand():
    grounding = judging.Grounding(ITEMS)
    text = 'Yes. "Fargo" is a crime story with snow, like "Jaws" and Big (1988); it is a comedy about a heist.'
    found = grounding.mentions(text, [1, 2])  # target Heat, history Fargo
    assert sorted(found) == sorted([
        ("title", "fargo", True), ("title", "jaws", False), ("title", "big", False),
        ("genre", "crime", True), ("genre", "comedy", False), ("keyword", "snow", True), ("keyword", "heist", True),
    ])
    result = grounding.score([text, "No. Nothing to go on."], [[1, 2], [3]])
    assert result["grounding"] == pytest.approx(4 / 7)
    assert result["grounding_titles"] == pytest.approx(1 / 3) and result["title_mentions"] == 3
    assert result["grounding_genres"] == pytest.approx(1 / 2) and result["grounding_keywords"] == 1.0
    assert result["rows_without_mentions"] == 1
    assert set(result["ungrounded_examples"]) == {"title: jaws", "title: big", "genre: comedy"}


def test_judge_reports_stance_and_grounding_with_their_inputs():
    generated = ['Yes. The user loves westerns like "Fargo", a perfect fit.', "No."]
    result = judge(generated, scores=[0.8, 0.1], use_embeddings=False,
                   stance=judging.StanceChecker.fit(stance_references()), grounding=judging.Grounding(ITEMS),
                   item_ids=[[1, 2], [3]])
    assert result["body_agrees_with_verdict"] == 0.5  # the empty "No." body argues for nothing
    assert result["reason_body_empty"] == 0.5
    assert result["grounding"] == 1.0 and result["mentions"] == 1
    without = judge(generated, use_embeddings=False)
    assert "body_agrees_with_verdict" in without["skipped"] and "grounding" in without["skipped"]


def test_the_verdict_word_is_not_counted_as_a_name():
    items = pd.DataFrame({"ItemID": [1, 2], "title": ["Yes (2004)", "Heat (1995)"], "genres": ["Drama", "Crime"],
                          "keywords": [["yes", "love"], ["heist"]]})
    result = judging.Grounding(items).score(["Yes. A heist."], [[2]])
    assert result["mentions"] == 1 and result["grounding"] == 1.0


def test_ordinary_words_that_are_also_keywords_are_not_counted_unquoted():
    items = pd.DataFrame({"ItemID": [1, 2], "title": ["The Great Heist (1990)", "Snow Day (2000)"], "genres": ["Crime", "Comedy"],
                          "keywords": [["great", "heist", "bank job"], ["snow", "school"]]})
    common = judging.common_english_words(["movie", "movies"])
    assert {"great", "snow", "movie"} <= common and "heist" not in common
    grounding = judging.Grounding(items, common)
    found = grounding.mentions('A great movie about a heist and a bank job, like "snow".', [2])
    # "great" is an ordinary word here; "heist" and "bank job" are keywords of another item; quoted "snow" is named.
    assert sorted(found) == [("keyword", "bank job", False), ("keyword", "heist", False), ("keyword", "snow", True)]
