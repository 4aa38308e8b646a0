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
