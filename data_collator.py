"""Turns prepared records (docs/records.md) into ThinkRec batches through the checkpoint's
`ThinkRecProcessor`, the one renderer and tokeniser: template files read into a processor, records
tokenised once with `Dataset.map` (cached), and a collator that only pads, builds labels and stacks."""

import hashlib
import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from processing_thinkrec import (
    ENCODED_COLUMNS,
    MODES,
    NOUNS,
    ProcessorInputError,
    ThinkRecProcessor,
    asks_for_disliked_titles,
    check_template,
)
from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns
from thinkrec.utils.errors import InputError, MissingInputError


TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
# Raw columns the training and evaluation splits keep next to the encoded ones: what the loss, the
# metrics (UAUC, warm/cold) and the collator's own checks read.
METRIC_COLUMNS = ("UserID", "label", "not_cold", "TargetItemID", "mode", "reason")


@contextmanager
def input_errors():
    """Record and template problems found by the processor surface as `InputError` (printed alone by the commands)."""
    try:
        yield
    except ProcessorInputError as error:
        raise InputError(str(error)) from error


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
        raise InputError(f"{path}: no templates (expected one per line).")
    with input_errors():
        for origin, text in templates:
            check_template(text, origin)
    return templates


def load_templates(template: str) -> list[str]:
    """Templates from a file, one per line (`\\n` written literally); `template` is a file path or the
    name of a file in `templates/` ("text_only", "collaborative", "reflection")."""
    return [text for _, text in read_template_lines(template)]


def _portable_origin(origin: str) -> str:
    """`templates/<file> line <n>` for a bundled template, `<file> line <n>` otherwise: the origin is
    saved with the processor, and a checkpoint should not name folders of the machine it was made on."""
    path, _, line = origin.rpartition(" line ")
    folder = "templates/" if os.path.dirname(os.path.abspath(path)) == TEMPLATE_DIR else ""
    return f"{folder}{os.path.basename(path)} line {line}"


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    template: str = "collaborative",
    reason_template: Optional[str] = None,
    item_noun: str = DEFAULT_ITEM_NOUN,
    item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL,
    **settings,
) -> ThinkRecProcessor:
    """A `ThinkRecProcessor` holding the text of the template files; `settings` are the processor's other
    arguments (history_item_slots, max_prompt_tokens, use_chat_template, system_prompt, tokens_per_id, seed,
    title_keywords, ...).

    template: a file path or a name in `templates/` ("text_only", "collaborative", "reflection").
    reason_template: the template of `mode="reason"` rows, whose answer is a verdict and an explanation
        (e.g. "reflection", or "reflection_text_only" for text-only models); None = `template` for all rows.
        Recommendation prompts ask for one word, so reasoning rows need a prompt that asks for the reason.
    item_noun, item_noun_plural: what the items are ("game"/"games"), for the templates' <ItemNoun> and
        <ItemNounPlural>; prepared records name theirs in metadata.json (`thinkrec.data.nouns`)."""
    lines = read_template_lines(template)
    reason_lines = read_template_lines(reason_template) if reason_template else []
    for origin, text in lines + reason_lines:
        if any(noun in text for noun in NOUNS):
            check_item_nouns(item_noun, item_noun_plural, f"{origin} (<ItemNoun>/<ItemNounPlural>)")
    with input_errors():
        return ThinkRecProcessor(
            tokenizer,
            templates=[text for _, text in lines],
            reason_templates=[text for _, text in reason_lines] or None,
            template_origins=[_portable_origin(origin) for origin, _ in lines],
            reason_template_origins=[_portable_origin(origin) for origin, _ in reason_lines] or None,
            item_noun=item_noun,
            item_noun_plural=item_noun_plural,
            **settings,
        )


def processor_fingerprint(processor: ThinkRecProcessor) -> str:
    """Hash of what an encoded row depends on: the processor's settings and templates, its tokenizer
    (vocabulary, merges, added tokens, chat template) and the processor's code."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256()
    for part in (processor.to_json_string(), vocabulary, str(tokenizer.chat_template), type(tokenizer).__name__,
                 Path(inspect.getfile(type(processor))).read_text(encoding="utf-8")):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def tokenize_dataset(dataset, processor: ThinkRecProcessor, keep_columns=None, batch_size: int = 1000, desc: Optional[str] = None):
    """`dataset` (a `datasets.Dataset` of records) with the processor's ENCODED_COLUMNS added, computed
    once by `Dataset.map` and cached under a fingerprint of the rows and `processor_fingerprint`.
    `keep_columns`: raw columns to keep (None: all of them)."""
    import datasets

    kept = [name for name in dataset.column_names if keep_columns is None or name in keep_columns]
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({
        **{name: dataset.features[name] for name in kept},
        "prompt_ids": ids, "answer_ids": ids, "user_slot_ids": ids, "item_slot_ids": ids, "history_item_ids": ids,
        "prompt_length": datasets.Value("int32"), "answer_length": datasets.Value("int32"),
    })
    # A file-backed dataset's fingerprint names its Arrow files, not their content: their mtimes tell a
    # rewritten cache (load_records_dataset reads files again when they change) from the old one.
    files = [(entry["filename"], os.path.getmtime(entry["filename"])) for entry in dataset.cache_files]
    fingerprint = datasets.fingerprint.Hasher.hash([dataset._fingerprint, files, processor_fingerprint(processor), kept, batch_size])

    def encode(columns, indices):
        with input_errors():
            return processor.encode_columns(columns, indices)

    return dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=[name for name in dataset.column_names if name not in kept],
        features=features,
        new_fingerprint=fingerprint,
        desc=desc or "rendering and tokenising prompts",
    )


def raw_record(row: dict) -> dict:
    """A row without its encoded columns (to render it again, e.g. with another template)."""
    return {name: value for name, value in row.items() if name not in ENCODED_COLUMNS}


class ThinkRecCollator:
    """
    Pads ThinkRec batches; it renders nothing. Rows the processor encoded (`tokenize_dataset` caches
    them: they carry `prompt_ids`) are padded and stacked by `ThinkRecProcessor.pad`; raw records are
    encoded first by the same processor (`ThinkRecProcessor.encode_features`), so the processor is the
    one renderer and tokeniser. Every prompt is LEFT-padded to one length so the last prompt position
    (which scores "Yes") is one column for all rows; answers follow, RIGHT-padded, with EOS appended.
    The answer is "Yes"/"No" for `mode="rec"` rows and the `reason` text for `mode="reason"` rows; both
    kinds mix in one batch.

    Args:
        processor: the `ThinkRecProcessor` that encodes the rows (run_thinkrec.py passes the one it
            tokenises the splits with and saves as the Trainer's `processing_class`).
        include_answers: False gives prompt-only batches (scoring, generation): no answers, no `labels`.
        tokenizer, **settings: instead of `processor`, a tokenizer with the slot tokens added and
            `build_processor`'s arguments (template, reason_template, history_item_slots, max_prompt_tokens,
            use_chat_template, tokens_per_id, seed, item_noun, title_keywords, ...): the processor is built
            from them once, here, and `collator.processor` is it.

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
    >>> processor = build_processor(tokenizer, template="collaborative")
    >>> collator = ThinkRecCollator(processor=processor)
    >>> records = [
    ...     {"UserID": 3, "HisItemIDs": [5, 9], "HisItemTitles": ["Heat (1995)", "Fargo (1996)"],
    ...      "TargetItemID": 7, "TargetItemTitle": "Alien (1979)", "label": 1, "mode": "rec", "reason": ""},
    ...     {"UserID": 4, "HisItemIDs": [], "HisItemTitles": [], "TargetItemID": 2,
    ...      "TargetItemTitle": "Big (1988)", "label": 0, "mode": "reason", "reason": "No. Too light."},
    ... ]
    >>> features = processor.encode_features(records)  # the rows tokenize_dataset caches
    >>> batch = collator(features)
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
    >>> raw = ThinkRecCollator(tokenizer, template="collaborative")(records)  # raw records, a processor built from the settings
    >>> all(torch.equal(raw[name], batch[name]) for name in batch)
    True

    ```
    """

    def __init__(self, tokenizer: Optional[PreTrainedTokenizerBase] = None, *, processor: Optional[ThinkRecProcessor] = None,
                 include_answers: bool = True, **settings):
        if processor is None:
            if tokenizer is None:
                raise ValueError("ThinkRecCollator needs a processor, or a tokenizer (with build_processor's settings) to build one.")
            processor = build_processor(tokenizer, **settings)
        elif tokenizer is not None or settings:
            given = ["tokenizer"] * (tokenizer is not None) + sorted(settings)
            raise ValueError(f"ThinkRecCollator: given a processor, {given} would be ignored; the processor's own settings "
                             "render the prompts (build another processor to change them).")
        self.processor = processor
        self.include_answers = include_answers

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = list(features)
        raw = [row for row, feature in enumerate(features) if "prompt_ids" not in feature]
        with input_errors():
            if raw:
                encoded = self.processor.encode_features([features[row] for row in raw], rows=raw, with_answers=self.include_answers)
                for row, feature in zip(raw, encoded):
                    features[row] = feature
            return self.processor.pad(features, include_answers=self.include_answers)


__all__ = [
    "METRIC_COLUMNS",
    "MODES",
    "ThinkRecCollator",
    "asks_for_disliked_titles",
    "build_processor",
    "load_templates",
    "raw_record",
    "read_template_lines",
    "tokenize_dataset",
]
