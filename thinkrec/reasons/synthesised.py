"""Reasons with no model: `SynthesisedReasons` explains a row's label from the row's own data — the
offline default source and the teachers' fallback.

    >>> source = SynthesisedReasons(seed=0)
    >>> result, = source.explain([{"UserID": 1, "TargetItemID": 2, "TargetItemTitle": "Heat (1995)",
    ...     "HisItemIDs": [], "HisItemTitles": [], "label": 0}])
    >>> result.reason.startswith("No.")
    True
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Callable, Optional

import numpy as np

from thinkrec.data.items import split_genres, strip_year
from thinkrec.data.keywords import KEYWORDS_COLUMN, item_keywords
from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns, item_nouns_from_metadata
from thinkrec.reasons.base import ReasonSource, as_list, quoted


_STOPWORDS = frozenset(
    "the a an and of in on at to for with from by is it its this that my your his her their our you me we "
    "i he she they them as or but not no be was are were de la le el les der die das part ii iii iv".split()
)


def _genre_phrase(genre: str) -> str:
    return genre.lower().replace("film-noir", "film noir")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


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
        titles = [str(t) for t in as_list(row.get("HisItemTitles"))]
        ids = [int(i) for i in as_list(row.get("HisItemIDs"))]
        labels = as_list(row.get("HisItemLabels")) or [1] * len(ids)
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
            "target": quoted(row.get("TargetItemTitle", f"item {row['TargetItemID']}")),
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
            examples = _join([quoted(h["title"]) for h in related[:2]])
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
                newest_title = quoted(newest["title"])
                subject = f"The most recent of them, {newest_title}," if len(related) > 1 else newest_title
                out.append(rng.choice([
                    f"{subject} was among the user's latest picks, so this taste is current.",
                    f"The interest is fresh: {quoted(newest['title'])} came right at the end of the history.",
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
                f"It shares {shared} with {quoted(link['title'])}, which the user enjoyed.",
                f"Like {quoted(link['title'])}, a {noun} the user liked, it is about {shared}.",
            ]))
        elif f["word_links"]:
            link = f["word_links"][0]
            out.append(rng.choice([
                f"Its title shares \"{link['words'][0]}\" with {quoted(link['title'])}, which the user enjoyed, hinting that the two are related.",
                f"It also looks connected to {quoted(link['title'])}, {_with_article(noun)} the user liked.",
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
                f"The user disliked {quoted(miss['title'])}, another {genre} {noun}.",
                f"A similar {genre} {noun}, {quoted(miss['title'])}, already disappointed this user.",
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
                f"Although the user likes {genre} {nouns} such as {quoted(related[0]['title'])}, they seem selective among them, and {target} does not stand out.",
                f"Liking {genre} {nouns} like {quoted(related[0]['title'])} does not mean liking every one of them, and {target} is a weaker fit.",
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
                f"It shares {shared} with {quoted(miss['title'])}, which the user did not like.",
                f"Its {shared} side recalls {quoted(miss['title'])}, a {noun} the user disliked.",
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


__all__ = ["SynthesisedReasons"]
