"""One load path for every model: the keyword arguments that `from_pretrained` gets for a backbone, a
ThinkRec checkpoint (whose small format rebuilds its base with them) or a teacher, and the checks that
turn a bad model input into one message naming the field, the folder or the file (an `InputError`)
before transformers would fail with a traceback: a path that does not exist, a folder without its
config, weights or tokenizer, a checkpoint folder a run stopped while publishing into, a safetensors
file that is truncated, empty or a pickle under another name (never unpickled)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from thinkrec.utils.dtypes import DTYPES
from thinkrec.utils.errors import InputError, MissingInputError
from thinkrec.utils.files import Manifest


DTYPE_CHOICES = ("auto", *DTYPES)
# The files a backbone folder keeps its weights in, in the order transformers looks for them.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# A PEFT adapter folder (no config.json: transformers loads the base its adapter_config.json names).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The files, or sets of files, that make a folder hold a tokenizer: a fast tokenizer, the sentencepiece models
# transformers' tokenizers name (llama, T5, XLM-R/mBART, DeBERTa-v2), a tiktoken or Mistral tekken vocabulary,
# a byte-level BPE vocabulary with its merges (GPT-2), a WordPiece vocabulary (BERT).
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",), ("sentencepiece.bpe.model",), ("spm.model",),
                   ("sentencepiece.model",), ("tiktoken.model",), ("tekken.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))


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


# ------------------------------------------------------------------------------------------ checks


def model_source(name_or_path: str | os.PathLike, field: str) -> str:
    """`name_or_path` (with `~` expanded) when it is a local folder or a Hub id that can be resolved; a
    `MissingInputError` naming `field` when it is a path that does not exist (it starts with `.`, `/` or
    `~`, or its first part is a local folder, as `outputs/` of `outputs/stage1`), or, with HF_HUB_OFFLINE=1,
    neither a folder nor a Hub model in the local cache."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    given = str(name_or_path)
    path = os.path.expanduser(given)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise MissingInputError(f"{field}={given}: a file, not a model folder (config.json and weights) or a Hub id.")
    if given.startswith((".", "/", "~")):
        raise MissingInputError(f"{field}={given}: no such folder {given}.")
    first = Path(given).parts[0] if Path(given).parts else given
    if first != given and os.path.isdir(first):
        raise MissingInputError(f"{field}={given}: no such folder {given} ({first}/ is a folder here, so this is a local "
                                "path, not a Hub id).")
    try:
        validate_repo_id(given)
    except HFValidationError:
        raise MissingInputError(f"{field}={given}: no such folder {given}.") from None
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(given, "config.json"), str):
        raise MissingInputError(f"{field}={given}: no such folder {given}, and with HF_HUB_OFFLINE=1 it is not a Hub model "
                                f"in the local cache either.")
    return given


def check_safetensors(path: str | os.PathLike) -> None:
    """An `InputError` naming `path` unless it is a whole safetensors file (its header is read, the
    tensors not; a pickle, e.g. a torch.save .bin renamed, is refused and never unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise InputError(f"{path}: not a valid safetensors file ({os.path.getsize(path)} bytes; {error}): truncated, empty "
                         f"or another format such as a pickled .bin, which is never unpickled. Write it again.") from None


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after `check_safetensors`."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path), device=str(device))


def read_config(folder: str | os.PathLike, field: str, kind: str = "model folder") -> dict:
    """The `config.json` of a model folder; a `MissingInputError` naming `field` when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MissingInputError(f"{field}={folder}: not a {kind} (no config.json).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}).") from None


def check_weights(folder: str | os.PathLike, field: str, names: tuple[str, ...] = MODEL_WEIGHTS) -> None:
    """The folder holds one of the weight files `names` (every shard an index names, too), and each of
    its safetensors files is whole; else an error naming the folder and the missing or broken file."""
    folder = Path(folder)
    found = [name for name in names if (folder / name).is_file()]
    if not found:
        others = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
        raise MissingInputError(f"{field}={folder}: no {names[0]} in the folder{others}; its weights are missing.")
    for index in (folder / name for name in found if name.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise InputError(f"{index}: not a weights index (a JSON object with a weight_map): {error!r}.") from None
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise MissingInputError(f"{field}={folder}: {index.name} names {missing[0]}, which is not in the folder "
                                    f"({len(missing)} of {len(shards)} shards missing).")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_model_folder(folder: str | os.PathLike, field: str) -> None:
    """A backbone folder holds its config and whole weights (or is a PEFT adapter folder with its weights)."""
    adapter = os.path.isfile(os.path.join(folder, "adapter_config.json")) and not os.path.isfile(os.path.join(folder, "config.json"))
    if not adapter:
        read_config(folder, field)
    check_weights(folder, field, ADAPTER_WEIGHTS if adapter else MODEL_WEIGHTS)


def check_tokenizer(folder: str | os.PathLike, field: str) -> None:
    """The folder holds a tokenizer (one of `TOKENIZER_FILES`); else an error naming it (transformers would
    suggest installing sentencepiece instead)."""
    present = [[(Path(folder) / name).is_file() for name in names] for names in TOKENIZER_FILES]
    if any(all(found) for found in present):
        return
    partial = [f"{' and '.join(n for n, f in zip(names, found) if f)} without "
               f"{' and '.join(n for n, f in zip(names, found) if not f)}"
               for names, found in zip(TOKENIZER_FILES, present) if any(found)]
    expected = ", ".join(" with ".join(names) for names in TOKENIZER_FILES[1:])
    found = f"; it has {', '.join(partial)}" if partial else ""
    raise MissingInputError(f"{field}={folder}: no tokenizer in the folder (no {TOKENIZER_FILES[0][0]}, nor {expected}"
                            f"{found}); save the tokenizer with the model.")


# ------------------------------------------------------------------------------------------- loads


def load_language_model(name_or_path: str, field: str, model_class=None, **kwargs):
    """`model_class.from_pretrained(name_or_path, **kwargs)` (default AutoModelForCausalLM; AutoModel for an
    encoder) after the checks of a local folder (config, weights, whole safetensors files); errors name
    `field` (e.g. "model_name_or_path")."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class

    source = model_source(name_or_path, field)
    if os.path.isdir(source):
        check_model_folder(source, field)
    return model_class.from_pretrained(source, **kwargs)


def load_tokenizer(name_or_path: str, field: str, **kwargs):
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)`, after checking that a local folder holds a tokenizer."""
    from transformers import AutoTokenizer

    source = model_source(name_or_path, field)
    if os.path.isdir(source):
        check_tokenizer(source, field)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_checkpoint(folder: str, field: str, **kwargs):
    """(model, tokenizer) of a ThinkRec checkpoint folder (`init_from`, reflect.py's `model_dir`), with
    `ThinkRecForCausalLM.from_pretrained(folder, **kwargs)`. Checked first: that no run stopped while
    publishing into it (its manifest), the config, the weights
    (`thinkrec_weights.safetensors`, or a full `model.safetensors`), the tokenizer and, for the small
    format, the base it is rebuilt from (`base_model_name_or_path=` in kwargs, else the config's)."""
    from modeling_thinkrec import TRAINED_WEIGHTS_NAME, ThinkRecForCausalLM

    source = model_source(folder, field)
    if os.path.isdir(source):
        manifest = Manifest(source, owner="")  # only read: an owner matters to what a run writes
        if manifest.state == "publishing":
            owners = sorted(set(manifest.files.values()))
            command = f" ({'/'.join(owners)}, output_dir={folder})" if owners else ""
            raise InputError(f"{field}={folder}: a run stopped while moving its final files in (manifest state 'publishing'); "
                             f"its files may come from two runs. Run that command{command} again to finish it.")
        config = read_config(source, field, "ThinkRec model folder")
        # The small format, else every weight (save_pretrained(..., full_weights=True)).
        check_weights(source, field, (TRAINED_WEIGHTS_NAME, "model.safetensors", "model.safetensors.index.json"))
        check_tokenizer(source, field)
        base = kwargs.get("base_model_name_or_path") or config.get("base_model_name_or_path")
        if base and os.path.isfile(os.path.join(source, TRAINED_WEIGHTS_NAME)):
            base_field = f"the base of {field}={folder}: base_model_name_or_path"
            base_source = model_source(base, base_field)
            if os.path.isdir(base_source):
                check_model_folder(base_source, base_field)
    model = ThinkRecForCausalLM.from_pretrained(source, **kwargs)
    return model, load_tokenizer(source, field)


def load_processor(folder: str, field: str):
    """The `ThinkRecProcessor` saved in a ThinkRec model folder (its prompt templates and tokenizer), after
    checking that a local folder holds `processor_config.json` and a tokenizer."""
    # modeling_thinkrec registers ThinkRecConfig with AutoConfig: without it the tokenizer's load reads the
    # folder's config.json as remote code and asks whether to run it.
    import modeling_thinkrec  # noqa: F401
    from processing_thinkrec import ThinkRecProcessor

    source = model_source(folder, field)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "processor_config.json")):
            raise MissingInputError(f"{field}={folder}: no processor_config.json (the prompt templates the model was trained "
                                    "with); run_thinkrec.py saves it in every output folder and checkpoint.")
        check_tokenizer(source, field)
    return ThinkRecProcessor.from_pretrained(source)
