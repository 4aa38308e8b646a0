"""Small real inputs for run_thinkrec tests: prepared records, a tiny Llama backbone folder with the
SmolLM2 tokenizer, and an MF checkpoint trained on nothing (random tables of the right size)."""

import os

import numpy as np
import pandas as pd


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from thinkrec.collaborative.models import MatrixFactorization, save_cf_checkpoint
from thinkrec.data.preparation import RecordOptions, prepare_records
from thinkrec.data.readers import InteractionLog
from thinkrec.data.records import save_prepared
from thinkrec.training.backbones import smollm2_tokenizer_dir, tiny_llama


def write_records(directory, num_users=16, num_items=24, per_user=9, seed=0, output_format="parquet", num_candidates=0):
    """Ratings where even items are liked, so a model can learn something in a few steps; `num_candidates` > 0
    adds ranking pools."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        for step, item in enumerate(rng.choice(num_items, per_user, replace=False)):
            rating = 5.0 if item % 2 == 0 else 1.0
            rows.append((f"u{user}", f"i{item}", 1000 * step + user, rating))
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(num_items)], "title": [f"Film {i} ({1960 + i})" for i in range(num_items)],
                          "genres": "", "description": ""})
    options = RecordOptions(split_ratios=[0.6, 0.2, 0.2], num_candidates=num_candidates)
    records = prepare_records(InteractionLog(interactions, items, "toy"), options)
    save_prepared(records, directory, output_format)
    return records.metadata


def write_backbone(directory, seed=0, hidden_size=32):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    model = tiny_llama(len(tokenizer), hidden_size=hidden_size, num_attention_heads=2, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_mf(directory, num_users, num_items, dim=8, seed=0):
    import torch

    torch.manual_seed(seed)
    save_cf_checkpoint(MatrixFactorization(num_users, num_items, dim), str(directory))
    return directory


def write_run_assets(root):
    """Records, a tiny backbone and an MF checkpoint of the records' sizes under `root`, as run_thinkrec tests use them."""
    metadata = write_records(root / "records")
    write_backbone(root / "backbone")
    write_mf(root / "mf", metadata["num_users"], metadata["num_items"])
    return {"root": root, "records": root / "records", "backbone": root / "backbone", "mf": root / "mf", "metadata": metadata}


def run(tmp_path, args, name="args.json"):
    """`run_thinkrec.main` on `args` written as a JSON arguments file (the documented way to call it)."""
    import json

    import run_thinkrec

    path = tmp_path / name
    path.write_text(json.dumps(args))
    return run_thinkrec.main([str(path)])
