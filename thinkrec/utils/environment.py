"""What a benchmark figure depends on besides the code: package versions, the machine, and its load."""

from __future__ import annotations

import importlib.metadata
import os
import platform


# The 1-minute load average when this module was imported (at the top of a benchmark, before its own work;
# the imports before it are counted).
LOAD_AT_START = round(os.getloadavg()[0], 2)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "huggingface_hub", "safetensors",
            "numpy", "pandas", "pyarrow", "scikit-learn")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the figures depend on (None when one is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def benchmark_environment() -> dict:
    """Versions, machine (CPU count, GPU name when there is one) and load, for a benchmark's JSON line."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": package_versions(), "cpus": os.cpu_count(), "gpu": device, "machine": platform.machine(),
            "load_1min_at_start": LOAD_AT_START, "load_1min_at_end": round(os.getloadavg()[0], 2)}
