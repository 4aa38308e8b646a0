"""A local HF causal LM as the teacher of reasons (and of item keywords, through `complete`)."""

from __future__ import annotations

from typing import Callable, Optional

from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL, check_item_nouns
from thinkrec.reasons.base import ReasonSource
from thinkrec.reasons.prompts import teacher_prompt, teacher_system


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


__all__ = ["LocalTeacher"]
