"""Frozen copy of data_collator.py before records were tokenised once (commit 207b130): the parity
tests and benchmarks/input_pipeline.py compare the processor pipeline's batches with it."""

import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from modeling_thinkrec import IGNORE_INDEX
from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns
from thinkrec.utils.errors import InputError, MissingInputError


# The templates live at the repository root, one folder above this copy.
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
MODES = {"rec": 0, "reason": 1}

# <ItemTitleList> and <HisItemList> are the published names of the liked history (CoLLM histories hold
# liked items only); <DislikedItemTitleList> needs HisItemLabels. Text between <IfDisliked> and
# </IfDisliked> is kept only when the shown history holds a disliked item.
LIKED_LISTS = ("<LikedItemTitleList>", "<ItemTitleList>", "<HisItemList>")
DISLIKED_LIST = "<DislikedItemTitleList>"
NOUNS = {"<ItemNoun>": "item_noun", "<ItemNounPlural>": "item_noun_plural"}
IF_DISLIKED, END_IF_DISLIKED = "<IfDisliked>", "</IfDisliked>"
PLACEHOLDERS = ("<UserID>", *LIKED_LISTS, DISLIKED_LIST, *NOUNS, "<TargetItemTitle>", "<TargetItemID>", IF_DISLIKED, END_IF_DISLIKED)
_PLACEHOLDER_PATTERN = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
_IF_DISLIKED_BLOCK = re.compile(re.escape(IF_DISLIKED) + ".*?" + re.escape(END_IF_DISLIKED), re.DOTALL)
REQUIRED_FIELDS = ("UserID", "HisItemIDs", "HisItemTitles", "TargetItemID", "TargetItemTitle", "label", "mode")


def read_template_lines(template: str) -> list[tuple[str, str]]:
    """(origin, text) of every template in a file, one per line (`\\n` written literally); `origin` is
    "<path> line <n>". `template` is a file path or the name of a file in `templates/`."""
    path = template if os.path.isfile(template) else os.path.join(TEMPLATE_DIR, f"{template}.txt")
    if not os.path.isfile(path):
        names = sorted(name[:-4] for name in os.listdir(TEMPLATE_DIR) if name.endswith(".txt"))
        raise MissingInputError(f"prompt template {template!r}: no such file, and not one of {names} in {TEMPLATE_DIR}.")
    with open(path, encoding="utf-8") as handle:
        lines = [(f"{path} line {number}", line.rstrip("\n").replace("\\n", "\n")) for number, line in enumerate(handle, start=1)]
    templates = [(origin, text) for origin, text in lines if text.strip()]
    if not templates:
        raise ValueError(f"{path}: no templates (expected one per line).")
    for origin, text in templates:
        if "<TargetItemTitle>" not in text and "<TargetItemID>" not in text:
            raise ValueError(f"{origin}: a template must name the target (<TargetItemTitle> or <TargetItemID>).")
        markers = [piece for piece in _PLACEHOLDER_PATTERN.findall(text) if piece in (IF_DISLIKED, END_IF_DISLIKED)]
        if markers != [IF_DISLIKED, END_IF_DISLIKED] * (len(markers) // 2):
            raise InputError(f"{origin}: every {IF_DISLIKED} needs its own {END_IF_DISLIKED} after it (no nesting), found {markers}.")
    return templates


def load_templates(template: str) -> list[str]:
    """Templates from a file, one per line (`\\n` written literally); `template` is a file path or the
    name of a file in `templates/` ("text_only", "collaborative", "reflection")."""
    return [text for _, text in read_template_lines(template)]


def asks_for_disliked_titles(template: str) -> bool:
    """Whether a template needs disliked titles whatever the history (outside an <IfDisliked> block)."""
    return DISLIKED_LIST in _IF_DISLIKED_BLOCK.sub("", template)


@dataclass
class ThinkRecCollator:
    """
    Builds ThinkRec batches from records (dicts with the fields of docs/records.md). Every prompt is
    LEFT-padded to one length so the last prompt position (which scores "Yes") is one column for all
    rows; answers follow, RIGHT-padded, with EOS appended. The answer is "Yes"/"No" for `mode="rec"`
    rows and the `reason` text for `mode="reason"` rows; both kinds mix in one batch. History titles
    are dropped oldest first until the prompt fits `max_prompt_tokens`; the question and the answer are
    never cut.

    Args:
        tokenizer: the LM tokenizer with the slot tokens added (`ThinkRecForCausalLM.from_language_model`).
        template: a template file path or a name in `templates/` ("text_only", "collaborative", "reflection").
        reason_template: the template of `mode="reason"` rows, whose answer is a verdict and an explanation
            (e.g. "reflection", or "reflection_text_only" for text-only models); None = `template` for all rows.
            Recommendation prompts ask for one word, so reasoning rows need a prompt that asks for the reason.
        history_item_slots: put an item id slot after every history title (liked and disliked lists alike).
        max_prompt_tokens: token budget of a prompt (None = no limit).
        use_chat_template: wrap the question as a user turn of the tokenizer's chat template (instruct LMs).
        system_prompt: system turn for the chat template (None keeps the template's default).
        include_answers: False gives prompt-only batches (scoring, generation): no answers, no `labels`.
        tokens_per_id: slot tokens per id (the model's `config.tokens_per_id`).
        seed: picks among several templates in a file.
        item_noun, item_noun_plural: what the items are ("game"/"games"), for the templates' <ItemNoun> and
            <ItemNounPlural>; prepared records name theirs in metadata.json (`thinkrec.data.nouns`).

    Templates: <ItemTitleList> (or <LikedItemTitleList>, <HisItemList>) lists the liked history titles (all
    of them when records carry no `HisItemLabels`), <DislikedItemTitleList> the disliked ones; text between
    <IfDisliked> and </IfDisliked> appears only when the shown history holds a disliked item, so a
    positives-only history renders as in the published prompts.

    Outputs (`torch.Tensor`s): `input_ids`, `attention_mask` [B, T]; `labels` [B, T] (answers only);
    `mode` [B] (0 rec / 1 reason); `target_labels` [B] float; `user_ids`, `item_ids` [B] (for UAUC);
    `user_slot_ids`, `item_slot_ids` [B, S] ids in order of appearance of their slot tokens,
    right-padded with 0; `history_item_ids` [B, L] the liked history items (those with
    `HisItemLabels == 1` when the records carry labels), left-padded with 0 (SASRec's input).

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from thinkrec.training.backbones import smollm2_tokenizer_dir
    >>> from modeling_thinkrec import add_slot_tokens
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    >>> _ = add_slot_tokens(tokenizer, "<|user_slot|>", "<|item_slot|>")
    >>> collator = ThinkRecCollator(tokenizer, template="collaborative")
    >>> records = [
    ...     {"UserID": 3, "HisItemIDs": [5, 9], "HisItemTitles": ["Heat (1995)", "Fargo (1996)"],
    ...      "TargetItemID": 7, "TargetItemTitle": "Alien (1979)", "label": 1, "mode": "rec", "reason": ""},
    ...     {"UserID": 4, "HisItemIDs": [], "HisItemTitles": [], "TargetItemID": 2,
    ...      "TargetItemTitle": "Big (1988)", "label": 0, "mode": "reason", "reason": "No. Too light."},
    ... ]
    >>> batch = collator(records)
    >>> sorted(batch)
    ['attention_mask', 'history_item_ids', 'input_ids', 'item_ids', 'item_slot_ids', 'labels', 'mode', 'target_labels', 'user_ids', 'user_slot_ids']
    >>> batch["input_ids"].shape
    torch.Size([2, 103])
    >>> batch["attention_mask"][:, :3].tolist()  # row 1 has the shorter prompt: left padding
    [[1, 1, 1], [0, 0, 0]]
    >>> tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    'Yes<|im_end|>'
    >>> tokenizer.decode(batch["input_ids"][1][batch["labels"][1] != -100])
    'No. Too light.<|im_end|>'
    >>> batch["mode"].tolist(), batch["target_labels"].tolist()
    ([0, 1], [1.0, 0.0])
    >>> batch["user_slot_ids"].tolist(), batch["item_slot_ids"].tolist(), batch["history_item_ids"].tolist()
    ([[3], [4]], [[7], [2]], [[5, 9], [0, 0]])

    ```
    """

    tokenizer: PreTrainedTokenizerBase
    template: str = "collaborative"
    reason_template: str | None = None
    history_item_slots: bool = False
    max_prompt_tokens: int | None = None
    use_chat_template: bool = False
    system_prompt: str | None = None
    include_answers: bool = True
    tokens_per_id: int = 1
    user_slot_token: str = "<|user_slot|>"
    item_slot_token: str = "<|item_slot|>"
    empty_history_text: str = "none"
    seed: int = 0
    item_noun: str = DEFAULT_ITEM_NOUN
    item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL
    templates: list[str] = field(init=False, repr=False)
    reason_templates: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        lines = read_template_lines(self.template)
        reason_lines = read_template_lines(self.reason_template) if self.reason_template else lines
        self.templates = [text for _, text in lines]
        self.reason_templates = [text for _, text in reason_lines]
        self._origins = {text: origin for origin, text in reason_lines + lines}
        for origin, text in lines + reason_lines:
            if any(noun in text for noun in NOUNS):
                check_item_nouns(self.item_noun, self.item_noun_plural, f"{origin} (<ItemNoun>/<ItemNounPlural>)")
        self._random = random.Random(self.seed)
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
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    # ---------------------------------------------------------------------------------- prompts

    def render_prompt(self, record: dict, template: str, num_history: int) -> tuple[str, list[int], list[int]]:
        """Prompt text with the last `num_history` history items, and the user/item ids of its slots
        in order of appearance."""
        user_ids, item_ids = [], []
        user_slot = self.user_slot_token * self.tokens_per_id
        item_slot = self.item_slot_token * self.tokens_per_id
        start = len(record["HisItemIDs"]) - num_history
        history = list(zip(record["HisItemIDs"], record["HisItemTitles"], _history_labels(record)))[start:]
        liked = [(item_id, title) for item_id, title, label in history if label == 1]
        disliked = [(item_id, title) for item_id, title, label in history if label == 0]
        pieces, skipping = [], False
        for piece in _PLACEHOLDER_PATTERN.split(template):
            if piece in (IF_DISLIKED, END_IF_DISLIKED):
                skipping = piece == IF_DISLIKED and not disliked
            elif skipping:
                continue
            elif piece == "<UserID>":
                pieces.append(user_slot)
                user_ids.append(int(record["UserID"]))
            elif piece in LIKED_LISTS or piece == DISLIKED_LIST:
                titles = []
                for item_id, title in liked if piece in LIKED_LISTS else disliked:
                    if self.history_item_slots:
                        titles.append(f'"{title}" {item_slot}')
                        item_ids.append(int(item_id))
                    else:
                        titles.append(f'"{title}"')
                pieces.append(", ".join(titles) if titles else self.empty_history_text)
            elif piece in NOUNS:
                pieces.append(getattr(self, NOUNS[piece]))
            elif piece == "<TargetItemTitle>":
                pieces.append(f'"{record["TargetItemTitle"]}"')
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

    def _encode_prompt(self, text: str) -> list[int]:
        # A chat template already writes its special tokens; a plain prompt gets the tokenizer's own (e.g. BOS).
        return self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]

    def build_prompt(self, record: dict, row: int) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the prompt, shortened oldest history item first to `max_prompt_tokens`."""
        templates = self.reason_templates if record["mode"] == "reason" else self.templates
        template = templates[0] if len(templates) == 1 else self._random.choice(templates)
        if record.get("HisItemLabels") is None and asks_for_disliked_titles(template):
            raise InputError(
                f"{self._origins[template]}: the template asks for disliked titles ({DISLIKED_LIST}) but row {row} has no "
                f"HisItemLabels; prepare the records with history_mode='all', or put the disliked titles inside "
                f"{IF_DISLIKED}...{END_IF_DISLIKED} so that label-free histories leave them out."
            )
        num_history = len(record["HisItemIDs"])
        while True:
            text, user_ids, item_ids = self.render_prompt(record, template, num_history)
            prompt_ids = self._encode_prompt(text)
            if self.max_prompt_tokens is None or len(prompt_ids) <= self.max_prompt_tokens:
                return prompt_ids, user_ids, item_ids
            if num_history == 0:
                raise ValueError(
                    f"row {row}: the question without any history takes {len(prompt_ids)} tokens, over "
                    f"max_prompt_tokens={self.max_prompt_tokens}; raise the budget (the question is never cut)."
                )
            num_history -= 1

    def build_answer(self, record: dict, row: int) -> list[int]:
        """Answer token ids with EOS: "Yes"/"No" for rec rows, the reason text for reasoning rows."""
        if record["mode"] == "reason":
            reason = record.get("reason") or ""
            if not reason.strip():
                raise ValueError(f"row {row}: mode is 'reason' but the 'reason' field is empty.")
            text = reason
        else:
            text = "Yes" if int(record["label"]) == 1 else "No"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    @staticmethod
    def _check_record(record: dict, row: int) -> None:
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise ValueError(f"row {row}: missing fields {missing}; records need {list(REQUIRED_FIELDS)} (docs/records.md).")
        if record["mode"] not in MODES:
            raise ValueError(f"row {row}: mode must be one of {sorted(MODES)}, found {record['mode']!r}.")
        if int(record["label"]) not in (0, 1):
            raise ValueError(f"row {row}: label must be 0 or 1, found {record['label']!r}.")
        if len(record["HisItemIDs"]) != len(record["HisItemTitles"]):
            raise ValueError(
                f"row {row}: {len(record['HisItemIDs'])} HisItemIDs but {len(record['HisItemTitles'])} HisItemTitles."
            )
        labels = record.get("HisItemLabels")
        if labels is not None and len(labels) != len(record["HisItemIDs"]):
            raise InputError(f"row {row}: {len(record['HisItemIDs'])} HisItemIDs but {len(labels)} HisItemLabels.")
        if labels is not None and any(int(label) not in (0, 1) for label in labels):
            raise InputError(f"row {row}: HisItemLabels must be 0 or 1, found {list(labels)}.")

    # ---------------------------------------------------------------------------------- batches

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, answers, user_slots, item_slots, histories = [], [], [], [], []
        for row, record in enumerate(records):
            self._check_record(record, row)
            prompt_ids, user_ids, item_ids = self.build_prompt(record, row)
            prompts.append(prompt_ids)
            user_slots.append(user_ids)
            item_slots.append(item_ids)
            histories.append(_liked_history(record))
            if self.include_answers:
                answers.append(self.build_answer(record, row))

        prompt_length = max(len(ids) for ids in prompts)
        answer_length = max((len(ids) for ids in answers), default=0)
        input_ids, attention_mask, labels = [], [], []
        for row, prompt_ids in enumerate(prompts):
            answer_ids = answers[row] if self.include_answers else []
            left = prompt_length - len(prompt_ids)
            right = answer_length - len(answer_ids)
            input_ids.append([self.pad_token_id] * left + prompt_ids + answer_ids + [self.pad_token_id] * right)
            attention_mask.append([0] * left + [1] * (len(prompt_ids) + len(answer_ids)) + [0] * right)
            labels.append([IGNORE_INDEX] * (left + len(prompt_ids)) + answer_ids + [IGNORE_INDEX] * right)

        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
        if self.include_answers:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch["mode"] = torch.tensor([MODES[record["mode"]] for record in records], dtype=torch.long)
        batch["target_labels"] = torch.tensor([float(record["label"]) for record in records], dtype=torch.float)
        batch["user_ids"] = torch.tensor([int(record["UserID"]) for record in records], dtype=torch.long)
        batch["item_ids"] = torch.tensor([int(record["TargetItemID"]) for record in records], dtype=torch.long)
        batch["user_slot_ids"] = _pad(user_slots, left=False)
        batch["item_slot_ids"] = _pad(item_slots, left=False)
        batch["history_item_ids"] = _pad(histories, left=True)
        return batch


def _history_labels(record: dict) -> list[int]:
    """Labels of the history items; a history without `HisItemLabels` holds liked items only (CoLLM)."""
    labels = record.get("HisItemLabels")
    return [1] * len(record["HisItemIDs"]) if labels is None else [int(label) for label in labels]


def _liked_history(record: dict) -> list[int]:
    """History items SASRec encodes: the liked ones (ThinkRec-style histories also hold dislikes)."""
    return [int(item_id) for item_id, label in zip(record["HisItemIDs"], _history_labels(record)) if label == 1]


def _pad(rows: list[list[int]], left: bool) -> torch.Tensor:
    """[B, max_len] LongTensor padded with 0 (the padding id of every CF table)."""
    width = max((len(row) for row in rows), default=0)
    padded = [([0] * (width - len(row)) + row) if left else (row + [0] * (width - len(row))) for row in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


__all__ = ["ThinkRecCollator", "asks_for_disliked_titles", "load_templates", "read_template_lines"]
