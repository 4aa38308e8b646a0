"""One load path for every precision: the keyword arguments that `from_pretrained` gets for a backbone,
a ThinkRec checkpoint (whose small format rebuilds its base with them) or a teacher."""

from __future__ import annotations

from typing import Optional

import torch

from thinkrec.utils.dtypes import DTYPES
from thinkrec.utils.errors import InputError


DTYPE_CHOICES = ("auto", *DTYPES)


def default_dtype() -> torch.dtype:
    """bfloat16 where the device computes it natively (a CUDA GPU that supports it), else float32 (CPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def inference_device_map() -> Optional[dict]:
    """Where a tool that runs a model by itself (reflect.py, a local teacher) puts it: the current GPU when
    there is one, else None (the CPU). Training leaves placement to Trainer / accelerate instead."""
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return None


def load_kwargs(dtype: str = "auto", load_in_4bit: bool = False, attn_implementation: Optional[str] = None,
                trust_remote_code: bool = False, device_map=None) -> dict:
    """`from_pretrained` arguments for `dtype` ("auto" = `default_dtype()`), QLoRA's 4-bit NF4 base,
    the attention implementation and the device placement."""
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}.")
    torch_dtype = default_dtype() if dtype == "auto" else DTYPES[dtype]
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            # 4-bit weights are dequantised to this for the matmuls; bf16 unless the user asked for fp16.
            bnb_4bit_compute_dtype=torch.float16 if torch_dtype == torch.float16 else torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        device_map = device_map or {"": "cuda" if torch.cuda.is_available() else "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs
