"""Names of the floating-point precisions the commands accept (the load path in
`thinkrec.training.loading` adds "auto")."""

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
