#!/usr/bin/env python
"""How big is a checkpoint? The small format (what the base does not hold + a reference to the base)
against the full one (every weight), for a stage-1 (LoRA) and a stage-2 (LoRA + projector + MF
tables) model on the bundled SmolLM2-135M-Instruct, with save / load seconds; and the same bytes
computed from the config (no download) for Llama-3-8B in bfloat16.

    python benchmarks/checkpoint_size.py

Prints a table; the last line is one JSON object
{"smollm2": {"stage1_full_bytes", "stage1_bytes", "stage2_full_bytes", "stage2_bytes", "load_seconds", ...},
 "llama_8b_computed": {...}}. Target: a checkpoint at most 1.1x (trained + added + CF tables).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from modeling_thinkrec import ThinkRecForCausalLM
from thinkrec.collaborative.models import CFCheckpoint
from thinkrec.training.backbones import smollm2_model_dir
from thinkrec.utils.environment import benchmark_environment


# ML-1M sizes (users, items incl. the padding row), MF d=256: the tables a stage-2 model carries.
ML1M_USERS, ML1M_ITEMS, MF_DIM = 6041, 3953, 256
LORA_R, LORA_TARGETS = 8, ("q_proj", "v_proj")


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern))


def trained_bytes(model: ThinkRecForCausalLM) -> int:
    """Bytes of what a small checkpoint must hold: the parts outside the base plus the added rows."""
    return sum(t.numel() * t.element_size() for t in model.trained_state_dict().values())


def measure(model: ThinkRecForCausalLM, workdir: Path, name: str) -> dict:
    small, full = workdir / f"{name}_small", workdir / f"{name}_full"
    start = time.perf_counter()
    model.save_pretrained(small)
    save_small = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(full, full_weights=True)
    save_full = time.perf_counter() - start
    start = time.perf_counter()
    ThinkRecForCausalLM.from_pretrained(small)
    load_small = time.perf_counter() - start
    start = time.perf_counter()
    ThinkRecForCausalLM.from_pretrained(full)
    load_full = time.perf_counter() - start
    return {
        "full_bytes": folder_bytes(full, "*.safetensors"),
        "bytes": folder_bytes(small, "*.safetensors"),
        "trained_bytes": trained_bytes(model),
        "save_seconds": round(save_small, 3), "save_full_seconds": round(save_full, 3),
        "load_seconds": round(load_small, 3), "load_full_seconds": round(load_full, 3),
    }


def llama_8b_computed() -> dict:
    """Checkpoint bytes of a Llama-3-8B stage-2 model, from the architecture alone (bf16 base,
    fp32 LoRA / projector / tables, 2 added slot rows in the untied input and output matrices)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    base_parameters = sum(p.numel() for p in base.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    out_features = {"q_proj": config.hidden_size, "v_proj": config.num_key_value_heads * head_dim}
    lora = config.num_hidden_layers * sum(LORA_R * (config.hidden_size + out_features[m]) for m in LORA_TARGETS)
    projector = MF_DIM * 10 * MF_DIM + 10 * MF_DIM + 10 * MF_DIM * config.hidden_size + config.hidden_size
    tables = (ML1M_USERS + ML1M_ITEMS) * MF_DIM
    added_rows = 2 * 2 * config.hidden_size  # bf16 rows of the two slot tokens, input and output
    trained = 4 * (lora + projector + tables) + 2 * added_rows
    stage1_trained = 4 * lora + 2 * added_rows
    full_stage2 = 2 * (base_parameters + 2 * 2 * config.hidden_size) + 4 * (lora + projector + tables)
    return {
        "base_parameters": base_parameters,
        "stage1_full_bytes": 2 * (base_parameters + 2 * 2 * config.hidden_size) + 4 * lora,
        "stage1_bytes": stage1_trained,
        "stage2_full_bytes": full_stage2,
        "stage2_bytes": trained,
        "full_fp32_stage2_bytes": 4 * (base_parameters + 2 * 2 * config.hidden_size + lora + projector + tables),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    backbone = smollm2_model_dir()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        stage1 = ThinkRecForCausalLM.from_language_model(AutoModelForCausalLM.from_pretrained(backbone), tokenizer, None)
        stage1.add_lora()
        results["stage1"] = measure(stage1, workdir, "stage1")
        del stage1
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        cf = CFCheckpoint("mf", MF_DIM, ML1M_USERS, ML1M_ITEMS, torch.randn(ML1M_USERS, MF_DIM), torch.randn(ML1M_ITEMS, MF_DIM))
        stage2 = ThinkRecForCausalLM.from_language_model(AutoModelForCausalLM.from_pretrained(backbone), tokenizer, cf)
        stage2.add_lora()
        results["stage2"] = measure(stage2, workdir, "stage2")
    computed = llama_8b_computed()

    print(f"checkpoint bytes, SmolLM2-135M-Instruct (float32; MF tables of ML-1M size, d={MF_DIM}), {os.cpu_count()} CPUs")
    print(f"{'stage':<8}{'full MB':>10}{'small MB':>10}{'trained MB':>12}{'small/trained':>15}{'full/small':>12}"
          f"{'load s':>9}{'load full s':>13}")
    for stage, row in results.items():
        print(f"{stage:<8}{row['full_bytes'] / 1e6:>10.1f}{row['bytes'] / 1e6:>10.2f}{row['trained_bytes'] / 1e6:>12.2f}"
              f"{row['bytes'] / row['trained_bytes']:>15.3f}{row['full_bytes'] / row['bytes']:>12.1f}"
              f"{row['load_seconds']:>9.2f}{row['load_full_seconds']:>13.2f}")
    print(f"Llama-3-8B computed (bf16 base): stage 1 {computed['stage1_full_bytes'] / 1e9:.2f} GB full vs "
          f"{computed['stage1_bytes'] / 1e6:.1f} MB small; stage 2 {computed['stage2_full_bytes'] / 1e9:.2f} GB full vs "
          f"{computed['stage2_bytes'] / 1e6:.1f} MB small ({computed['full_fp32_stage2_bytes'] / 1e9:.1f} GB in fp32)")
    print(json.dumps({
        "environment": benchmark_environment(),
        "smollm2": {
            "stage1_full_bytes": results["stage1"]["full_bytes"], "stage1_bytes": results["stage1"]["bytes"],
            "stage2_full_bytes": results["stage2"]["full_bytes"], "stage2_bytes": results["stage2"]["bytes"],
            "stage1_trained_bytes": results["stage1"]["trained_bytes"], "stage2_trained_bytes": results["stage2"]["trained_bytes"],
            "load_seconds": results["stage2"]["load_seconds"], "load_full_seconds": results["stage2"]["load_full_seconds"],
            "save_seconds": results["stage2"]["save_seconds"], "save_full_seconds": results["stage2"]["save_full_seconds"],
        },
        "llama_8b_computed": computed,
    }))


if __name__ == "__main__":
    main()
