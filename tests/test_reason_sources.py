"""Reason sources: the length cap, the verdict check, the synthesiser, a local teacher on a tiny LM, and
the remote teacher against a scripted HTTP server (retries, timeouts, bad answers, server down, cache
resume, the key kept secret) and, where installed, a real llama.cpp server."""

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pandas as pd
import pytest
from _scripted_server import ScriptedServer

from thinkrec.reasons.base import (
    FAILED,
    KEPT,
    REJECTED_VERDICT,
    ReasonSource,
    cap_length,
    normalise_verdict,
    split_sentences,
    word_count,
)
from thinkrec.reasons.cache import ReasonCache
from thinkrec.reasons.local_teacher import LocalTeacher
from thinkrec.reasons.prompts import teacher_prompt, teacher_system
from thinkrec.reasons.remote_teacher import RemoteTeacher
from thinkrec.reasons.synthesised import SynthesisedReasons
from thinkrec.utils.errors import InputError


def row(user=1, item=2, label=1, title=None, history=(), history_ids=None, history_labels=None):
    history = list(history)
    return {
        "UserID": user,
        "TargetItemID": item,
        "TargetItemTitle": title or f"Film {item} (1990)",
        "HisItemIDs": history_ids if history_ids is not None else list(range(100, 100 + len(history))),
        "HisItemTitles": history,
        "HisItemLabels": history_labels if history_labels is not None else [1] * len(history),
        "label": label,
    }


# ------------------------------------------------------------------------------------ length cap


def test_cap_length_cuts_at_the_last_sentence_that_fits():
    text = "Yes. The user loves dramas. The newest pick is a drama too. It is also very popular with everyone."
    capped, cut = cap_length(text, 12)
    assert cut and capped == "Yes. The user loves dramas. The newest pick is a drama too."
    assert cap_length(text, 100) == (text, False)


def test_cap_length_never_cuts_mid_word_when_one_sentence_is_too_long():
    text = "No. " + " ".join(f"word{i}" for i in range(40)) + ". Second sentence."
    capped, cut = cap_length(text, 10)
    assert cut and word_count(capped) <= 10
    assert capped.startswith("No. word0 word1") and capped.endswith("...")
    # Every word kept is a whole word of the original.
    assert all(w.rstrip(".") in text.split() or w == "No." for w in capped.split())


def test_cap_length_counts_with_a_tokenizer_callable():
    characters = lambda text: len(text)  # noqa: E731  one "token" per character
    capped, cut = cap_length("Yes. Short one. A much longer second sentence here.", 16, characters)
    assert cut and capped == "Yes. Short one."


def test_normalise_verdict_rewrites_the_lead():
    assert normalise_verdict("yes, because the user likes dramas") == (1, "Yes. Because the user likes dramas")
    assert normalise_verdict("  NO - too violent.") == (0, "No. Too violent.")
    assert normalise_verdict("Maybe the user would.")[0] is None
    assert normalise_verdict("Yesterday was fun")[0] is None


class Scripted(ReasonSource):
    """Answers given in advance, to test the checks every source shares."""

    name = "scripted"

    def __init__(self, answers, **kwargs):
        super().__init__(**kwargs)
        self.answers = answers

    def draft(self, rows):
        return [(answer, None if answer else "nothing") for answer in self.answers]


def test_reasons_are_kept_only_when_the_verdict_agrees_with_the_label():
    rows = [row(item=1, label=1), row(item=2, label=0), row(item=3, label=1), row(item=4, label=1), row(item=5, label=0)]
    long_reason = "No. " + " ".join(["A short sentence here."] * 30)
    source = Scripted(["Yes, liked.", "Yes. Wrong way round.", "", "Perhaps.", long_reason], max_reason_tokens=20)
    results = source.explain(rows)
    assert [r.status for r in results] == [KEPT, REJECTED_VERDICT, FAILED, FAILED, KEPT]
    assert results[0].reason == "Yes. Liked."
    assert results[4].truncated and word_count(results[4].reason) <= 20 and results[4].reason.endswith("here.")
    assert source.counters.as_dict() == {
        "asked": 5, "answered": 4, "rejected_verdict": 1, "failed": 2, "cached": 0, "truncated": 1, "cut_short": 0, "retries": 0,
    }


def test_a_row_without_a_label_is_named_in_the_error():
    with pytest.raises(ValueError, match="row 1 has no 'label'"):
        Scripted(["Yes.", "Yes."]).explain([row(), {"UserID": 1, "TargetItemID": 2}])


# ----------------------------------------------------------------------------------- synthesiser


@pytest.fixture(scope="module")
def item_table():
    genres = {1: "Drama", 2: "Drama|Romance", 3: "Comedy", 4: "Drama|War", 5: "Horror", 6: "Sci-Fi|Action", 7: "Drama"}
    titles = {1: "Quiet Days (1990)", 2: "Long Summer (1991)", 3: "Laughs (1992)", 4: "Front Line (1993)",
              5: "Night Fear (1994)", 6: "Star Raiders (1995)", 7: "Star Raiders II (1997)"}
    items = pd.DataFrame({"ItemID": list(genres), "genres": list(genres.values()), "title": [titles[i] for i in genres]})
    train = pd.DataFrame({"TargetItemID": [7] * 20 + [1] * 5 + [2, 3, 4, 5, 5, 6]})
    return items, train, titles


def test_synthesiser_explains_from_genres_titles_recency_and_popularity(item_table):
    items, train, titles = item_table
    source = SynthesisedReasons(items=items, train=train, seed=0)
    liked = row(user=3, item=7, label=1, title=titles[7], history=[titles[i] for i in (3, 6, 1, 2)], history_ids=[3, 6, 1, 2])
    disliked = row(user=3, item=5, label=0, title=titles[5], history=[titles[i] for i in (1, 2, 4)], history_ids=[1, 2, 4])
    yes, no = source.explain([liked, disliked])
    assert yes.status == no.status == KEPT
    assert yes.reason.startswith("Yes. ") and no.reason.startswith("No. ")
    # Shared genres (Drama/Action/Sci-Fi), the sequel's title word and popularity (20 train rows) show up.
    assert "Star Raiders (1995)" in yes.reason
    assert "20 ratings" in yes.reason or "popularity" in yes.reason or "popular" in yes.reason
    assert "horror" in no.reason and "drama" in no.reason  # no horror among the liked titles, mostly drama
    # Grammatical enough to split into full sentences, each capitalised and ended.
    for sentence in split_sentences(yes.reason) + split_sentences(no.reason):
        assert (sentence[:1].isupper() or sentence[:1] in '"0123456789') and sentence[-1] in ".!?", sentence


def test_synthesiser_is_deterministic_and_varies_with_the_seed(item_table):
    items, train, titles = item_table
    rows = [row(user=u, item=i, label=u % 2, title=titles[i], history=[titles[1], titles[2]], history_ids=[1, 2])
            for u in range(1, 9) for i in (3, 4, 7)]
    first = [r.reason for r in SynthesisedReasons(items, train, seed=0).explain(rows)]
    again = [r.reason for r in SynthesisedReasons(items, train, seed=0).explain(rows)]
    other = [r.reason for r in SynthesisedReasons(items, train, seed=1).explain(rows)]
    assert first == again
    assert first != other
    assert len(set(first)) > len(rows) // 3  # varied phrasing, not one sentence per label


def test_synthesiser_handles_no_history_no_genres_and_disliked_history(item_table):
    items, train, titles = item_table
    bare = SynthesisedReasons()
    empty_yes, empty_no = bare.explain([row(label=1), row(label=0)])
    assert empty_yes.reason.startswith("Yes. ") and len(empty_yes.reason.split()) > 5
    assert empty_no.reason.startswith("No. ") and len(empty_no.reason.split()) > 5
    source = SynthesisedReasons(items=items, train=train)
    mixed = row(item=4, label=0, title=titles[4], history=[titles[2], titles[3]], history_ids=[2, 3], history_labels=[0, 1])
    (result,) = source.explain([mixed])
    assert "Long Summer (1991)" in result.reason  # the disliked drama is the evidence


def test_teacher_prompt_gives_history_target_and_the_answer():
    prompt = teacher_prompt(row(label=0, title="Heat (1995)", history=["Alien (1979)", "Big (1988)"], history_labels=[1, 0]))
    assert '"Alien (1979)"' in prompt and "disliked" in prompt and '"Heat (1995)"' in prompt
    assert "The true answer is No" in prompt


# --------------------------------------------------------------------------------- local teacher


@pytest.fixture(scope="module")
def tiny_teacher():
    from _tiny_model import make_tokenizer

    from thinkrec.training.backbones import tiny_llama

    tokenizer = make_tokenizer(with_slots=False)
    return tiny_llama(len(tokenizer), hidden_size=32, num_attention_heads=2, seed=0), tokenizer


def test_local_teacher_generates_in_batches_and_checks_verdicts(tiny_teacher):
    model, tokenizer = tiny_teacher
    rows = [row(item=i, label=i % 2, history=["Alien (1979)"] * (i % 3)) for i in range(5)]
    prefilled = LocalTeacher(model=model, tokenizer=tokenizer, batch_size=2, max_new_tokens=6, max_reason_tokens=40)
    results = prefilled.explain(rows)
    assert all(r.raw_text.startswith("Yes." if r.label else "No.") for r in results)  # the verdict is prefilled
    # Six random tokens rarely end a sentence: such answers are cut short, counted, and kept only up to
    # their last complete sentence (here usually none, so they fail with that reason).
    counters = prefilled.counters.as_dict()
    assert counters["cut_short"] == sum(not r.raw_text.rstrip().endswith((".", "!", "?")) for r in results) >= 1
    for r in results:
        assert (r.status == KEPT and r.reason.startswith("Yes." if r.label else "No.")) or (
            r.status == FAILED and r.error == "answer cut short before its first complete sentence"), r
    # Without the verdict prefilled a random LM rarely starts with Yes/No: counted, not kept.
    free = LocalTeacher(model=model, tokenizer=tokenizer, batch_size=3, max_new_tokens=4, prefill_verdict=False)
    statuses = [r.status for r in free.explain(rows)]
    counters = free.counters.as_dict()
    assert counters["asked"] == 5
    assert statuses.count(KEPT) + counters["rejected_verdict"] + counters["failed"] == 5
    assert counters["failed"] >= 1


# ---------------------------------------------------------------------------- scripted server


def teacher(url, **kwargs):
    settings = dict(concurrency=3, max_retries=2, timeout=5.0, backoff_base=0.01, backoff_max=0.05)
    settings.update(kwargs)
    return RemoteTeacher(url, "scripted-model", **settings)


def titled(title, label=1, user=1, item=None):
    return row(user=user, item=item or abs(hash(title)) % 10_000, label=label, title=title, history=["Alien (1979)"])


def test_remote_teacher_retries_429_500_timeouts_and_bad_answers():
    scripts = {
        "After 429": [("status", 429), ("ok", "Yes. It fits.")],
        "Always 500": [("status", 500)],
        "Slow once": [("sleep", 1.5), ("ok", "Yes. It fits.")],
        "Malformed once": [("raw", "{not json"), ("ok", "No. Not for them.")],
        "Empty always": [("ok", "")],
        "Verdictless": [("ok", "The user might like it.")],
        "Wrong verdict": [("ok", "No. Not at all.")],
        "Unauthorised": [("status", 401)],
    }
    rows = [titled("After 429"), titled("Always 500"), titled("Slow once"), titled("Malformed once", label=0),
            titled("Empty always"), titled("Verdictless"), titled("Wrong verdict"), titled("Unauthorised")]
    with ScriptedServer(scripts) as server:
        source = teacher(server.url, timeout=0.5)
        results = source.explain(rows)
    status = {r["TargetItemTitle"]: res for r, res in zip(rows, results)}
    assert status["After 429"].status == KEPT and status["After 429"].reason == "Yes. It fits."
    assert status["Slow once"].status == KEPT
    assert status["Malformed once"].status == KEPT and status["Malformed once"].reason.startswith("No.")
    assert status["Always 500"].status == FAILED and "HTTP 500" in status["Always 500"].error
    assert status["Empty always"].status == FAILED and "empty" in status["Empty always"].error
    assert status["Verdictless"].status == FAILED and "Yes or No" in status["Verdictless"].error
    assert status["Wrong verdict"].status == REJECTED_VERDICT
    assert status["Unauthorised"].status == FAILED and "not retried" in status["Unauthorised"].error
    asked = {title: server.requests.count(title) for title in scripts}
    assert asked == {"After 429": 2, "Always 500": 3, "Slow once": 2, "Malformed once": 2, "Empty always": 3,
                     "Verdictless": 3, "Wrong verdict": 1, "Unauthorised": 1}
    assert source.counters.as_dict() == {
        "asked": 8, "answered": 4, "rejected_verdict": 1, "failed": 4, "cached": 0, "truncated": 0, "cut_short": 0,
        "retries": sum(asked.values()) - len(rows),
    }


def test_remote_teacher_reports_a_server_that_is_down(tmp_path):
    """A server no request reaches is an outage (an error naming it), not rows that failed one by one;
    it used to come back as failed rows, which the commands wrote out as empty results."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again on exit: nothing listens there
    cache = tmp_path / "cache.jsonl"
    source = teacher(f"http://127.0.0.1:{port}/v1", max_retries=1, concurrency=2, cache_path=cache)
    with pytest.raises(InputError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions is unreachable: none of 2 requests.*refused"):
        source.explain([titled("A"), titled("B", user=2)])
    assert source.counters.failed == 0 and source.counters.retries == 2 and not cache.exists()
    # complete() (keywords) stops the same way, after the first `concurrency` requests: the rest are not sent.
    with pytest.raises(InputError, match=r"none of \d requests got an answer \(\d more not sent\)"):
        source.complete([[{"role": "user", "content": f"item {i}"}] for i in range(8)])


def test_one_reachable_answer_makes_failures_rows_not_an_outage():
    scripts = {"Always 503": [("status", 503)], "Fine": [("ok", "Yes. It fits.")], "Unknown": [("status", 404)]}
    with ScriptedServer(scripts) as server:
        results = teacher(server.url, max_retries=0).explain([titled("Always 503"), titled("Fine"), titled("Unknown")])
    assert [r.status for r in results] == [FAILED, KEPT, FAILED]
    assert "HTTP 503" in results[0].error and "does not know model 'scripted-model'" in results[2].error


def test_remote_teacher_bounds_concurrency():
    scripts = {f"Film {i}": [("sleep", 0.2)] for i in range(8)}
    with ScriptedServer(scripts) as server:
        source = teacher(server.url, concurrency=2)
        results = source.explain([titled(f"Film {i}", user=i) for i in range(8)])
    assert all(r.status == KEPT for r in results)
    assert 1 <= server.max_in_flight <= 2


def test_remote_cache_resumes_without_asking_again_and_ignores_a_torn_line(tmp_path):
    cache = tmp_path / "cache.jsonl"
    rows = [titled(f"Film {i}", user=i, item=i) for i in range(4)]
    scripts = {f"Film {i}": [("ok", f"Yes. Reason {i}.")] for i in range(4)}
    scripts["Film 3"] = [("status", 503)]  # fails: not cached, asked again on the next run
    with ScriptedServer(scripts) as server:
        first = teacher(server.url, cache_path=cache, max_retries=0).explain(rows)
        asked_first = len(server.requests)
        # A crash mid-write leaves half a line at the end.
        with open(cache, "a", encoding="utf-8") as handle:
            handle.write('{"UserID": 9, "TargetItemID": 9, "mod')
        server.scripts["Film 3"] = [("ok", "Yes. Reason 3.")]
        again = teacher(server.url, cache_path=cache, max_retries=0)
        second = again.explain(rows)
        asked_second = len(server.requests) - asked_first
    assert [r.status for r in first] == [KEPT, KEPT, KEPT, FAILED]
    assert asked_second == 1  # only the row that failed before
    assert [r.reason for r in second] == ["Yes. Reason 0.", "Yes. Reason 1.", "Yes. Reason 2.", "Yes. Reason 3."]
    assert again.counters.cached == 3 and [r.cached for r in second] == [True, True, True, False]
    reloaded = ReasonCache(cache, "scripted-model")
    assert reloaded.torn_lines == 0 and len(reloaded.entries) == 4  # the torn tail was cut before appending
    assert sum(1 for line in cache.read_text().splitlines() if line.strip()) == 4
    assert ReasonCache(cache, "another-model").entries == {}


def test_a_corrupt_line_inside_the_cache_names_file_and_line(tmp_path):
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"UserID": 1, "TargetItemID": 2, "model": "m", "text": "Yes."}\nnot json\n{"UserID": 3, "TargetItemID": 4, "model": "m", "text": "No."}\n')
    with pytest.raises(ValueError, match=r"cache.jsonl line 2"):
        ReasonCache(cache, "m")


def test_the_api_key_is_sent_but_never_logged_cached_or_shown(tmp_path, monkeypatch, caplog):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("THINKREC_TEST_API_KEY", secret)
    cache = tmp_path / "cache.jsonl"
    scripts = {"Keyed": [("status", 429), ("ok", "Yes. Fine.")], "Refused": [("status", 500)]}
    caplog.set_level(logging.DEBUG)
    with ScriptedServer(scripts) as server:
        source = teacher(server.url, api_key_env="THINKREC_TEST_API_KEY", cache_path=cache, max_retries=1)
        results = source.explain([titled("Keyed"), titled("Refused", user=2)])
    assert set(server.authorization) == {f"Bearer {secret}"}
    assert results[0].status == KEPT and results[1].status == FAILED
    assert secret not in repr(source) and "THINKREC_TEST_API_KEY" in repr(source)
    assert secret not in cache.read_text()
    assert secret not in caplog.text
    assert all(secret not in (r.error or "") for r in results)
    assert secret not in json.dumps(vars(source), default=str)


def test_remote_teacher_rejects_a_bad_url():
    for url in ("127.0.0.1:8080", "localhost:8080/v1", "ftp://127.0.0.1/v1", "http:///v1"):
        with pytest.raises(InputError, match=rf"^base_url={re.escape(repr(url))}: .*http://"):
            RemoteTeacher(url, "m")
    assert RemoteTeacher("HTTPS://api.example.com/v1", "m").url == "HTTPS://api.example.com/v1/chat/completions"


def test_a_value_error_from_urllib_is_not_a_malformed_answer(monkeypatch):
    """Only a body that is not a chat completion counts as an answer of the server; a ValueError that urllib
    raises before sending (it used to be counted as one, and the row failed quietly) is a bug and surfaces."""
    def urlopen(request, timeout):
        raise ValueError(f"unknown url type: {request.full_url!r}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    source = teacher("http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(ValueError, match="unknown url type") as raised:
        source.explain([titled("A")])
    assert not isinstance(raised.value, InputError) and source.counters.failed == 0


def test_rows_not_sent_after_an_outage_are_never_failed_rows(tmp_path):
    """Once the outage limit stopped the batch, an answer arriving late (a slow request) does not turn the rows
    that were not sent into failed rows: the batch is an outage, and what was answered is cached."""
    cache = tmp_path / "cache.jsonl"
    scripts = {"Slow": [("sleep", 1.0)], **{f"Down {i}": [("status", 503)] for i in range(20)}}
    rows = [titled("Slow", item=1)] + [titled(f"Down {i}", user=2, item=10 + i) for i in range(20)]
    with ScriptedServer(scripts) as server:
        source = teacher(server.url, concurrency=2, max_retries=0, cache_path=cache)
        with pytest.raises(InputError, match=rf"{re.escape(server.url)}/chat/completions became unreachable: .*more not sent"):
            source.explain(rows)
    assert len(server.requests) < len(rows)
    assert source.counters.failed == 0
    assert [json.loads(line)["text"] for line in cache.read_text().splitlines()] == ["Yes. Late but fine."]


def test_a_server_that_stops_answering_is_an_outage_and_a_rerun_resumes(tmp_path):
    """A partial outage: the first rows are answered, then every request fails. After K requests in a row got
    no answer (K = OUTAGE_WAVES x concurrency) the batch stops with an error naming the URL, instead of sending
    every remaining row through its retries and reporting them as failed rows; the answers are cached."""
    cache = tmp_path / "cache.jsonl"
    rows = [titled(f"Fine {i}", user=1, item=i) for i in range(4)] + [titled(f"Dead {i}", user=2, item=i) for i in range(30)]
    scripts = {**{f"Fine {i}": [("ok", f"Yes. Reason {i}.")] for i in range(4)},
               **{f"Dead {i}": [("status", 503)] for i in range(30)}}
    with ScriptedServer(scripts) as server:
        source = teacher(server.url, concurrency=2, max_retries=1, cache_path=cache)
        with pytest.raises(InputError, match=rf"{re.escape(server.url)}/chat/completions became unreachable: \d+ requests in a "
                                             rf"row got no answer.*HTTP 503.*cached in {re.escape(str(cache))}.*again"):
            source.explain(rows)
        dead_requests = sum(title.startswith("Dead") for title in server.requests)
        limit = RemoteTeacher.OUTAGE_WAVES * 2
        assert limit <= dead_requests // 2 <= limit + 2  # two tries each; at most the requests in flight beyond the limit
        assert source.counters.failed == 0
        assert len(ReasonCache(cache, "scripted-model").entries) == 4
        # The server is back: the rerun asks only what was not answered.
        for i in range(30):
            server.scripts[f"Dead {i}"] = [("ok", "Yes. Back again.")]
        before = len(server.requests)
        results = teacher(server.url, concurrency=2, max_retries=1, cache_path=cache).explain(rows)
    assert len(server.requests) - before == 30
    assert all(r.status == KEPT for r in results) and sum(r.cached for r in results) == 4


# ---------------------------------------------------------------------------- real llama.cpp


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python[server] is not installed (its build takes ~5 min of CPU; install it to run this)")
def test_remote_teacher_against_a_real_llama_cpp_server(tmp_path):
    from thinkrec.training.backbones import smollm2_gguf

    directory, name = smollm2_gguf()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", os.path.join(directory, name), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("llama_cpp.server did not come up within 120 s")
                time.sleep(1)
        source = RemoteTeacher(f"http://127.0.0.1:{port}/v1", "smollm2", api_key_env=None, cache_path=tmp_path / "c.jsonl",
                               concurrency=1, max_retries=1, timeout=120, max_tokens=60)
        rows = [titled("Heat (1995)", label=1, user=1), titled("Big (1988)", label=0, user=2)]
        results = source.explain(rows)
        counters = source.counters.as_dict()
        assert counters["asked"] == 2
        assert sum(r.status == KEPT for r in results) + counters["rejected_verdict"] + counters["failed"] == 2
        assert counters["answered"] >= 1  # the server answered at least once with text
        second = RemoteTeacher(f"http://127.0.0.1:{port}/v1", "smollm2", api_key_env=None, cache_path=tmp_path / "c.jsonl")
        second.explain(rows)
        assert second.counters.cached == sum(1 for line in (tmp_path / "c.jsonl").read_text().splitlines() if line.strip())
    finally:
        server.terminate()
        server.wait(timeout=30)


# ----------------------------------------------------------------------------- a second domain

# Words that would show a sentence still thinks its items are films.
FILM_WORDS = ("movie", "film", "watch", "viewer", "cinema", "rating", "sequel", "genre")


@pytest.fixture(scope="module")
def game_table():
    genres = {1: "Puzzle", 2: "Puzzle|Adventure", 3: "Racing", 4: "Puzzle|Strategy", 5: "Horror", 6: "Action", 7: "Puzzle",
              8: "Racing|Action"}
    titles = {1: "Block Drop", 2: "Lost Isle", 3: "Turbo Lap", 4: "Mind Maze", 5: "Dark Hall", 6: "Star Raiders",
              7: "Star Raiders Puzzle", 8: "Turbo Lap 2"}
    items = pd.DataFrame({"ItemID": list(genres), "genres": list(genres.values()), "title": [titles[i] for i in genres]})
    train = pd.DataFrame({"TargetItemID": [7] * 20 + [1] * 5 + [2, 3, 4, 5, 6, 8]})
    return items, train, titles


def game_rows(titles):
    """Rows that reach every sentence: related or not, recent or old, disliked history, sequels, no history."""
    histories = [(1, 2, 4), (3,), (6, 3, 1, 2, 4), (2, 5), (1, 2, 4, 3, 6), (8, 6), ()]
    rows = []
    for user, history in enumerate(histories, start=1):
        for item in titles:
            for label in (0, 1):
                labels = [int(h % 3 != 0) for h in history]
                rows.append(row(user=user, item=item, label=label, title=titles[item], history=[titles[h] for h in history],
                                history_ids=list(history), history_labels=labels))
    return rows


@pytest.mark.parametrize("with_genres", [True, False])
def test_synthesised_reasons_read_right_for_games(game_table, with_genres):
    items, train, titles = game_table
    source = SynthesisedReasons(items=items if with_genres else None, train=train, seed=0, max_reason_tokens=400,
                                item_noun="game", item_noun_plural="games")
    reasons = []
    for seed in range(3):
        source.seed = seed
        reasons += [result.reason for result in source.explain(game_rows(titles))]
    text = " ".join(reasons).lower()
    assert not [word for word in FILM_WORDS if word in text]
    assert " games" in text and " game" in text.replace(" games", "")
    for reason in reasons:
        for sentence in split_sentences(reason):
            assert (sentence[:1].isupper() or sentence[:1] in '"0123456789') and sentence[-1] in ".!?", sentence
            # Number agreement: one item is never followed by a plural verb or kind.
            assert not re.search(r"\b1 of the \d+ games the user liked are\b", sentence), sentence
            assert "1 of the 1 " not in sentence and "a game game" not in sentence, sentence
    if with_genres:
        assert "puzzle games" in text and ("a puzzle game" in text or "an action game" in text)


def test_synthesised_reasons_take_the_nouns_of_the_records(game_table):
    items, train, titles = game_table
    records = SimpleNamespace(items=items, splits={"train": train}, metadata={"source": "toy", "item_noun": "game",
                                                                              "item_noun_plural": "games"})
    reason = SynthesisedReasons.from_records(records).synthesise(row(label=1, item=3, title=titles[3]))
    assert "game" in reason and "movie" not in reason
    old = SimpleNamespace(items=items, splits={"train": train}, metadata={"source": "toy"})
    with pytest.raises(InputError, match="records of toy: metadata.json has no item_noun"):
        SynthesisedReasons.from_records(old)
    with pytest.raises(InputError, match="SynthesisedReasons: item_noun must be a word"):
        SynthesisedReasons(item_noun="", item_noun_plural="games")


def test_teacher_prompts_name_the_items():
    prompt = teacher_prompt(row(label=1, title="Mind Maze"), item_noun="game", item_noun_plural="games")
    assert 'Would the user enjoy the game "Mind Maze"?' in prompt and "no games yet" in prompt
    assert teacher_system("product").startswith("You explain product recommendations.")
    assert "movie" not in teacher_prompt(row(title="Mind Maze", history=["Block Drop"]), item_noun="game", item_noun_plural="games")


def test_the_synthesiser_and_the_teacher_prompt_use_item_keywords():
    items = pd.DataFrame({"ItemID": [2, 100, 101], "genres": ["Crime", "Crime", "Drama"],
                          "keywords": [["crime", "heist", "los angeles"], ["heist", "bank"], ["los angeles", "divorce"]]})
    source = SynthesisedReasons(items=items, seed=0)
    liked = row(label=1, title="Heat (1995)", history=["Thief (1981)", "Kramer vs. Kramer (1979)"], history_ids=[100, 101],
                history_labels=[1, 0])
    text = source.synthesise(liked)
    # The shared keyword with the liked item is named, the genre ("crime") is not repeated as a keyword.
    assert '"heist"' in text and '"Thief (1981)"' in text and '"crime"' not in text
    disliked = dict(liked, label=0)
    assert '"los angeles"' in source.synthesise(disliked) and '"Kramer vs. Kramer (1979)"' in source.synthesise(disliked)
    # Without keywords in the item table the same row is explained without them.
    assert "heist" not in SynthesisedReasons(items=items.drop(columns="keywords"), seed=0).synthesise(liked)
    prompt = teacher_prompt({**liked, "TargetItemKeywords": ["crime", "heist"]})
    assert '"Heat (1995)" (keywords: crime, heist)?' in prompt


def test_answers_cut_short_keep_their_complete_sentences_and_are_counted():
    class CutShort(ReasonSource):
        def draft(self, rows):
            return [("Yes. The user loves heists. And the newest pick was a", None), ("No. The user rarely", None),
                    ("Yes, the user loves heists like Heat. Also it", None), ("No. It is slow!", None)]

    source = CutShort()
    results = source.explain([row(label=1), row(label=0), row(label=1), row(label=0)])
    assert [r.status for r in results] == [KEPT, FAILED, KEPT, KEPT]
    assert results[0].reason == "Yes. The user loves heists." and results[2].reason == "Yes. The user loves heists like Heat."
    assert results[1].error == "answer cut short before its first complete sentence"
    assert results[3].reason == "No. It is slow!"
    assert source.counters.as_dict()["cut_short"] == 3 and source.counters.as_dict()["failed"] == 1


def test_a_local_teacher_loads_through_the_one_load_path(tmp_path):
    """`teacher_dtype` / `teacher_load_in_4bit` / the device reach the teacher's from_pretrained (it used
    to load every teacher in float32 on the CPU, whatever was asked and whatever the machine had)."""
    import torch
    from _run_fixtures import write_backbone

    from thinkrec.reasons.reflection import TeacherArguments, build_teacher
    from thinkrec.training import loading

    folder = write_backbone(tmp_path / "teacher")
    nouns = {"item_noun": "game", "item_noun_plural": "games"}
    teacher = build_teacher("local", TeacherArguments(teacher_model=str(folder), teacher_dtype="bfloat16"), nouns)
    assert teacher.model.dtype == torch.bfloat16
    assert build_teacher("local", TeacherArguments(teacher_model=str(folder)), nouns).model.dtype == loading.default_dtype()
    # QLoRA-style 4-bit teachers too (bitsandbytes runs 4-bit on this CPU).
    import bitsandbytes as bnb

    quantised = build_teacher("local", TeacherArguments(teacher_model=str(folder), teacher_load_in_4bit=True), nouns)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in quantised.model.modules())
