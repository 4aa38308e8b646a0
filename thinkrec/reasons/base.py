"""What every reason source shares: the `ReasonSource` interface, its results and counters, the verdict
check and the length cap. The sources are `synthesised.SynthesisedReasons`, `local_teacher.LocalTeacher`
and `remote_teacher.RemoteTeacher`.

Every source returns, per row, a reason that starts with the verdict ("Yes." / "No.") agreeing with
the row's label, capped in tokens at a sentence boundary — or no reason, with why.

    >>> cap_length("Yes. It is a comedy. The user likes comedies.", max_tokens=5)
    ('Yes. It is a comedy.', True)
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional

from thinkrec.evaluation.reporting import LEADING_VERDICT, verdict_of


KEPT, REJECTED_VERDICT, FAILED = "kept", "rejected_verdict", "failed"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_FINISHED = re.compile(r"[.!?…][\"')\]]*\s*$")
_WORD = re.compile(r"\S+")


# ---------------------------------------------------------------------------------------- results


@dataclass
class ReasonResult:
    """The outcome for one row: `reason` is set only when `status == "kept"`."""

    user_id: int
    item_id: int
    label: int
    status: str
    reason: Optional[str] = None
    raw_text: Optional[str] = None
    truncated: bool = False
    cached: bool = False
    error: Optional[str] = None


@dataclass
class ReasonCounters:
    """What a source did: rows asked, answers received, answers whose verdict disagreed with the label,
    rows that got no usable answer, answers served from the cache, reasons cut to the length cap,
    answers cut short mid-sentence (the teacher's token limit; their unfinished sentence is dropped), and
    retried requests (remote)."""

    asked: int = 0
    answered: int = 0
    rejected_verdict: int = 0
    failed: int = 0
    cached: int = 0
    truncated: int = 0
    cut_short: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


# ------------------------------------------------------------------------------------ length cap


def word_count(text: str) -> int:
    """Whitespace-separated words: the token count used when no tokenizer is given."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! or ? (a closing quote or bracket stays with its sentence)."""
    return [piece for piece in _SENTENCE_END.split(text.strip()) if piece]


def cap_length(text: str, max_tokens: int, count_tokens: Callable[[str], int] = word_count) -> tuple[str, bool]:
    """(text, was_cut): `text` cut to at most `max_tokens` at the last sentence boundary that fits.
    When not even the first sentence after the verdict fits, that sentence is cut after its last
    whole word that fits and closed with "..." — never mid-word."""
    text = text.strip()
    if count_tokens(text) <= max_tokens:
        return text, False
    sentences = split_sentences(text)
    kept: list[str] = []
    for sentence in sentences:
        candidate = " ".join(kept + [sentence])
        if count_tokens(candidate) > max_tokens:
            break
        kept.append(sentence)
    # Keep at least one explaining sentence after the verdict ("Yes." alone explains nothing).
    minimum = 2 if sentences and verdict_of(sentences[0]) is not None and word_count(sentences[0]) == 1 else 1
    if len(kept) >= minimum:
        return " ".join(kept), True
    head, sentence = kept[: minimum - 1], sentences[len(kept)]
    words = sentence.split()
    while words:
        words.pop()
        candidate = " ".join(head + [" ".join(words).rstrip(",;:") + "..."]) if words else " ".join(head)
        if count_tokens(candidate) <= max_tokens:
            return candidate, True
    return " ".join(head), True


def normalise_verdict(text: str) -> tuple[Optional[int], str]:
    """(verdict, text rewritten to start with "Yes." or "No." then the explanation), or (None, text)."""
    text = (text or "").strip()
    match = LEADING_VERDICT.match(text)
    if match is None:
        return None, text
    verdict = 1 if match.group(1).lower() == "yes" else 0
    rest = text[match.end():].strip()
    rest = rest[:1].upper() + rest[1:]
    return verdict, ("Yes." if verdict else "No.") + (f" {rest}" if rest else "")


# ------------------------------------------------------------------------------------- interface


class ReasonSource:
    """Turns rows (record dicts: UserID, TargetItemID, TargetItemTitle, HisItemTitles, label, ...) into
    `ReasonResult`s. Subclasses implement `draft(rows)` → one raw answer (or None + error) per row;
    this class keeps an answer only if its verdict agrees with the label and caps its length."""

    name = "source"

    def __init__(self, max_reason_tokens: int = 200, count_tokens: Optional[Callable[[str], int]] = None):
        if max_reason_tokens < 4:
            raise ValueError(f"max_reason_tokens must be >= 4 (a verdict and a few words), got {max_reason_tokens}.")
        self.max_reason_tokens = max_reason_tokens
        self.count_tokens = count_tokens or word_count
        self.counters = ReasonCounters()

    def draft(self, rows: list[dict]) -> list[tuple[Optional[str], Optional[str]]]:
        """(raw answer, error) per row."""
        raise NotImplementedError(f"{type(self).__name__} must implement draft(rows).")

    def explain(self, rows: list[dict]) -> list[ReasonResult]:
        """One result per row, in order; never raises for a bad answer (it is counted instead)."""
        self._check_rows(rows)
        self.counters.add(asked=len(rows))
        drafts = self.draft(rows)
        return [self.finish(row, text, error) for row, (text, error) in zip(rows, drafts)]

    def _check_rows(self, rows: list[dict]) -> None:
        for index, row in enumerate(rows):
            for name in ("UserID", "TargetItemID", "label"):
                if name not in row:
                    raise ValueError(f"{self.name}: row {index} has no {name!r} field (record columns: docs/records.md).")

    def finish(self, row: dict, text: Optional[str], error: Optional[str], cached: bool = False) -> ReasonResult:
        """Check the verdict against the label, normalise the lead and cap the length."""
        result = ReasonResult(int(row["UserID"]), int(row["TargetItemID"]), int(row["label"]), FAILED, raw_text=text, cached=cached)
        if text is None or not text.strip():
            result.error = error or "empty answer"
            self.counters.add(failed=1)
            return result
        if not cached:
            self.counters.add(answered=1)
        verdict, normalised = normalise_verdict(text)
        if verdict is None:
            result.error = "answer does not start with Yes or No"
            self.counters.add(failed=1)
            return result
        if verdict != result.label:
            result.status, result.error = REJECTED_VERDICT, f"verdict {verdict} disagrees with label {result.label}"
            self.counters.add(rejected_verdict=1)
            return result
        if not _FINISHED.search(normalised):
            # Cut short (a teacher's token limit): keep the complete sentences only, and say so.
            self.counters.add(cut_short=1)
            complete = split_sentences(normalised)[:-1]
            if not complete or complete == [complete[0]] and word_count(complete[0]) == 1:  # nothing after "Yes."
                result.error = "answer cut short before its first complete sentence"
                self.counters.add(failed=1)
                return result
            normalised = " ".join(complete)
        reason, truncated = cap_length(normalised, self.max_reason_tokens, self.count_tokens)
        result.status, result.reason, result.truncated = KEPT, reason, truncated
        if truncated:
            self.counters.add(truncated=1)
        return result


def kept_reasons(results: Iterable[ReasonResult]) -> dict[tuple[int, int], str]:
    """{(UserID, TargetItemID): reason} of the kept results."""
    return {(r.user_id, r.item_id): r.reason for r in results if r.status == KEPT}


# ------------------------------------------------------------------------------------ record fields


def as_list(value) -> list:
    """A record list field (list, numpy array from pandas, or None) as a list."""
    return [] if value is None else list(value)


def quoted(title: str) -> str:
    """A title in double quotes, as reasons and prompts name items."""
    return f'"{title}"'


__all__ = [
    "FAILED",
    "KEPT",
    "REJECTED_VERDICT",
    "ReasonCounters",
    "ReasonResult",
    "ReasonSource",
    "cap_length",
    "kept_reasons",
    "normalise_verdict",
    "split_sentences",
    "word_count",
]
