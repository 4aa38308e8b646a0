"""Where reasons come from: one `ReasonSource` interface and three sources — `SynthesisedReasons`
(no model, explains a label from the row's own data), `LocalTeacher` (any HF causal LM) and
`RemoteTeacher` (an OpenAI-compatible chat API with retries and a resumable cache).

Every source returns, per row, a reason that starts with the verdict ("Yes." / "No.") agreeing with
the row's label, capped in tokens at a sentence boundary — or no reason, with why.

    >>> source = SynthesisedReasons(seed=0)
    >>> result, = source.explain([{"UserID": 1, "TargetItemID": 2, "TargetItemTitle": "Heat (1995)",
    ...     "HisItemIDs": [], "HisItemTitles": [], "label": 0}])
    >>> result.reason.startswith("No.")
    True
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from thinkrec.data.items import split_genres, strip_year
from thinkrec.data.keywords import KEYWORDS_COLUMN, item_keywords
from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns, item_nouns_from_metadata
from thinkrec.evaluation.reporting import LEADING_VERDICT, verdict_of
from thinkrec.utils.errors import InputError


logger = logging.getLogger("thinkrec.reasons.sources")

KEPT, REJECTED_VERDICT, FAILED = "kept", "rejected_verdict", "failed"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_FINISHED = re.compile(r"[.!?…][\"')\]]*\s*$")
_WORD = re.compile(r"\S+")
_STOPWORDS = frozenset(
    "the a an and of in on at to for with from by is it its this that my your his her their our you me we "
    "i he she they them as or but not no be was are were de la le el les der die das part ii iii iv".split()
)


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


# ----------------------------------------------------------------------------------- synthesiser


def _as_list(value) -> list:
    """A record list field (list, numpy array from pandas, or None) as a list."""
    return [] if value is None else list(value)


def _genre_phrase(genre: str) -> str:
    return genre.lower().replace("film-noir", "film noir")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _quoted(title: str) -> str:
    return f'"{title}"'


def _title_words(title: str) -> set[str]:
    words = re.findall(r"[a-z0-9']+", strip_year(title).lower())
    return {w for w in words if len(w) >= 4 and w not in _STOPWORDS and not w.isdigit()}


def _counted(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class SynthesisedReasons(ReasonSource):
    """Explains a row's label from its own data, no model: overlap of the target's genres and title
    words with the history's, how recent and consistent the related history is, and the target's
    popularity in train. Deterministic per (seed, user, item); the offline default and fallback.

    Args:
        items: item table with `ItemID` and `genres` ("|"-separated); None = titles only.
        train: train split (`TargetItemID` counts give popularity); None = no popularity sentences.
        seed: picks the phrasing.
        item_noun, item_noun_plural: what the items are ("game"/"games"); `from_records` reads the records' own.
    """

    name = "synthesised"

    def __init__(self, items=None, train=None, seed: int = 0, max_reason_tokens: int = 200,
                 count_tokens: Optional[Callable[[str], int]] = None, item_noun: str = DEFAULT_ITEM_NOUN,
                 item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL):
        super().__init__(max_reason_tokens, count_tokens)
        nouns = check_item_nouns(item_noun, item_noun_plural, type(self).__name__)
        self.item_noun, self.item_noun_plural = nouns["item_noun"], nouns["item_noun_plural"]
        self.seed = seed
        self.item_genres: dict[int, list[str]] = {}
        if items is not None and "genres" in items:
            self.item_genres = {int(i): split_genres(g) for i, g in zip(items["ItemID"], items["genres"])}
        # Keywords (extract_keywords.py) other than the item's genres, which the genre sentences already use.
        self.item_keywords: dict[int, list[str]] = {}
        if items is not None and KEYWORDS_COLUMN in items:
            for item_id, words in item_keywords(items).items():
                genres = {g.lower() for g in self.item_genres.get(item_id, [])}
                self.item_keywords[item_id] = [w for w in words if w.lower() not in genres]
        self.popularity: dict[int, int] = {}
        self.popular_at = self.niche_at = None
        if train is not None and len(train):
            counts = train["TargetItemID"].value_counts()
            self.popularity = {int(i): int(c) for i, c in counts.items()}
            self.popular_at, self.niche_at = np.quantile(counts.to_numpy(), [0.8, 0.3])

    @classmethod
    def from_records(cls, records, **kwargs) -> "SynthesisedReasons":
        """From `thinkrec.data.records.load_prepared(dir)`: its item table, train split and item nouns."""
        return cls(items=records.items, train=records.splits["train"], **{**item_nouns_from_metadata(records.metadata), **kwargs})

    def draft(self, rows: list[dict]) -> list[tuple[Optional[str], Optional[str]]]:
        return [(self.synthesise(row), None) for row in rows]

    # Facts about one row, gathered once and read by the sentence builders.
    def _facts(self, row: dict) -> dict:
        titles = [str(t) for t in _as_list(row.get("HisItemTitles"))]
        ids = [int(i) for i in _as_list(row.get("HisItemIDs"))]
        labels = _as_list(row.get("HisItemLabels")) or [1] * len(ids)
        target_genres = self.item_genres.get(int(row["TargetItemID"]), [])
        target_words = _title_words(row.get("TargetItemTitle", ""))
        target_keywords = self.item_keywords.get(int(row["TargetItemID"]), [])
        history = []
        for position, (item_id, title, liked) in enumerate(zip(ids, titles, labels)):
            genres = self.item_genres.get(item_id, [])
            item_keywords = set(self.item_keywords.get(item_id, []))
            history.append({
                "keywords": [k for k in target_keywords if k in item_keywords],
                "title": title,
                "ago": len(ids) - position,  # 1 = the most recent
                "liked": int(liked) == 1,
                "shared": [g for g in genres if g in target_genres],
                "words": sorted(_title_words(title) & target_words),
                "genres": genres,
            })
        liked = [h for h in history if h["liked"]]
        disliked = [h for h in history if not h["liked"]]
        liked_genres = Counter(g for h in liked for g in h["genres"])
        count = self.popularity.get(int(row["TargetItemID"]), 0)
        return {
            "target": _quoted(row.get("TargetItemTitle", f"item {row['TargetItemID']}")),
            "target_genres": target_genres,
            "liked": liked,
            "related": sorted([h for h in liked if h["shared"]], key=lambda h: h["ago"]),
            "related_disliked": sorted([h for h in disliked if h["shared"]], key=lambda h: h["ago"]),
            "word_links": [h for h in liked if h["words"]],
            "keyword_links": sorted([h for h in liked if h["keywords"]], key=lambda h: h["ago"]),
            "keyword_misses": sorted([h for h in disliked if h["keywords"]], key=lambda h: h["ago"]),
            "top_genres": [g for g, _ in liked_genres.most_common(2)],
            "recent_genres": [g for g, _ in Counter(g for h in liked if h["ago"] <= 3 for g in h["genres"]).most_common(2)],
            "shared_counts": Counter(g for h in liked for g in h["shared"]),
            "count": count,
            "popular": self.popular_at is not None and count >= self.popular_at,
            "niche": self.popular_at is not None and count <= self.niche_at,
        }

    def synthesise(self, row: dict) -> str:
        """Verdict plus two to four sentences explaining the row's label."""
        rng = random.Random(f"{self.seed}-{int(row['UserID'])}-{int(row['TargetItemID'])}")
        facts = self._facts(row)
        label = int(row["label"])
        sentences = self._positive(facts, rng) if label == 1 else self._negative(facts, rng)
        return ("Yes. " if label == 1 else "No. ") + " ".join(sentences)

    def _positive(self, f: dict, rng: random.Random) -> list[str]:
        out, target = [], f["target"]
        noun, nouns = self.item_noun, self.item_noun_plural
        n_liked, related = len(f["liked"]), f["related"]
        if related:
            genre = _genre_phrase(f["shared_counts"].most_common(1)[0][0])
            examples = _join([_quoted(h["title"]) for h in related[:2]])
            share = len(related) / max(n_liked, 1)
            one = len(related) == 1
            if n_liked == 1:
                subject = f"The only {noun} the user liked"
            elif len(related) == n_liked:
                subject = f"All {n_liked} {nouns} the user liked"
            else:
                subject = f"{len(related)} of the {n_liked} {nouns} the user liked"
            kind = f"{_with_article(genre)} {noun}" if one else f"{genre} {nouns}"
            choices = [
                f"{subject} {'is' if one else 'are'} {kind} ({examples}), and {target} is {_with_article(genre)} {noun} too.",
                f"{target} is {_with_article(genre)} {noun}, and {genre} {nouns} run through the user's favourites, including {examples}.",
            ]
            if not one:
                choices.append(f"The user keeps coming back to {genre} {nouns} like {examples}, and {target} is one as well.")
            out.append(rng.choice(choices))
            newest = related[0]
            if newest["ago"] <= 2:
                newest_title = _quoted(newest["title"])
                subject = f"The most recent of them, {newest_title}," if len(related) > 1 else newest_title
                out.append(rng.choice([
                    f"{subject} was among the user's latest picks, so this taste is current.",
                    f"The interest is fresh: {_quoted(newest['title'])} came right at the end of the history.",
                ]))
            elif share >= 0.5:
                out.append(rng.choice([
                    f"The preference is consistent rather than a one-off, since most of the liked {nouns} share it.",
                    "This is a steady pattern across the history, not a single lucky match.",
                ]))
        elif f["top_genres"]:
            out.append(rng.choice([
                f"The user's favourites lean towards {_join([_genre_phrase(g) for g in f['top_genres']])} {nouns}, and {target} offers a change of pace that a user with broad taste tends to enjoy.",
                f"Although {target} is unlike the {nouns} the user liked before, the user enjoys a wide range of them.",
            ]))
        if f["keyword_links"]:
            link = f["keyword_links"][0]
            shared = _join([f'"{k}"' for k in link["keywords"][:2]])
            out.append(rng.choice([
                f"It shares {shared} with {_quoted(link['title'])}, which the user enjoyed.",
                f"Like {_quoted(link['title'])}, a {noun} the user liked, it is about {shared}.",
            ]))
        elif f["word_links"]:
            link = f["word_links"][0]
            out.append(rng.choice([
                f"Its title shares \"{link['words'][0]}\" with {_quoted(link['title'])}, which the user enjoyed, hinting that the two are related.",
                f"It also looks connected to {_quoted(link['title'])}, {_with_article(noun)} the user liked.",
            ]))
        if f["popular"]:
            also = " also" if out else ""
            out.append(rng.choice([
                f"It is{also} one of the most popular {nouns} in the data ({_counted(f['count'], 'training interaction')}), a safe recommendation.",
                "Its wide popularity makes a positive reaction even more likely.",
            ]))
        if not out:
            out.append(rng.choice([
                f"With little history to go on, {target} is a reasonable guess for a user who likes most {nouns} they try.",
                f"The user's short history gives no strong signal against {target}, and it is the kind of {noun} most users enjoy.",
            ]))
        return out

    def _negative(self, f: dict, rng: random.Random) -> list[str]:
        out, target = [], f["target"]
        noun, nouns = self.item_noun, self.item_noun_plural
        n_liked, related = len(f["liked"]), f["related"]
        target_genre = _genre_phrase(f["target_genres"][0]) if f["target_genres"] else None
        if f["related_disliked"]:
            miss = f["related_disliked"][0]
            genre = _genre_phrase(miss["shared"][0])
            out.append(rng.choice([
                f"The user disliked {_quoted(miss['title'])}, another {genre} {noun}.",
                f"A similar {genre} {noun}, {_quoted(miss['title'])}, already disappointed this user.",
            ]))
        if not related and target_genre and n_liked:
            favourites = f"{_join([_genre_phrase(g) for g in f['top_genres']])} {nouns}" if f["top_genres"] else f"other kinds of {nouns}"
            out.append(rng.choice([
                f"None of the {nouns} the user liked is {_with_article(target_genre)} {noun}; their favourites are mostly {favourites}.",
                f"{target} is {_with_article(target_genre)} {noun}, while the user's favourites are mostly {favourites}.",
            ]))
        elif related and len(related) / max(n_liked, 1) < 0.3:
            one = len(related) == 1
            out.append(rng.choice([
                f"Only {len(related)} of the {n_liked} {nouns} the user liked {'is' if one else 'are'} of the same kind as {target}, so it sits at the edge of the user's taste.",
                f"The link is thin: just {len(related)} of {n_liked} favourites {'resembles' if one else 'resemble'} {target}.",
            ]))
        elif related:
            genre = _genre_phrase(f["shared_counts"].most_common(1)[0][0])
            out.append(rng.choice([
                f"Although the user likes {genre} {nouns} such as {_quoted(related[0]['title'])}, they seem selective among them, and {target} does not stand out.",
                f"Liking {genre} {nouns} like {_quoted(related[0]['title'])} does not mean liking every one of them, and {target} is a weaker fit.",
            ]))
            if related[0]["ago"] > 3 and f["recent_genres"]:
                recent = _join([_genre_phrase(g) for g in f["recent_genres"]])
                out.append(rng.choice([
                    f"Those related picks are also far back in the history; lately the user has favoured {recent} {nouns}.",
                    f"Recently the user has moved on to {recent} {nouns}.",
                ]))
        if f["keyword_misses"]:
            miss = f["keyword_misses"][0]
            shared = _join([f'"{k}"' for k in miss["keywords"][:2]])
            out.append(rng.choice([
                f"It shares {shared} with {_quoted(miss['title'])}, which the user did not like.",
                f"Its {shared} side recalls {_quoted(miss['title'])}, a {noun} the user disliked.",
            ]))
        if f["niche"]:
            also = " also" if out else ""
            out.append(rng.choice([
                f"It is{also} a rarely chosen {noun} ({_counted(f['count'], 'training interaction')}), which makes it a riskier suggestion.",
                "Few users in the data have chosen it, another sign it is a hard sell.",
            ]))
        if not out:
            out.append(rng.choice([
                f"The user's history gives no clear reason to expect enjoyment of {target}.",
                f"Nothing in what the user liked so far points towards {target}.",
            ]))
        return out


# --------------------------------------------------------------------------------- teacher prompt

TEACHER_SYSTEM = (
    "You explain {item_noun} recommendations. You are told the true answer; justify it from the user's history "
    "in two to four sentences. Start with \"Yes.\" or \"No.\" exactly as given."
)


def teacher_system(item_noun: str = DEFAULT_ITEM_NOUN) -> str:
    """The teacher's system message (`TEACHER_SYSTEM`) for items called `item_noun`."""
    return TEACHER_SYSTEM.format(item_noun=item_noun)


def teacher_prompt(row: dict, max_history: int = 10, item_noun: str = DEFAULT_ITEM_NOUN,
                   item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL) -> str:
    """The question for a teacher: the history, the target and the true answer as a hint."""
    all_titles = _as_list(row.get("HisItemTitles"))
    titles = [_quoted(str(t)) for t in all_titles[-max_history:]]
    labels = (_as_list(row.get("HisItemLabels")) or [1] * len(all_titles))[-max_history:]
    if any(int(label) == 0 for label in labels):
        liked = [t for t, label in zip(titles, labels) if int(label) == 1]
        disliked = [t for t, label in zip(titles, labels) if int(label) == 0]
        history = f"The user liked: {', '.join(liked) or 'none'}. The user disliked: {', '.join(disliked)}."
    else:
        history = f"The user has given high ratings to: {', '.join(titles) or f'no {item_noun_plural} yet'}."
    answer = "Yes" if int(row["label"]) == 1 else "No"
    keywords = _as_list(row.get("TargetItemKeywords"))
    about = f" (keywords: {', '.join(str(k) for k in keywords)})" if keywords else ""
    return (
        f"{history}\nWould the user enjoy the {item_noun} {_quoted(str(row.get('TargetItemTitle', '')))}{about}?\n"
        f"The true answer is {answer}. Begin with \"{answer}.\" and explain why in a few sentences."
    )


# ---------------------------------------------------------------------------------- local teacher


class LocalTeacher(ReasonSource):
    """A local HF causal LM as teacher, prompted through its chat template with the true answer as a
    hint, batched greedy generation.

    Args:
        model_name_or_path: path or id of a causal LM; None = the bundled SmolLM2-135M-Instruct.
        prefill_verdict: start the assistant turn with the true verdict ("Yes."), so that small
            teachers, which often open with filler, explain the given answer instead.
        batch_size, max_new_tokens: generation settings.
        no_repeat_ngram_size: greedy decoding never repeats a word 3-gram (0 = off); small teachers loop without it.
        item_noun, item_noun_plural: what the items are, as the prompts name them.
        load_kwargs: `from_pretrained` arguments of the teacher (dtype, 4-bit, attention, device), from
            `thinkrec.training.loading.load_kwargs`, the load path every model here goes through; default:
            bfloat16 on a GPU that supports it (placed there), float32 on the CPU.
    """

    name = "local"

    def __init__(self, model_name_or_path: Optional[str] = None, batch_size: int = 8, max_new_tokens: int = 160,
                 prefill_verdict: bool = True, max_reason_tokens: int = 200, load_kwargs: Optional[dict] = None,
                 model=None, tokenizer=None,
                 item_noun: str = DEFAULT_ITEM_NOUN, item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL,
                 no_repeat_ngram_size: int = 3):
        from thinkrec.training import loading

        self.no_repeat_ngram_size = no_repeat_ngram_size

        if model is None:
            if model_name_or_path is None:
                from thinkrec.training.backbones import smollm2_model_dir

                model_name_or_path = str(smollm2_model_dir())
            if load_kwargs is None:
                load_kwargs = loading.load_kwargs(device_map=loading.inference_device_map())
            # The one load path: a missing folder, tokenizer or weights, or a broken weights file, is one message.
            tokenizer = loading.load_tokenizer(model_name_or_path, "teacher_model")
            model = loading.load_language_model(model_name_or_path, "teacher_model", **load_kwargs)
        if tokenizer is None:
            raise ValueError("LocalTeacher: a model passed in needs its tokenizer too.")
        if not tokenizer.chat_template:
            raise ValueError(f"LocalTeacher: the tokenizer of {model_name_or_path or 'the model'} has no chat template.")
        self.nouns = check_item_nouns(item_noun, item_noun_plural, type(self).__name__)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_new_tokens, self.prefill_verdict = batch_size, max_new_tokens, prefill_verdict
        super().__init__(max_reason_tokens, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    def _prompt(self, row: dict) -> str:
        messages = [{"role": "system", "content": teacher_system(self.nouns["item_noun"])},
                    {"role": "user", "content": teacher_prompt(row, **self.nouns)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + (self._verdict(row) if self.prefill_verdict else "")

    @staticmethod
    def _verdict(row: dict) -> str:
        return "Yes." if int(row["label"]) == 1 else "No."

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of already-templated `prompts`, in batches, stripped."""
        import torch

        texts: list[str] = []
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation continues every row from the same column
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = self.tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                       add_special_tokens=False).to(self.model.device)
                with torch.no_grad():
                    # no_repeat_ngram_size: small teachers otherwise loop on a phrase until the token limit.
                    generated = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                                    pad_token_id=pad_id, no_repeat_ngram_size=self.no_repeat_ngram_size)
                texts += [text.strip() for text in self.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:],
                                                                               skip_special_tokens=True)]
        finally:
            self.tokenizer.padding_side = side
        return texts

    def complete(self, conversations: list[list[dict]], problem: Callable[[str], Optional[str]] = lambda text: None
                 ) -> list[tuple[Optional[str], Optional[str]]]:
        """(answer, error) for each chat (a list of role/content messages); an answer for which `problem`
        names a fault comes back as (None, fault) — greedy decoding would give the same answer again."""
        prompts = [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in conversations]
        out = []
        for text in self.generate(prompts):
            fault = "empty generation" if not text else problem(text)
            out.append((None, fault) if fault else (text, None))
        return out

    def draft(self, rows: list[dict]) -> list[tuple[Optional[str], Optional[str]]]:
        out: list[tuple[Optional[str], Optional[str]]] = []
        for row, text in zip(rows, self.generate([self._prompt(row) for row in rows])):
            if self.prefill_verdict:
                text = f"{self._verdict(row)} {text}" if text else ""
            out.append((text, None if text else "empty generation"))
        return out


# --------------------------------------------------------------------------------- remote teacher


class ReasonCache:
    """Append-only JSON-lines cache of teacher answers keyed by (UserID, TargetItemID) — or by other
    integer fields (`key_fields`, e.g. ("ItemID",) for item keywords). Each line is flushed and fsynced,
    so a crash loses at most the line being written; a torn last line is ignored and cut off before the
    next append."""

    def __init__(self, path: os.PathLike | str, model: str, key_fields: tuple[str, ...] = ("UserID", "TargetItemID")):
        self.path, self.model, self.key_fields = Path(path), model, tuple(key_fields)
        self._lock = threading.Lock()
        self.entries: dict[tuple[int, ...], str] = {}
        self.torn_lines = 0
        self._cut_at: Optional[int] = None  # byte length to truncate a torn tail to before appending
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        other_models = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = tuple(int(entry[name]) for name in self.key_fields)
                text = str(entry["text"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
                if number == len(lines):  # the last line: a write cut short by a crash
                    self.torn_lines += 1
                    self._cut_at = len(data) - len(line)
                    logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(line))
                    continue
                expected = ", ".join(f'"{name}"' for name in (*self.key_fields, "model", "text"))
                raise ValueError(f"{self.path} line {number}: not a cache entry ({error}); expected {{{expected}}}.") from error
            if entry.get("model") != self.model:
                other_models += 1
                continue
            self.entries[key] = text
        if other_models:
            logger.info("%s: %d entries from other models are not reused", self.path, other_models)

    def get(self, *key: int) -> Optional[str]:
        return self.entries.get(tuple(int(k) for k in key))

    def put(self, *key_and_text) -> None:
        *key, text = key_and_text
        if len(key) != len(self.key_fields):
            raise ValueError(f"{self.path}: a cache key is {self.key_fields}, got {tuple(key)}.")
        key = tuple(int(k) for k in key)
        line = json.dumps({**dict(zip(self.key_fields, key)), "model": self.model, "text": text}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._cut_at is not None:
                # Drop the torn tail so the new entry starts on a line of its own.
                os.truncate(self.path, self._cut_at)
                self._cut_at = None
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[key] = text


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


SOURCES = ("synthesised", "local", "remote")

__all__ = [
    "LocalTeacher",
    "ReasonCache",
    "ReasonCounters",
    "ReasonResult",
    "ReasonSource",
    "RemoteTeacher",
    "SOURCES",
    "SynthesisedReasons",
    "cap_length",
    "kept_reasons",
    "normalise_verdict",
    "split_sentences",
    "teacher_prompt",
    "teacher_system",
    "word_count",
]
