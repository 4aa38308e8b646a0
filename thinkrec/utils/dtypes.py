"""Names of the floating-point precisions the commands accept."""

import torch

from thinkrec.utils.errors import InputError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`, or an InputError naming the field and the accepted names."""
    if name not in DTYPES:
        raise InputError(f"{field_name} must be one of {list(DTYPES)}, got {name!r}.")
    return DTYPES[name]
