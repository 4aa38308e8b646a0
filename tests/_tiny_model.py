"""Shared helpers for the ThinkRec model/collator tests: the real SmolLM2 tokenizer (converted from the
bundled GGUF once, then cached) and tiny random Llama backbones with random CF tables."""

import functools
import os
import random

import torch
from transformers import AutoTokenizer


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from modeling_thinkrec import ThinkRecForCausalLM, add_slot_tokens
from thinkrec.collaborative.models import CFCheckpoint, SASRec
from thinkrec.training.backbones import smollm2_tokenizer_dir, tiny_llama


NUM_USERS = 11
NUM_ITEMS = 31
CF_DIM = 8
TITLES = [f"Movie number {i} ({1950 + i})" for i in range(NUM_ITEMS)]


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> str:
    return str(smollm2_tokenizer_dir())


def make_tokenizer(with_slots: bool = True):
    """A fresh SmolLM2 tokenizer (slot tokens added when asked)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    if with_slots:
        add_slot_tokens(tokenizer, "<|user_slot|>", "<|item_slot|>")
    return tokenizer


def make_cf_checkpoint(cf_model_type: str = "mf", seed: int = 0) -> CFCheckpoint | None:
    generator = torch.Generator().manual_seed(seed)
    if cf_model_type == "none":
        return None
    if cf_model_type == "sasrec":
        torch.manual_seed(seed)
        encoder = SASRec(NUM_ITEMS, hidden_size=CF_DIM, num_blocks=1, num_heads=1, max_len=6).eval()
        return CFCheckpoint("sasrec", CF_DIM, 0, NUM_ITEMS, None, encoder.item_embedding.weight.detach().clone(), encoder)
    return CFCheckpoint(
        cf_model_type,
        CF_DIM,
        NUM_USERS,
        NUM_ITEMS,
        torch.randn(NUM_USERS, CF_DIM, generator=generator),
        torch.randn(NUM_ITEMS, CF_DIM, generator=generator),
    )


def make_model(
    cf_model_type: str = "mf",
    lora: bool = True,
    lora_dropout: float = 0.0,
    seed: int = 0,
    **config_kwargs,
):
    """(ThinkRecForCausalLM in eval mode, tokenizer): tiny 2-layer Llama (hidden 32) over the SmolLM2
    vocabulary; LoRA B is randomised so that the adapter changes outputs and gets gradients."""
    tokenizer = make_tokenizer(with_slots=False)
    language_model = tiny_llama(len(tokenizer) + 2, hidden_size=32, num_attention_heads=2, seed=seed)
    model = ThinkRecForCausalLM.from_language_model(
        language_model, tokenizer, make_cf_checkpoint(cf_model_type, seed), **config_kwargs
    )
    if lora:
        model.add_lora(lora_dropout=lora_dropout)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval(), tokenizer


def make_records(num_rows: int, seed: int = 0, modes=("rec", "reason"), max_history: int = 5) -> list[dict]:
    """Records shaped like docs/records.md with varied history lengths (including empty)."""
    random_generator = random.Random(seed)
    records = []
    for row in range(num_rows):
        history_length = random_generator.randint(0, max_history) if row else max_history
        history = random_generator.sample(range(1, NUM_ITEMS), history_length)
        target = random_generator.randrange(1, NUM_ITEMS)
        label = random_generator.randint(0, 1)
        mode = modes[row % len(modes)]
        verdict = "Yes." if label else "No."
        reason = f"{verdict} The user liked {TITLES[history[0]] if history else 'little'} so far." if mode == "reason" else ""
        records.append(
            {
                "UserID": random_generator.randrange(1, NUM_USERS),
                "HisItemIDs": history,
                "HisItemTitles": [TITLES[i] for i in history],
                "TargetItemID": target,
                "TargetItemTitle": TITLES[target],
                "label": label,
                "mode": mode,
                "reason": reason,
                "not_cold": 1,
                "timestamp": 0,
            }
        )
    return records
