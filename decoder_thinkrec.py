"""How ThinkRec calls the decoder of any causal LM and its output head, whatever the transformers release:
the key/value cache's argument name, reading the cache back from an output, and the positions kept for
vocabulary logits (`logits_to_keep`'s meaning, for backbones whose forward cannot slice by a mask).

Part of the model's remote-code payload (saved next to `modeling_thinkrec.py`); it imports only torch.
"""

from __future__ import annotations

import inspect

import torch


def cache_argument_name(decoder: torch.nn.Module) -> str:
    """The key/value cache's argument name of `decoder`'s forward: `cache` in transformers 5.2x,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


def cache_kwargs(name: str, cache, use_cache) -> dict:
    """The cache arguments of a decoder call, the cache (when there is one) under `name`."""
    kwargs = {"use_cache": bool(use_cache)}
    if cache is not None:
        kwargs[name] = cache
    return kwargs


def output_cache(outputs):
    """The cache an output carries, under either name (None without one)."""
    for name in ("cache", "past_key_values"):
        cache = getattr(outputs, name, None)
        if cache is not None:  # not `or`: an empty cache is falsy
            return cache
    return None


def keep_positions(hidden_states: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """The rows of `hidden_states` [B, T, H] that get vocabulary logits, as transformers' `logits_to_keep`:
    an int keeps the last n columns (0: all) -> [B, n, H]; a 1-D tensor those columns of every row; a 2-D
    integer tensor [B, n] those columns of each row; a boolean [B, T] mask its positions -> [n_kept, H]."""
    if isinstance(keep, torch.Tensor) and keep.dim() == 2:
        if keep.dtype == torch.bool:
            return hidden_states[keep]
        return torch.take_along_dim(hidden_states, keep[..., None], dim=1)
    if isinstance(keep, int):
        return hidden_states[:, -keep:] if keep else hidden_states
    return hidden_states[:, keep]
