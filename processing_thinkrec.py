"""ThinkRecProcessor: records in, ThinkRec model inputs out. It renders a record (a user's history of
titles and ids, a target item) into the prompt of its template, with the item nouns and the user/item
id slots; tokenises prompt and answer (answers end in EOS); drops the oldest history titles until the
prompt fits the token budget; and pads batches (prompts on the left, answers on the right).

It is part of a checkpoint's code, next to `modeling_thinkrec.py`: it holds the templates' text, not
file paths, and loads with `AutoProcessor.from_pretrained(dir_or_repo, trust_remote_code=True)`. The
training pipeline maps the same `encode` over its records, so a Hub user's prompts are the training ones.
"""

import functools
import numbers
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin
from transformers.utils import logging


# Imported two ways, like the other checkpoint files: relatively inside a checkpoint's remote code,
# absolutely as a top-level module of the repository.
try:
    from .configuration_thinkrec import ThinkRecConfig
except ImportError:
    if __package__:
        raise
    from configuration_thinkrec import ThinkRecConfig


IGNORE_INDEX = -100
MODES = {"rec": 0, "reason": 1}
# <ItemTitleList> and <HisItemList> are the published names of the liked history (CoLLM histories hold
# liked items only); <DislikedItemTitleList> needs HisItemLabels. Text between <IfDisliked> and
# </IfDisliked> is kept only when the shown history holds a disliked item.
LIKED_LISTS = ("<LikedItemTitleList>", "<ItemTitleList>", "<HisItemList>")
DISLIKED_LIST = "<DislikedItemTitleList>"
NOUNS = {"<ItemNoun>": "item_noun", "<ItemNounPlural>": "item_noun_plural"}
IF_DISLIKED, END_IF_DISLIKED = "<IfDisliked>", "</IfDisliked>"
# The target's keywords (extract_keywords.py), comma-separated; records then carry TargetItemKeywords.
TARGET_KEYWORDS = "<TargetItemKeywords>"
KEYWORD_FIELDS = ("TargetItemKeywords", "HisItemKeywords")
PLACEHOLDERS = ("<UserID>", *LIKED_LISTS, DISLIKED_LIST, *NOUNS, "<TargetItemTitle>", "<TargetItemID>", TARGET_KEYWORDS,
                IF_DISLIKED, END_IF_DISLIKED)
_PLACEHOLDER_PATTERN = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
_IF_DISLIKED_BLOCK = re.compile(re.escape(IF_DISLIKED) + ".*?" + re.escape(END_IF_DISLIKED), re.DOTALL)
# What a prompt needs; training rows also need their answer (`label`, `mode`, and `reason` for reasoning rows).
RECORD_FIELDS = ("UserID", "HisItemIDs", "HisItemTitles", "TargetItemID", "TargetItemTitle")
REQUIRED_FIELDS = (*RECORD_FIELDS, "label", "mode")
# Per-row outputs of `encode` (the columns the training pipeline caches) and the model's inputs.
ENCODED_COLUMNS = ("prompt_ids", "answer_ids", "user_slot_ids", "item_slot_ids", "history_item_ids", "prompt_length", "answer_length")
MODEL_INPUTS = ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids", "history_item_ids", "user_ids")
# A generated reason starts with the verdict of its row's score: P(Yes) >= threshold gives "Yes.".
VERDICTS = ("No.", "Yes.")
# `recommend`: what a user record holds (the target comes from each candidate) and what a candidate gives.
USER_FIELDS = ("UserID", "HisItemIDs", "HisItemTitles")
CANDIDATE_FIELDS = ("TargetItemID", "TargetItemTitle", "TargetItemKeywords")

logger = logging.get_logger(__name__)


class ProcessorInputError(ValueError):
    """A record or template the processor cannot use; the message names the row, field or template."""


def check_template(text: str, origin: str) -> None:
    """Stop on a template without a target or with unbalanced <IfDisliked> blocks, naming `origin`."""
    if "<TargetItemTitle>" not in text and "<TargetItemID>" not in text:
        raise ProcessorInputError(f"{origin}: a template must name the target (<TargetItemTitle> or <TargetItemID>).")
    markers = [piece for piece in _PLACEHOLDER_PATTERN.findall(text) if piece in (IF_DISLIKED, END_IF_DISLIKED)]
    if markers != [IF_DISLIKED, END_IF_DISLIKED] * (len(markers) // 2):
        raise ProcessorInputError(f"{origin}: every {IF_DISLIKED} needs its own {END_IF_DISLIKED} after it (no nesting), found {markers}.")


def asks_for_disliked_titles(template: str) -> bool:
    """Whether a template needs disliked titles whatever the history (outside an <IfDisliked> block)."""
    return DISLIKED_LIST in _IF_DISLIKED_BLOCK.sub("", template)


@functools.lru_cache(maxsize=64)
def _template_pieces(template: str) -> tuple[str, ...]:
    return tuple(_PLACEHOLDER_PATTERN.split(template))


def uses_keywords(template: str) -> bool:
    """Whether a template names the target's keywords."""
    return TARGET_KEYWORDS in template


def _history_labels(record: Mapping) -> list[int]:
    """Labels of the history items; a history without `HisItemLabels` holds liked items only (CoLLM)."""
    labels = record.get("HisItemLabels")
    return [1] * len(record["HisItemIDs"]) if labels is None else [int(label) for label in labels]


def _liked_history(record: Mapping) -> list[int]:
    """History items SASRec encodes: the liked ones (ThinkRec-style histories also hold dislikes)."""
    return [int(item_id) for item_id, label in zip(record["HisItemIDs"], _history_labels(record)) if label == 1]


def _is_item_id(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class Recommendation:
    """One of `ThinkRecProcessor.recommend`'s top-k: rank (1 = best), the item, its P(Yes) and, when
    reasons were asked for, the generated reason (it starts with the verdict of `score`)."""

    rank: int
    item_id: int
    title: str
    score: float
    reason: str | None = None


def _pad(rows: list[list[int]], left: bool) -> torch.Tensor:
    """[B, max_len] LongTensor padded with 0 (the padding id of every CF table)."""
    width = max((len(row) for row in rows), default=0)
    padded = [([0] * (width - len(row)) + list(row)) if left else (list(row) + [0] * (width - len(row))) for row in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


class ThinkRecProcessor(ProcessorMixin):
    r"""
    Turns records into ThinkRec inputs. A record is a dict with `UserID`, `HisItemIDs`, `HisItemTitles`
    (oldest first; optional `HisItemLabels`, 1 liked / 0 disliked), `TargetItemID`, `TargetItemTitle`;
    training rows add `label` (0/1), `mode` ("rec" or "reason") and `reason` (the answer of reasoning rows).

    Args:
        tokenizer: the LM tokenizer with the user/item slot tokens added.
        templates: prompt templates' text (one is picked per record, seeded by the record); placeholders
            <UserID>, <ItemTitleList> (or <LikedItemTitleList>, <HisItemList>), <DislikedItemTitleList>,
            <IfDisliked>...</IfDisliked>, <ItemNoun>, <ItemNounPlural>, <TargetItemTitle>, <TargetItemID>,
            <TargetItemKeywords> (needs the record field TargetItemKeywords).
        reason_templates: templates of `mode="reason"` rows (they ask for the explanation); None = `templates`.
        template_origins, reason_template_origins: names of the templates in error messages (file and line).
        history_item_slots: an item id slot after every history title.
        max_prompt_tokens: token budget of a prompt; history titles are dropped oldest first to fit (None = no limit).
        use_chat_template, system_prompt: wrap the question as a user turn of the tokenizer's chat template.
        tokens_per_id: slot tokens per id (the model's `config.tokens_per_id`).
        item_noun, item_noun_plural: what the items are, for <ItemNoun> / <ItemNounPlural>.
        title_keywords: show every title (target and history) with up to this many of its keywords,
            `"Heat (1995)" (heist, crime, los angeles)`, as ThinkRec prompts show items; 0 = titles only.
            Records then need TargetItemKeywords and HisItemKeywords (thinkrec.data.keywords.attach_keywords).

    Example (a saved ThinkRec folder or Hub repo):

    ```python
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    inputs = processor({"UserID": 42, "HisItemIDs": [10, 31], "HisItemTitles": ["Heat (1995)", "Fargo (1996)"],
                        "TargetItemID": 7, "TargetItemTitle": "Alien (1979)"})
    p_yes = model.score(**inputs)                                  # [1]
    top = processor.recommend(model, user, candidates, top_k=10)   # a user's candidates ranked (docs/recommend.md)
    ```
    """

    def __init__(
        self,
        tokenizer=None,
        templates=None,
        reason_templates=None,
        template_origins=None,
        reason_template_origins=None,
        history_item_slots=False,
        max_prompt_tokens=None,
        use_chat_template=False,
        system_prompt=None,
        tokens_per_id=1,
        user_slot_token="<|user_slot|>",
        item_slot_token="<|item_slot|>",
        empty_history_text="none",
        seed=0,
        item_noun="movie",
        item_noun_plural="movies",
        title_keywords=0,
    ):
        # Every argument is kept under its own name: ProcessorMixin writes them to processor_config.json.
        super().__init__(tokenizer)
        if not templates or not all(isinstance(text, str) for text in templates):
            raise ProcessorInputError(f"templates: give the prompt templates' text as a list of strings, found {templates!r}.")
        self.templates = list(templates)
        self.reason_templates = list(reason_templates) if reason_templates else None
        self.template_origins = list(template_origins or [f"templates[{i}]" for i in range(len(self.templates))])
        self.reason_template_origins = (
            list(reason_template_origins or [f"reason_templates[{i}]" for i in range(len(self.reason_templates))])
            if self.reason_templates else None
        )
        self.history_item_slots = bool(history_item_slots)
        self.max_prompt_tokens = max_prompt_tokens
        self.use_chat_template = bool(use_chat_template)
        self.system_prompt = system_prompt
        self.tokens_per_id = int(tokens_per_id)
        self.user_slot_token = user_slot_token
        self.item_slot_token = item_slot_token
        self.empty_history_text = empty_history_text
        self.seed = seed
        self.item_noun = item_noun
        self.item_noun_plural = item_noun_plural
        self.title_keywords = int(title_keywords)
        self._check_settings()

    def _check_settings(self) -> None:
        named = list(zip(self.template_origins, self.templates))
        named += list(zip(self.reason_template_origins, self.reason_templates)) if self.reason_templates else []
        for origin, text in named:
            check_template(text, origin)
            if any(noun in text for noun in NOUNS):
                for name in NOUNS.values():
                    value = getattr(self, name)
                    if not isinstance(value, str) or not value.strip() or "\n" in value or "<" in value:
                        raise ProcessorInputError(
                            f"{origin} (<ItemNoun>/<ItemNounPlural>): {name} must be a word or two naming the items "
                            f"(e.g. 'game' / 'games', 'product' / 'products'), found {value!r}."
                        )
        vocab = self.tokenizer.get_vocab()
        for token in (self.user_slot_token, self.item_slot_token):
            if token not in vocab:
                raise ValueError(
                    f"slot token {token!r} is not in the tokenizer; add it first (modeling_thinkrec.add_slot_tokens "
                    "or ThinkRecForCausalLM.from_language_model)."
                )
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: answers need EOS appended so generation learns to stop.")
        if self.use_chat_template and not self.tokenizer.chat_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template.")
        if self.tokens_per_id < 1:
            raise ValueError(f"tokens_per_id must be >= 1, got {self.tokens_per_id}.")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}.")
        if self.title_keywords < 0:
            raise ValueError(f"title_keywords must be >= 0 (0 = titles only), got {self.title_keywords}.")

    @property
    def needs_keywords(self) -> bool:
        """Whether records must carry item keywords (TargetItemKeywords, HisItemKeywords)."""
        templates = self.templates + (self.reason_templates or [])
        return self.title_keywords > 0 or any(uses_keywords(text) for text in templates)

    def item_text(self, title: str, keywords=None) -> str:
        """A title as prompts show it: quoted, then up to `title_keywords` keywords in brackets."""
        shown = list(keywords or [])[: self.title_keywords]
        return f'"{title}"' + (f" ({', '.join(shown)})" if shown else "")

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    # ---------------------------------------------------------------------------------- prompts

    def template_for(self, record: Mapping) -> tuple[str, str]:
        """(text, origin) of the record's template: a reason template for `mode="reason"` rows. With
        several templates the pick is seeded by the record, so a row gets the same prompt in every run."""
        if record.get("mode") == "reason" and self.reason_templates:
            templates, origins = self.reason_templates, self.reason_template_origins
        else:
            templates, origins = self.templates, self.template_origins
        index = 0
        if len(templates) > 1:
            key = f"{self.seed}:{record['UserID']}:{record['TargetItemID']}:{record.get('mode', 'rec')}"
            index = random.Random(key).randrange(len(templates))
        return templates[index], origins[index]

    def render_prompt(self, record: Mapping, template: str, num_history: int) -> tuple[str, list[int], list[int]]:
        """Prompt text with the last `num_history` history items, and the user/item ids of its slots
        in order of appearance."""
        user_ids, item_ids = [], []
        user_slot = self.user_slot_token * self.tokens_per_id
        item_slot = self.item_slot_token * self.tokens_per_id
        start = len(record["HisItemIDs"]) - num_history
        keywords = record.get("HisItemKeywords") if self.title_keywords else None
        texts = [self.item_text(title, keywords[index] if keywords is not None else None)
                 for index, title in enumerate(record["HisItemTitles"])]
        history = list(zip(record["HisItemIDs"], texts, _history_labels(record)))[start:]
        liked = [(item_id, text) for item_id, text, label in history if label == 1]
        disliked = [(item_id, text) for item_id, text, label in history if label == 0]
        pieces, skipping = [], False
        for piece in _template_pieces(template):
            if piece in (IF_DISLIKED, END_IF_DISLIKED):
                skipping = piece == IF_DISLIKED and not disliked
            elif skipping:
                continue
            elif piece == "<UserID>":
                pieces.append(user_slot)
                user_ids.append(int(record["UserID"]))
            elif piece in LIKED_LISTS or piece == DISLIKED_LIST:
                titles = []
                for item_id, text in liked if piece in LIKED_LISTS else disliked:
                    if self.history_item_slots:
                        titles.append(f"{text} {item_slot}")
                        item_ids.append(int(item_id))
                    else:
                        titles.append(text)
                pieces.append(", ".join(titles) if titles else self.empty_history_text)
            elif piece in NOUNS:
                pieces.append(getattr(self, NOUNS[piece]))
            elif piece == "<TargetItemTitle>":
                pieces.append(self.item_text(record["TargetItemTitle"], record.get("TargetItemKeywords") if self.title_keywords else None))
            elif piece == TARGET_KEYWORDS:
                pieces.append(", ".join(record["TargetItemKeywords"]) or self.empty_history_text)
            elif piece == "<TargetItemID>":
                pieces.append(item_slot)
                item_ids.append(int(record["TargetItemID"]))
            else:
                pieces.append(piece)
        text = "".join(pieces)
        if self.use_chat_template:
            messages = [{"role": "user", "content": text}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, user_ids, item_ids

    def _tokenize_prompts(self, texts: list[str]) -> list[list[int]]:
        # A chat template already writes its special tokens; a plain prompt gets the tokenizer's own (e.g. BOS).
        return self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"] if texts else []

    def _history_title_lengths(self, records: list[Mapping]) -> list[list[int]]:
        """Tokens each history item adds to its list (separator, quoted title, slots), oldest first;
        every distinct title is tokenised once."""
        slot = f" {self.item_slot_token * self.tokens_per_id}" if self.history_item_slots else ""

        def chunk_texts(record: Mapping) -> list[str]:
            keywords = record.get("HisItemKeywords") if self.title_keywords else None
            return [f", {self.item_text(title, keywords[i] if keywords is not None else None)}{slot}"
                    for i, title in enumerate(record["HisItemTitles"])]

        per_record = [chunk_texts(record) for record in records]
        chunks = sorted({chunk for texts in per_record for chunk in texts})
        lengths = dict(zip(chunks, map(len, self.tokenizer(chunks, add_special_tokens=False)["input_ids"]))) if chunks else {}
        return [[lengths[chunk] for chunk in texts] for texts in per_record]

    def _fit_to_budget(self, records, templates, rows, encoded) -> None:
        """Replace each over-budget prompt in `encoded` with the one keeping the most recent history
        titles that fits. Token counts per title pick the candidate; one tokenisation per round (all
        rows together) checks it, and a row is settled when k titles fit and k + 1 do not. Assumes, as
        dropping oldest first always did, that a prompt never gets shorter by showing one more title."""
        budget = self.max_prompt_tokens
        over = [i for i, (ids, _, _) in enumerate(encoded) if len(ids) > budget]
        if not over:
            return
        title_lengths = self._history_title_lengths([records[i] for i in over])
        state = {}
        for i, lengths in zip(over, title_lengths):
            total = len(lengths)
            # kept[k]: tokens of the k most recent titles; fits: largest k known to fit; too_long: smallest known not to.
            kept = [0]
            for length in reversed(lengths):
                kept.append(kept[-1] + length)
            state[i] = {"kept": kept, "measured": {total: encoded[i]}, "fits": -1, "too_long": total}
        pending = over
        while pending:
            candidates = [self._next_candidate(state[i], budget) for i in pending]
            renders = [self.render_prompt(records[i], templates[i], k) for i, k in zip(pending, candidates)]
            token_ids = self._tokenize_prompts([text for text, _, _ in renders])
            for i, k, (_, user_ids, item_ids), ids in zip(pending, candidates, renders, token_ids):
                row = state[i]
                row["measured"][k] = (ids, user_ids, item_ids)
                if len(ids) <= budget:
                    row["fits"] = k
                else:
                    row["too_long"] = k
            pending = [i for i in pending if state[i]["too_long"] - state[i]["fits"] > 1]
        for i in over:
            row = state[i]
            if row["fits"] < 0:
                raise ProcessorInputError(
                    f"row {rows[i]}: the question without any history takes {len(row['measured'][0][0])} tokens, over "
                    f"max_prompt_tokens={budget}; raise the budget (the question is never cut)."
                )
            encoded[i] = row["measured"][row["fits"]]

    @staticmethod
    def _next_candidate(row: dict, budget: int) -> int:
        """Most titles in (fits, too_long) whose length, estimated from the nearest measured prompt and
        the titles' own token counts, fits the budget; else the fewest still open."""
        kept, measured = row["kept"], row["measured"]
        for k in range(row["too_long"] - 1, row["fits"], -1):
            nearest = min(measured, key=lambda m: abs(m - k))
            if len(measured[nearest][0]) + kept[k] - kept[nearest] <= budget:
                return k
        return row["fits"] + 1

    # ---------------------------------------------------------------------------------- records

    @staticmethod
    def check_record(record: Mapping, row, required=REQUIRED_FIELDS) -> None:
        """Stop on a record the prompt or answer cannot be built from, naming the row and field."""
        missing = [name for name in required if name not in record]
        if missing:
            raise ProcessorInputError(f"row {row}: missing fields {missing}; records need {list(required)} (docs/records.md).")
        if record.get("mode", "rec") not in MODES:
            raise ProcessorInputError(f"row {row}: mode must be one of {sorted(MODES)}, found {record['mode']!r}.")
        if "label" in record and int(record["label"]) not in (0, 1):
            raise ProcessorInputError(f"row {row}: label must be 0 or 1, found {record['label']!r}.")
        if len(record["HisItemIDs"]) != len(record["HisItemTitles"]):
            raise ProcessorInputError(
                f"row {row}: {len(record['HisItemIDs'])} HisItemIDs but {len(record['HisItemTitles'])} HisItemTitles."
            )
        labels = record.get("HisItemLabels")
        keywords = record.get("HisItemKeywords")
        if keywords is not None and len(keywords) != len(record["HisItemIDs"]):
            raise ProcessorInputError(f"row {row}: {len(record['HisItemIDs'])} HisItemIDs but {len(keywords)} HisItemKeywords.")
        if labels is not None and len(labels) != len(record["HisItemIDs"]):
            raise ProcessorInputError(f"row {row}: {len(record['HisItemIDs'])} HisItemIDs but {len(labels)} HisItemLabels.")
        if labels is not None and any(int(label) not in (0, 1) for label in labels):
            raise ProcessorInputError(f"row {row}: HisItemLabels must be 0 or 1, found {list(labels)}.")

    def answer_text(self, record: Mapping, row) -> str:
        """"Yes"/"No" for recommendation rows, the reason text for reasoning rows."""
        if record.get("mode") == "reason":
            reason = record.get("reason") or ""
            if not reason.strip():
                raise ProcessorInputError(f"row {row}: mode is 'reason' but the 'reason' field is empty.")
            return reason
        if "label" not in record:
            raise ProcessorInputError(f"row {row}: no 'label' to build the answer from (0 or 1).")
        return "Yes" if int(record["label"]) == 1 else "No"

    def encode(self, records: list[Mapping], rows=None, with_answers: bool = True, required=REQUIRED_FIELDS) -> dict[str, list]:
        """Columns of ENCODED_COLUMNS for `records` (rows named `rows` in errors, default 0..n-1): prompt
        ids fitted to the budget, answer ids with EOS (empty without answers), slot ids, SASRec history."""
        rows = list(range(len(records))) if rows is None else list(rows)
        for record, row in zip(records, rows):
            self.check_record(record, row, required)
        if self.needs_keywords:
            for record, row in zip(records, rows):
                missing = [name for name in KEYWORD_FIELDS if record.get(name) is None]
                if missing:
                    raise ProcessorInputError(
                        f"row {row}: the prompts show item keywords (title_keywords={self.title_keywords} or {TARGET_KEYWORDS}) "
                        f"but the record has no {missing}; run extract_keywords.py on the records folder (the commands then "
                        "attach the keywords to every row)."
                    )
        templates = []
        for record, row in zip(records, rows):
            template, origin = self.template_for(record)
            if record.get("HisItemLabels") is None and asks_for_disliked_titles(template):
                raise ProcessorInputError(
                    f"{origin}: the template asks for disliked titles ({DISLIKED_LIST}) but row {row} has no "
                    f"HisItemLabels; prepare the records with history_mode='all', or put the disliked titles inside "
                    f"{IF_DISLIKED}...{END_IF_DISLIKED} so that label-free histories leave them out."
                )
            templates.append(template)
        renders = [self.render_prompt(record, template, len(record["HisItemIDs"])) for record, template in zip(records, templates)]
        token_ids = self._tokenize_prompts([text for text, _, _ in renders])
        encoded = [(ids, user_ids, item_ids) for ids, (_, user_ids, item_ids) in zip(token_ids, renders)]
        if self.max_prompt_tokens is not None:
            self._fit_to_budget(records, templates, rows, encoded)
        answers = [[] for _ in records]
        if with_answers:
            texts = [self.answer_text(record, row) for record, row in zip(records, rows)]
            distinct = sorted(set(texts))
            ids = dict(zip(distinct, self.tokenizer(distinct, add_special_tokens=False)["input_ids"]))
            answers = [ids[text] + [self.tokenizer.eos_token_id] for text in texts]
        return {
            "prompt_ids": [ids for ids, _, _ in encoded],
            "answer_ids": answers,
            "user_slot_ids": [user_ids for _, user_ids, _ in encoded],
            "item_slot_ids": [item_ids for _, _, item_ids in encoded],
            "history_item_ids": [_liked_history(record) for record in records],
            "prompt_length": [len(ids) for ids, _, _ in encoded],
            "answer_length": [len(ids) for ids in answers],
        }

    def encode_features(self, records: list[Mapping], rows=None, with_answers: bool = True, required=REQUIRED_FIELDS) -> list[dict]:
        """`records` with their ENCODED_COLUMNS added (what `pad` takes); the arguments are `encode`'s."""
        encoded = self.encode(records, rows=rows, with_answers=with_answers, required=required)
        return [{**record, **{name: values[i] for name, values in encoded.items()}} for i, record in enumerate(records)]

    def encode_columns(self, columns: Mapping[str, list], indices=None) -> dict[str, list]:
        """`encode` for `Dataset.map(batched=True, with_indices=True)`: a batch of columns in, new columns out."""
        names = list(columns)
        records = [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
        return self.encode(records, rows=indices)

    # ---------------------------------------------------------------------------------- batches

    def pad(self, features: list[Mapping], include_answers: bool = True) -> dict[str, torch.Tensor]:
        """One batch from encoded rows (records with ENCODED_COLUMNS): prompts left-padded to one length
        so the scoring position is the last prompt column of every row, answers right-padded after it,
        `labels` -100 except on answers; `mode`, `target_labels` (rows with a `label`), `user_ids`,
        `item_ids`, and the slot and history ids padded with 0."""
        pad_token_id = self.pad_token_id
        answers = [list(feature["answer_ids"]) if include_answers else [] for feature in features]
        for row, answer in enumerate(answers):
            if include_answers and not answer:
                raise ProcessorInputError(f"row {row}: no answer ids; encode the record with its label (and reason) first.")
        prompt_length = max(len(feature["prompt_ids"]) for feature in features)
        answer_length = max((len(ids) for ids in answers), default=0)
        input_ids, attention_mask, labels = [], [], []
        for feature, answer_ids in zip(features, answers):
            prompt_ids = list(feature["prompt_ids"])
            left = prompt_length - len(prompt_ids)
            right = answer_length - len(answer_ids)
            input_ids.append([pad_token_id] * left + prompt_ids + answer_ids + [pad_token_id] * right)
            attention_mask.append([0] * left + [1] * (len(prompt_ids) + len(answer_ids)) + [0] * right)
            labels.append([IGNORE_INDEX] * (left + len(prompt_ids)) + answer_ids + [IGNORE_INDEX] * right)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
        if include_answers:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["mode"] = torch.tensor([MODES[feature.get("mode", "rec")] for feature in features], dtype=torch.long)
        if all("label" in feature for feature in features):
            batch["target_labels"] = torch.tensor([float(feature["label"]) for feature in features], dtype=torch.float)
        batch["user_ids"] = torch.tensor([int(feature["UserID"]) for feature in features], dtype=torch.long)
        batch["item_ids"] = torch.tensor([int(feature["TargetItemID"]) for feature in features], dtype=torch.long)
        batch["user_slot_ids"] = _pad([feature["user_slot_ids"] for feature in features], left=False)
        batch["item_slot_ids"] = _pad([feature["item_slot_ids"] for feature in features], left=False)
        batch["history_item_ids"] = _pad([feature["history_item_ids"] for feature in features], left=True)
        return batch

    def __call__(self, records, include_answers: bool = False, mode: str | None = None, rows=None) -> BatchFeature:
        """Model inputs for one record (a dict) or a list of them. `mode="reason"` renders every row with
        the reason template (for generating the verdict and explanation). Without answers the batch holds
        MODEL_INPUTS (for `model.score` / `model.generate`); with them, the training batch (labels too).
        `rows` names the records in error messages (default 0..n-1)."""
        records = [records] if isinstance(records, Mapping) else list(records)
        if mode is not None:
            records = [{**record, "mode": mode} for record in records]
        required = REQUIRED_FIELDS if include_answers else RECORD_FIELDS
        features = self.encode_features(records, rows=rows, with_answers=include_answers, required=required)
        batch = self.pad(features, include_answers=include_answers)
        if not include_answers:
            batch = {name: batch[name] for name in MODEL_INPUTS}
        return BatchFeature(batch)

    @property
    def model_input_names(self) -> list[str]:
        return list(MODEL_INPUTS)

    # ---------------------------------------------------------------------------------- generation and ranking

    def generate_reasons(self, model, records: list[Mapping], scores, threshold: float = 0.5, max_new_tokens: int = 128,
                         batch_size: int = 8, rows=None, **generate_kwargs) -> list[str]:
        """One decision per record: the verdict is its score's (P(Yes) `scores[i]` >= `threshold` gives "Yes."),
        written as the first answer tokens after the reason prompt, and the model generates the reason after
        it (with the injected vectors, under its generation config: greedy, stopping at EOS). Returns
        "Yes. <reason>" / "No. <reason>" per record. `rows` names the records in errors; `generate_kwargs`
        go to `model.generate` (e.g. `synced_gpus`)."""
        probabilities = [float(p) for p in scores]
        if len(probabilities) != len(records):
            raise ValueError(f"generate_reasons: {len(records)} records but {len(probabilities)} scores.")
        rows = list(range(len(records))) if rows is None else list(rows)
        tokenizer = self.tokenizer
        verdict_ids = dict(zip(VERDICTS, tokenizer(list(VERDICTS), add_special_tokens=False)["input_ids"]))
        texts = []
        model.eval()
        for start in range(0, len(records), batch_size):
            chunk = [{**record, "mode": "reason"} for record in records[start : start + batch_size]]
            verdicts = [VERDICTS[int(p >= threshold)] for p in probabilities[start : start + len(chunk)]]
            features = self.encode_features(chunk, rows=rows[start : start + len(chunk)], with_answers=False, required=RECORD_FIELDS)
            for feature, verdict in zip(features, verdicts):
                feature["prompt_ids"] = list(feature["prompt_ids"]) + verdict_ids[verdict]
            batch = self.pad(features, include_answers=False)
            batch = {name: batch[name].to(model.device) for name in MODEL_INPUTS}
            new_tokens = model.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
            # GenerationMixin returns the prompt followed by the answer; the verdict is decoded with what follows it.
            for generated, verdict in zip(new_tokens[:, batch["input_ids"].shape[1] :].tolist(), verdicts):
                texts.append(tokenizer.decode(verdict_ids[verdict] + generated, skip_special_tokens=True).strip())
        return texts

    def recommendation_records(self, user: Mapping, candidates, top_k: int = 10, items: Mapping | None = None) -> list[dict]:
        """The record of every candidate for `user` (see `recommend`), after the checks that stop on bad input
        naming the user or item: a user record without its fields, a candidate without id or title, an id
        not in `items`, a candidate listed twice, an empty list, `top_k` < 1 or over the number of candidates."""
        if not isinstance(user, Mapping):
            raise ProcessorInputError(f"user: expected one user record (a mapping with {list(USER_FIELDS)}), found {type(user).__name__}.")
        who = f"user {user['UserID']}" if "UserID" in user else "the user record"
        missing = [name for name in USER_FIELDS if name not in user]
        if missing:
            raise ProcessorInputError(f"{who}: missing fields {missing}; a user record needs {list(USER_FIELDS)} (docs/recommend.md).")
        targets = [name for name in CANDIDATE_FIELDS if name in user]
        if targets:
            raise ProcessorInputError(f"{who}: the user record holds {targets}; the targets are the candidates, so leave them out.")
        if isinstance(candidates, (str, bytes, Mapping)) or not hasattr(candidates, "__iter__"):
            raise ProcessorInputError(f"{who}: candidates must be a list of items, found {type(candidates).__name__}.")
        candidates = list(candidates)
        if not candidates:
            raise ProcessorInputError(f"{who}: the candidate list is empty; give at least one item to rank.")
        if not _is_item_id(top_k) or top_k < 1:
            raise ProcessorInputError(f"{who}: top_k must be an integer >= 1, got {top_k!r}.")
        if top_k > len(candidates):
            raise ProcessorInputError(f"{who}: top_k={top_k} is more than the {len(candidates)} candidates; ask for at most {len(candidates)}.")
        records, positions = [], {}
        for position, candidate in enumerate(candidates):
            fields = self._candidate_fields(candidate, position, items, who)
            item_id = fields["TargetItemID"]
            if item_id in positions:
                raise ProcessorInputError(f"{who}: candidate {item_id} is listed twice (positions {positions[item_id]} and "
                                          f"{position}); each item is ranked once.")
            positions[item_id] = position
            records.append({**user, **fields, "mode": "rec"})
        return records

    @staticmethod
    def _candidate_fields(candidate, position: int, items: Mapping | None, who: str) -> dict:
        """A candidate's target fields: its own, then what `items` holds for its id (a title, or a mapping of fields)."""
        if isinstance(candidate, Mapping):
            if "TargetItemID" not in candidate:
                raise ProcessorInputError(f"{who}: candidate at position {position} has no TargetItemID (fields {sorted(candidate)}).")
            fields = dict(candidate)
        elif _is_item_id(candidate):
            fields = {"TargetItemID": candidate}
        else:
            raise ProcessorInputError(f"{who}: candidate at position {position} is {candidate!r}; expected a mapping with TargetItemID "
                                      "and TargetItemTitle, or an integer item id looked up in `items`.")
        if not _is_item_id(fields["TargetItemID"]):
            raise ProcessorInputError(f"{who}: candidate at position {position} has TargetItemID {fields['TargetItemID']!r}; "
                                      "item ids are integers.")
        item_id = fields["TargetItemID"] = int(fields["TargetItemID"])
        if items is not None:
            if item_id not in items:
                raise ProcessorInputError(f"{who}: candidate {item_id} is not in the item table ({len(items)} items).")
            entry = items[item_id]
            fields = {**({"TargetItemTitle": entry} if isinstance(entry, str) else dict(entry)), **fields}
        title = fields.get("TargetItemTitle")
        if not isinstance(title, str) or not title.strip():
            found = "none" if title is None else repr(title)
            hint = "give its TargetItemTitle" + ("" if items is not None else ", or pass `items` (item id -> title)")
            raise ProcessorInputError(f"{who}: candidate {item_id} has no title (TargetItemTitle: {found}); {hint}.")
        return fields

    def recommend(self, model, user: Mapping, candidates, top_k: int = 10, reasons: bool = False, items: Mapping | None = None,
                  batch_size: int = 32, max_new_tokens: int = 128, threshold: float = 0.5) -> list[Recommendation]:
        """The `top_k` of `candidates` for `user`, best first by P(Yes) (`model.score`, every batch of a
        user's candidates from one encoding of the prompt they share); with `reasons`, a generated reason
        for each of them that starts with its score's verdict (`generate_reasons`, P(Yes) >= `threshold`).

        user: one user record: UserID, HisItemIDs, HisItemTitles (oldest first), optional HisItemLabels, and
            HisItemKeywords when the prompts show keywords; no target. An empty history is scored as
            `model.score` scores any record without one (the list reads `empty_history_text`).
        candidates: items to rank, each a mapping with TargetItemID and TargetItemTitle (TargetItemKeywords
            when the prompts show keywords), or a bare integer item id when `items` is given.
        items: {item id: title, or a mapping of candidate fields}; with it every candidate must be in it,
            and it fills the fields a candidate lacks.
        Ties in score keep the candidates' given order. Bad input stops with a `ProcessorInputError` naming
        the user and the item; ids outside the model's CF tables are the model's own message, with the
        user and the candidates of the batch added.

        ```python
        top = processor.recommend(model, user, [{"TargetItemID": 5, "TargetItemTitle": "Big (1988)"}, ...], top_k=3)
        [(r.rank, r.item_id, r.title, round(r.score, 3)) for r in top]
        ```
        """
        records = self.recommendation_records(user, candidates, top_k, items)
        who = f"user {user['UserID']}"
        if len(user["HisItemIDs"]) == 0:
            logger.warning("%s has no history: every candidate is scored without one (the list reads %r).", who, self.empty_history_text)
        if batch_size < 1:
            raise ProcessorInputError(f"batch_size must be >= 1, got {batch_size}.")
        rows = [f"({who}, candidate {record['TargetItemID']})" for record in records]
        scores = []
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            batch = self(chunk, rows=rows[start : start + len(chunk)]).to(model.device)
            try:
                scores += model.score(**batch, shared_prefix=True).float().tolist()
            except ValueError as error:  # the model's own input checks (ids outside its CF tables, slots)
                ids = [record["TargetItemID"] for record in chunk]
                raise ProcessorInputError(f"{who}, candidates {ids} (batch rows 0..{len(chunk) - 1}): {error}") from error
        # Best first; equal scores keep the given order (Python's sort is stable).
        order = sorted(range(len(records)), key=lambda i: -scores[i])[:top_k]
        texts = [None] * len(order)
        if reasons:
            texts = self.generate_reasons(model, [records[i] for i in order], [scores[i] for i in order], threshold,
                                          max_new_tokens, batch_size, rows=[rows[i] for i in order])
        return [Recommendation(rank, records[i]["TargetItemID"], records[i]["TargetItemTitle"], scores[i], text)
                for rank, (i, text) in enumerate(zip(order, texts), start=1)]


ThinkRecProcessor.register_for_auto_class("AutoProcessor")
AutoProcessor.register(ThinkRecConfig, ThinkRecProcessor, exist_ok=True)


__all__ = ["Recommendation", "ThinkRecProcessor", "ProcessorInputError", "asks_for_disliked_titles", "check_template", "uses_keywords"]
