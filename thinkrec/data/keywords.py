"""Item keywords — ThinkRec's "thinking activation": items enriched with up to ten keywords from their
metadata (title, genres, description), stored with the item table and shown in prompts and reasons.

Sources (the command is `extract_keywords.py`):
  minilm   the offline default: candidate phrases of the item's own text (genres, title and description
           n-grams) ranked by all-MiniLM-L6-v2 similarity to the whole text, with maximal marginal
           relevance so that near-duplicates are not all kept;
  tfidf    the phrases with the highest TF-IDF weight in the item's text against the whole catalogue;
  local    a local HF chat model asked, as published, to "extract up to ten key words" from the text
           cut to 100 words (cached, resumable);
  remote   the same question to an OpenAI-compatible server (cached, resumable, retried).

An item with no metadata text gets no keywords and is counted; a teacher answer that yields no keyword
is counted as failed and never cached, so a rerun asks again.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from thinkrec.data.items import split_genres, strip_year
from thinkrec.reasons.cache import ReasonCache
from thinkrec.utils.errors import InputError


logger = logging.getLogger("thinkrec.data.keywords")

METHODS = ("minilm", "tfidf", "local", "remote")
MAX_KEYWORDS = 10
TEACHER_INPUT_WORDS = 100  # the published extraction prompt reads at most this many words of the item
KEYWORDS_COLUMN = "keywords"
_TOKEN = re.compile(r"[a-z0-9][a-z0-9'&+-]*")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
KEYWORD_PROMPT = (
    "Extract up to ten key words from the following {item_noun} description, separated by commas. "
    "Answer with the key words only.\n\n{text}"
)


def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | {"de", "la", "le", "el", "les", "der", "die", "das", "ii", "iii", "iv"}


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def item_text(item: Mapping, max_words: Optional[int] = None) -> str:
    """The item's metadata as one text: title (its year dropped), genres, description; cut to `max_words`."""
    parts = [strip_year(_text(item.get("title")))]
    genres = split_genres(item.get("genres"))
    if genres:
        parts.append(", ".join(genres))
    parts.append(_text(item.get("description")))
    text = ". ".join(part for part in parts if part)
    if max_words is not None:
        text = " ".join(text.split()[:max_words])
    return text


def candidate_phrases(item: Mapping, max_words: int = TEACHER_INPUT_WORDS) -> list[str]:
    """Phrases an item's keywords are chosen from: its genres whole, then the one- and two-word
    n-grams of its title and description (no stopword, no bare number, unigrams of 3+ letters)."""
    stop = _stopwords()
    phrases = [g.lower() for g in split_genres(item.get("genres"))]
    for source in (strip_year(_text(item.get("title"))), " ".join(_text(item.get("description")).split()[:max_words])):
        tokens = _TOKEN.findall(source.lower())
        for n in (1, 2):
            for start in range(len(tokens) - n + 1):
                gram = tokens[start : start + n]
                if any(t in stop or t.isdigit() for t in gram) or (n == 1 and len(gram[0]) < 3):
                    continue
                phrases.append(" ".join(gram))
    return list(dict.fromkeys(phrases))


@dataclass
class KeywordCounters:
    """What an extraction did: items seen, items given keywords, items without any metadata text, teacher
    answers that gave no keyword (failed), answers served from the cache."""

    items: int = 0
    with_keywords: int = 0
    without_metadata: int = 0
    failed: int = 0
    cached: int = 0
    failures: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rows(items: pd.DataFrame) -> list[dict]:
    if "ItemID" not in items:
        raise InputError(f"item table: no ItemID column; found {list(items.columns)}.")
    return items.to_dict("records")


def minilm_keywords(items: pd.DataFrame, max_keywords: int = MAX_KEYWORDS, diversity: float = 0.3,
                    model_dir: Optional[str] = None) -> tuple[dict[int, list[str]], KeywordCounters]:
    """{ItemID: keywords} by embedding similarity with maximal marginal relevance: each next keyword
    maximises (1 - diversity) * sim(phrase, item) - diversity * max sim(phrase, chosen)."""
    from thinkrec.reasons.judge import sentence_embeddings

    rows, counters = _rows(items), KeywordCounters()
    texts = [item_text(row, TEACHER_INPUT_WORDS) for row in rows]
    candidates = [candidate_phrases(row) if text else [] for row, text in zip(rows, texts)]
    phrases = sorted({phrase for group in candidates for phrase in group})
    index = {phrase: i for i, phrase in enumerate(phrases)}
    phrase_vectors = sentence_embeddings(phrases, model_dir) if phrases else np.zeros((0, 0))
    documents = [text for text in texts if text]
    document_vectors = iter(sentence_embeddings(documents, model_dir)) if documents else iter(())
    result: dict[int, list[str]] = {}
    for row, text, group in zip(rows, texts, candidates):
        counters.items += 1
        item_id = int(row["ItemID"])
        if not text:
            counters.without_metadata += 1
            result[item_id] = []
            continue
        document = next(document_vectors)
        vectors = phrase_vectors[[index[p] for p in group]]
        relevance = vectors @ document
        chosen: list[int] = []
        open_ = np.ones(len(group), dtype=bool)
        while len(chosen) < max_keywords and open_.any():
            redundancy = (vectors @ vectors[chosen].T).max(1) if chosen else np.zeros(len(group))
            value = np.where(open_, (1 - diversity) * relevance - diversity * redundancy, -np.inf)
            pick = int(value.argmax())
            chosen.append(pick)
            # A phrase whose words all belong to a chosen one ("toy" after "toy story") adds nothing.
            words = set(group[pick].split())
            open_ &= np.array([not set(phrase.split()) <= words for phrase in group])
        result[item_id] = [group[i] for i in chosen]
        counters.with_keywords += bool(chosen)
    return result, counters


def tfidf_keywords(items: pd.DataFrame, max_keywords: int = MAX_KEYWORDS) -> tuple[dict[int, list[str]], KeywordCounters]:
    """{ItemID: keywords}: each item's candidate phrases by TF-IDF weight over the whole catalogue."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rows, counters = _rows(items), KeywordCounters()
    candidates = [candidate_phrases(row) if item_text(row) else [] for row in rows]
    result: dict[int, list[str]] = {}
    documents = [group for group in candidates if group]
    weights, vocabulary = None, {}
    if documents:
        vectorizer = TfidfVectorizer(analyzer=lambda group: group, sublinear_tf=True)
        matrix = vectorizer.fit_transform(documents).tocsr()
        vocabulary, weights = vectorizer.vocabulary_, iter(matrix)
    for row, group in zip(rows, candidates):
        counters.items += 1
        if not group:
            counters.without_metadata += 1
            result[int(row["ItemID"])] = []
            continue
        vector = next(weights).toarray().ravel()
        # Ties (common in short texts) keep the text's own order: genres first, then title words.
        ranked, kept = sorted(group, key=lambda phrase: -vector[vocabulary[phrase]]), []
        for phrase in ranked:
            if len(kept) < max_keywords and not any(set(phrase.split()) <= set(other.split()) for other in kept):
                kept.append(phrase)
        result[int(row["ItemID"])] = kept
        counters.with_keywords += 1
    return result, counters


def parse_keywords(text: Optional[str], max_keywords: int = MAX_KEYWORDS) -> list[str]:
    """Keywords from a teacher's answer: split on commas, semicolons and lines; list marks, quotes and a
    leading "Keywords:" removed; lower-cased; phrases over five words dropped; duplicates dropped."""
    text = re.sub(r"^\s*(?:key\s*words?|keywords?)\s*:\s*", "", text or "", flags=re.IGNORECASE)
    found = []
    for piece in re.split(r"[,;\n]", text):
        piece = _LIST_MARK.sub("", piece).strip().strip("\"'`.*").strip().lower()
        if piece and len(piece.split()) <= 5 and re.search(r"[a-z0-9]", piece):
            found.append(piece)
    return list(dict.fromkeys(found))[:max_keywords]


def teacher_keywords(teacher, items: pd.DataFrame, cache_path: Optional[str | Path], model_name: str,
                     item_noun: str = "item", max_keywords: int = MAX_KEYWORDS, block: int = 64
                     ) -> tuple[dict[int, list[str]], KeywordCounters]:
    """{ItemID: keywords} from a `LocalTeacher` or `RemoteTeacher` (thinkrec/reasons/), asked
    with the published extraction prompt on the item text cut to 100 words. Usable answers are cached
    (JSON lines keyed by ItemID and `model_name`) after every `block` items, so a rerun resumes."""
    rows, counters = _rows(items), KeywordCounters()
    cache = ReasonCache(cache_path, model_name, key_fields=("ItemID",)) if cache_path else None
    result: dict[int, list[str]] = {}
    pending = []
    for row in rows:
        counters.items += 1
        item_id, text = int(row["ItemID"]), item_text(row, TEACHER_INPUT_WORDS)
        if not text:
            counters.without_metadata += 1
            result[item_id] = []
            continue
        cached = cache.get(item_id) if cache else None
        if cached is not None:
            counters.cached += 1
            result[item_id] = parse_keywords(cached, max_keywords)
            continue
        pending.append((item_id, [{"role": "user", "content": KEYWORD_PROMPT.format(item_noun=item_noun, text=text)}]))
    failures: Counter = Counter()
    for start in range(0, len(pending), block):
        chunk = pending[start : start + block]
        conversations = [messages for _, messages in chunk]
        answers = teacher.complete(conversations, lambda text: None if parse_keywords(text) else "no keyword in the answer")
        for (item_id, _), (answer, error) in zip(chunk, answers):
            keywords = parse_keywords(answer, max_keywords)
            if not keywords:
                counters.failed += 1
                failures[error or "no keyword in the answer"] += 1
                result[item_id] = []
                continue
            if cache:
                cache.put(item_id, answer)
            result[item_id] = keywords
        logger.info("keywords: %d of %d items asked", min(start + block, len(pending)), len(pending))
    counters.with_keywords = sum(bool(words) for words in result.values())
    counters.failures = dict(failures.most_common(5))
    return result, counters


# ------------------------------------------------------------------------------------ records


def item_keywords(items: pd.DataFrame, origin: str = "item table") -> dict[int, list[str]]:
    """{ItemID: keywords} stored in a prepared item table; a clear error when there are none."""
    if KEYWORDS_COLUMN not in items:
        raise InputError(f"{origin}: the items have no keywords; run extract_keywords.py --records_dir <folder> first.")
    return {int(i): [str(k) for k in (words if words is not None else [])] for i, words in zip(items["ItemID"], items[KEYWORDS_COLUMN])}


def _keywords_of(keywords: Mapping[int, list[str]], ids: Iterable) -> list[list[str]]:
    return [list(keywords.get(int(i), [])) for i in ids]


def attach_keywords(frame: pd.DataFrame, keywords: Mapping[int, list[str]]) -> pd.DataFrame:
    """Record rows with `TargetItemKeywords` and `HisItemKeywords` (one list per history item) added."""
    frame = frame.copy()
    frame["TargetItemKeywords"] = _keywords_of(keywords, frame["TargetItemID"])
    frame["HisItemKeywords"] = [_keywords_of(keywords, ids) for ids in frame["HisItemIDs"]]
    return frame


def attach_keywords_to_dataset(dataset, keywords: Mapping[int, list[str]]):
    """`attach_keywords` for a `datasets.Dataset` (a cached `map`)."""
    import datasets

    features = dataset.features.copy()
    features["TargetItemKeywords"] = datasets.List(datasets.Value("string"))
    features["HisItemKeywords"] = datasets.List(datasets.List(datasets.Value("string")))

    def add(batch):
        return {"TargetItemKeywords": _keywords_of(keywords, batch["TargetItemID"]),
                "HisItemKeywords": [_keywords_of(keywords, ids) for ids in batch["HisItemIDs"]]}

    return dataset.map(add, batched=True, features=features, desc="attaching item keywords")


def save_item_keywords(records_dir: str | Path, keywords: Mapping[int, list[str]], info: dict) -> Path:
    """Store keywords in a prepared folder's item table (a new file, named by content, recorded in the
    folder's manifest), then point `metadata.json` (with `info` under "item_keywords") and the dataset card
    to it; the old item file is removed last. Returns the new item file."""
    import pyarrow as pa

    from thinkrec.data.records import item_features, load_prepared, owned_files, publish_prepared, write_table

    directory = Path(records_dir)
    records = load_prepared(directory)
    items = records.items.copy()
    unknown = sorted(set(int(i) for i in keywords) - set(int(i) for i in items["ItemID"]))
    if unknown:
        raise InputError(f"{directory}: keywords given for ItemIDs not in the item table, e.g. {unknown[:5]}.")
    items[KEYWORDS_COLUMN] = _keywords_of(keywords, items["ItemID"])
    output_format = records.metadata.get("output_format", "parquet")
    manifest = owned_files(directory)
    name = write_table(pa.Table.from_pandas(items, preserve_index=False), directory, "items", item_features(items), output_format)
    manifest.add(name)
    records.items = items
    records.metadata = dict(records.metadata, item_keywords=info)
    publish_prepared(records, directory, dict(records.metadata["files"], items=name), manifest)
    return directory / name


__all__ = [
    "KEYWORD_PROMPT",
    "KeywordCounters",
    "METHODS",
    "attach_keywords",
    "attach_keywords_to_dataset",
    "candidate_phrases",
    "item_keywords",
    "item_text",
    "minilm_keywords",
    "parse_keywords",
    "save_item_keywords",
    "teacher_keywords",
    "tfidf_keywords",
]
