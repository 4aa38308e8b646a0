"""A teacher behind an OpenAI-compatible chat API: a bounded thread pool, retries with backoff, an
outage told apart from failed rows, and a resumable answer cache."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns
from thinkrec.evaluation.reporting import verdict_of
from thinkrec.reasons.base import FAILED, ReasonResult, ReasonSource
from thinkrec.reasons.cache import ReasonCache
from thinkrec.reasons.prompts import teacher_prompt, teacher_system
from thinkrec.utils.errors import InputError


logger = logging.getLogger(__name__)


class _MalformedAnswer(Exception):
    """The server answered, but not with a chat completion (not JSON, no choices, content that is not text)."""


class _Reachability:
    """Whether the server of one batch is reachable. A request reached it when it got an HTTP answer other
    than a 5xx or a 404; one that failed every try without one did not. `limit` requests in a row that did
    not reach it (since the start, or since the last that did) are an outage: `stopped` is set for good, the
    rest of the batch is not sent, and the batch raises; no row is left as a failed row it was not."""

    def __init__(self, limit: int):
        self.limit = max(limit, 1)
        self.reached = False
        self.unreachable = 0  # requests that did not reach the server, in all
        self.in_a_row = 0  # ... since the last that did
        self.outage_streak = 0  # `in_a_row` when the batch stopped
        self.not_sent = 0
        self.last_error: Optional[str] = None
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def reach(self) -> None:
        with self._lock:
            self.reached, self.in_a_row = True, 0

    def failed_to_reach(self, error: str) -> None:
        with self._lock:
            self.unreachable += 1
            self.in_a_row += 1
            self.last_error = error
            if self.in_a_row >= self.limit and not self.stopped.is_set():
                self.outage_streak = self.in_a_row
                self.stopped.set()

    def skip(self) -> None:
        """A request not sent because the batch stopped."""
        with self._lock:
            self.not_sent += 1


class RemoteTeacher(ReasonSource):
    """A teacher behind an OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, llama.cpp's server,
    hosted APIs), asked from a bounded thread pool. Timeouts, connection errors, 429 and 5xx are
    retried with exponential backoff; malformed, empty or verdict-less answers are retried up to
    `max_retries` too; then the row is reported as failed. A server that stops being reached is an
    outage, not failed rows: when `OUTAGE_WAVES` x `concurrency` requests in a row fail every try without
    reaching it (connections refused, timeouts, a 5xx, a 404 for a model it does not know), or none of a
    batch reaches it, the rest of the batch is not sent and `explain` and `complete` raise an `InputError`
    naming the URL and the last error. The answers `explain` got before are cached, so running the
    command again resumes. The API key is read from the environment variable named by `api_key_env` at
    request time and is never stored, logged, cached or put in a message.

    Args:
        base_url: an http:// or https:// URL, e.g. "http://127.0.0.1:8080/v1" ("/chat/completions" is appended).
        model: model name sent with each request.
        api_key_env: name of the environment variable holding the key (unset = no Authorization header).
        cache_path: JSON-lines cache; answers found there are not asked again.
        item_noun, item_noun_plural: what the items are, as the prompts name them.
    """

    name = "remote"
    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
    # Two full waves of requests, each through all its retries, without one reaching the server: an outage.
    OUTAGE_WAVES = 2

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 cache_path: Optional[os.PathLike | str] = None, concurrency: int = 4, max_retries: int = 4,
                 timeout: float = 60.0, backoff_base: float = 1.0, backoff_max: float = 30.0,
                 max_tokens: int = 256, temperature: float = 0.0, max_reason_tokens: int = 200,
                 count_tokens: Optional[Callable[[str], int]] = None, item_noun: str = DEFAULT_ITEM_NOUN,
                 item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL):
        super().__init__(max_reason_tokens, count_tokens)
        self.nouns = check_item_nouns(item_noun, item_noun_plural, type(self).__name__)
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InputError(f"base_url={base_url!r}: expected an http:// or https:// URL with a host, such as "
                             "'http://127.0.0.1:8080/v1'.")
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"concurrency must be >= 1 and max_retries >= 0, got {concurrency} and {max_retries}.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = ReasonCache(cache_path, model) if cache_path else None

    def __repr__(self) -> str:
        return (f"RemoteTeacher(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"concurrency={self.concurrency}, max_retries={self.max_retries}, timeout={self.timeout})")

    def _key(self) -> Optional[str]:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _scrub(self, message: str) -> str:
        """Error text with the key removed, in case a server echoes the request headers."""
        key = self._key()
        return message.replace(key, "***") if key else message

    def _messages(self, row: dict) -> list[dict]:
        return [{"role": "system", "content": teacher_system(self.nouns["item_noun"])},
                {"role": "user", "content": teacher_prompt(row, **self.nouns)}]

    def _request(self, messages: list[dict]) -> str:
        """One chat completion; returns the answer text or raises (urllib errors, `_MalformedAnswer` on a bad body)."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as error:
            raise _MalformedAnswer(f"malformed response ({type(error).__name__}): {raw[:120]!r}") from error
        if not isinstance(content, str):
            raise _MalformedAnswer(f"malformed response: message content is {type(content).__name__}, not text")
        return content

    def _delay(self, attempt: int, error: Optional[urllib.error.HTTPError]) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random() / 2)
        retry_after = error.headers.get("Retry-After") if error is not None and error.headers else None
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_max))
            except ValueError:
                pass  # an HTTP-date Retry-After: keep our own backoff
        return delay

    @staticmethod
    def _answer_problem(text: str) -> Optional[str]:
        """Why a reason answer is unusable (then it is asked again), or None."""
        return "answer does not start with Yes or No" if verdict_of(text) is None else None

    def ask(self, messages: list[dict], problem: Callable[[str], Optional[str]], what: str = "request",
            reachability: Optional[_Reachability] = None) -> tuple[Optional[str], Optional[str]]:
        """One chat answer with retries (transport errors, 429/5xx, empty answers and answers for which
        `problem` names a fault), or (None, last error). `reachability` (the batch's) hears whether the
        server answered, and stops the asking once the batch is an outage (the batch then raises)."""
        last_error, reached = None, False
        for attempt in range(self.max_retries + 1):
            if reachability is not None and reachability.stopped.is_set():
                if not attempt:
                    reachability.skip()
                return None, f"not asked: {self.url} is unreachable"
            if attempt:
                self.counters.add(retries=1)
            http_error, text = None, None
            try:
                text = self._request(messages)
                reached, last_error = True, "empty answer" if not text.strip() else problem(text)
            except urllib.error.HTTPError as error:
                http_error, last_error = error, f"HTTP {error.code}"
                # A 5xx: the server cannot serve; a 404: it does not know the model (or the path).
                reached = reached or (error.code < 500 and error.code != 404)
                if error.code == 404:
                    last_error = f"HTTP 404: the server does not know model {self.model!r} (or the path)"
                elif error.code not in self.RETRY_STATUS:
                    last_error = f"{last_error} (not retried): {error.reason}"
                if error.code not in self.RETRY_STATUS:
                    return self._failed(last_error, reached, reachability)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                # Refused/reset connections, timeouts, DNS errors, bodies cut short (IncompleteRead).
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            except _MalformedAnswer as error:  # the server did answer
                reached, last_error = True, str(error)
            if reached and reachability is not None:
                reachability.reach()
            if text is not None and last_error is None:
                return text, None
            last_error = self._scrub(last_error)
            if attempt < self.max_retries:
                logger.debug("%s: %s; retry %d", what, last_error, attempt + 1)
                time.sleep(self._delay(attempt, http_error))
        attempts = self.max_retries + 1
        return self._failed(f"{last_error} after {attempts} attempt{'s' if attempts > 1 else ''}", reached, reachability)

    def _failed(self, error: str, reached: bool, reachability: Optional[_Reachability]) -> tuple[None, str]:
        """(None, error) for a request that got no usable answer; `reachability` hears of one that never
        reached the server."""
        error = self._scrub(error)
        if not reached and reachability is not None:
            reachability.failed_to_reach(error)
        return None, error

    def _each(self, work: Callable, jobs: list, cached: bool = False) -> list:
        """`work(job, reachability)` for every job, `concurrency` at a time; an `InputError` naming the URL
        when no request reached the server or the batch stopped as an outage (`cached`: the answers that
        came are in the cache)."""
        reachability = _Reachability(self.OUTAGE_WAVES * self.concurrency)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            # list() surfaces a programming error from a worker instead of leaving a None result.
            out = list(pool.map(lambda job: work(job, reachability), jobs))
        if not jobs or reachability.reached and not reachability.stopped.is_set():
            return out
        skipped = f" ({reachability.not_sent} more not sent)" if reachability.not_sent else ""
        if not reachability.reached:
            raise InputError(self._scrub(
                f"remote teacher {self.url} is unreachable: none of {reachability.unreachable} requests got an answer"
                f"{skipped}; last error: {reachability.last_error}. Nothing was written or cached: start the server, or "
                f"check base_url and remote_model={self.model!r}."))
        resume = (f"The answers received are cached in {self.cache.path}: run the same command again once the server is "
                  "back, and only the rest is asked." if cached and self.cache is not None
                  else "Run the same command again once the server is back.")
        raise InputError(self._scrub(
            f"remote teacher {self.url} became unreachable: {reachability.outage_streak} requests in a row got no answer "
            f"after earlier ones did{skipped}; last error: {reachability.last_error}. {resume}"))

    def complete(self, conversations: list[list[dict]], problem: Callable[[str], Optional[str]] = lambda text: None
                 ) -> list[tuple[Optional[str], Optional[str]]]:
        """(answer, error) for each chat, asked `concurrency` at a time with retries; an `InputError` when
        the server is unreachable."""
        return self._each(lambda messages, reachability: self.ask(messages, problem, reachability=reachability), conversations)

    def explain(self, rows: list[dict]) -> list[ReasonResult]:
        self._check_rows(rows)
        self.counters.add(asked=len(rows))
        results: list[Optional[ReasonResult]] = [None] * len(rows)
        to_ask = []
        for index, row in enumerate(rows):
            cached = self.cache.get(int(row["UserID"]), int(row["TargetItemID"])) if self.cache else None
            if cached is not None:
                self.counters.add(cached=1)
                results[index] = self.finish(row, cached, None, cached=True)
            else:
                to_ask.append(index)

        def work(index: int, reachability: _Reachability) -> tuple[Optional[str], Optional[str]]:
            row = rows[index]
            text, error = self.ask(self._messages(row), self._answer_problem,
                                   f"user {row['UserID']} item {row['TargetItemID']}", reachability)
            if text is not None and self.cache is not None:
                self.cache.put(int(row["UserID"]), int(row["TargetItemID"]), text)
            return text, error

        # Counted only once the batch is known not to be an outage (an outage raises first).
        for index, (text, error) in zip(to_ask, self._each(work, to_ask, cached=True)):
            results[index] = self.finish(rows[index], text, error)
        failures = Counter(r.error for r in results if r.status == FAILED)
        for error, count in failures.most_common(5):
            logger.warning("%s: %d rows failed: %s", self.url, count, error)
        return results


__all__ = ["RemoteTeacher"]
