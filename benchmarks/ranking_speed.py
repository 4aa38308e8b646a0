"""How much faster a user's candidates are scored from one shared prompt prefix, and whether the scores
stay the same.

Users of the ML-1M CoLLM split whose user part (instructions, liked history, user slot: the tokens
their candidates share) is 150-200 tokens, each with a pool of its test target plus `num_candidates`
unseen items (prepare_data's `num_candidates`, here 99: 100 rows per user). The same rows are scored
twice by ThinkRecForCausalLM's forward (the score logit that `score` turns into P(Yes)): one prompt per row (`per_row`, batches of `--per_row_batch`,
left-padded, as evaluation did before) and with `shared_prefix=True` (one user's pool per batch).
Reported: rows/s of both, the speedup, the ideal speedup from token counts
((P + S)·N ÷ (P + N·S) summed over users: what the saved tokens allow), the share of it reached, the
largest score-logit difference, and the mean target part length S (the suffix decides the ratio).

Backbones: `smollm2` (SmolLM2-135M-Instruct, bundled; CPU preset, fp32) and `llama3-8b-shape`
(a random-initialised Llama-3-8B-shaped backbone, bf16, for a GPU: speed does not depend on the
weights). LoRA and the projector are freshly initialised; MF tables random (speed and exactness do
not depend on their values).

    python benchmarks/ranking_speed.py                     # CPU preset: 3 users x 100 candidates
    python benchmarks/ranking_speed.py --preset gpu        # 8B shape, bf16, 16 users, on CUDA

Needs ../shared/data/ml1m-collm (or --data_path). Prints a table and, last, one JSON line.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_collator import build_processor
from modeling_thinkrec import ThinkRecForCausalLM
from prefix_thinkrec import common_length
from thinkrec.collaborative.models import CFCheckpoint
from thinkrec.data.preparation import records_from_collm
from thinkrec.data.readers import read_collm_splits
from thinkrec.training.backbones import load_smollm2, smollm2_tokenizer_dir
from thinkrec.utils.environment import benchmark_environment


DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml1m-collm"
PRESETS = {
    "cpu": {"backbone": "smollm2", "dtype": "float32", "users": 3, "device": "cpu"},
    "gpu": {"backbone": "llama3-8b-shape", "dtype": "bfloat16", "users": 16, "device": "cuda"},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backbone", choices=("smollm2", "llama3-8b-shape"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--device")
    parser.add_argument("--users", type=int, help="users scored (each with its whole pool)")
    parser.add_argument("--num_candidates", type=int, default=99, help="sampled candidates per pool besides the target")
    parser.add_argument("--prefix_tokens", type=int, nargs=2, default=(150, 200), help="user-part length range, tokens")
    parser.add_argument("--per_row_batch", type=int, default=8, help="rows per batch of per-row scoring")
    parser.add_argument("--data_path", default=str(DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def backbone(args):
    dtype = getattr(torch, args.dtype)
    if args.backbone == "smollm2":
        model, tokenizer = load_smollm2(dtype=dtype)
        return model, tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tokenizer) + 2, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    return model, tokenizer


def pools(args, processor):
    """(user, rows) for `args.users` seeded users whose candidates share 150-200 prompt tokens."""
    data = Path(args.data_path)
    if not data.is_dir():
        sys.exit(f"benchmarks/ranking_speed.py: the ML-1M CoLLM split is not at {data}; pass --data_path.")
    records = records_from_collm(read_collm_splits(data), max_history=10, num_candidates=args.num_candidates,
                                 seed=args.seed)
    titles = dict(zip(records.items["ItemID"].tolist(), records.items["title"].tolist()))
    test = records.splits["test"].to_pandas()
    positives = test[test["label"] == 1].drop_duplicates(["UserID", "TargetItemID"]).set_index(["UserID", "TargetItemID"])
    table = records.candidates.to_pandas()
    rng = np.random.default_rng(args.seed)
    chosen, seen_users = [], set()
    for index in rng.permutation(len(table)):
        pool = table.iloc[index]
        if pool.UserID in seen_users:
            continue
        row = positives.loc[(pool.UserID, pool.TargetItemID)].to_dict()
        base = {"UserID": int(pool.UserID), "HisItemIDs": list(row["HisItemIDs"]), "HisItemTitles": list(row["HisItemTitles"]),
                "HisItemLabels": list(row["HisItemLabels"])}
        rows = [{**base, "TargetItemID": int(item), "TargetItemTitle": titles[int(item)], "label": int(i == 0), "mode": "rec"}
                for i, item in enumerate(pool.CandidateItemIDs)]
        prompts = processor.encode(rows[:2], with_answers=False)["prompt_ids"]
        prefix = common_length(*prompts)
        if args.prefix_tokens[0] <= prefix <= args.prefix_tokens[1]:
            chosen.append((int(pool.UserID), rows))
            seen_users.add(pool.UserID)
        if len(chosen) == args.users:
            return chosen
    sys.exit(f"only {len(chosen)} users have a user part of {args.prefix_tokens} tokens; lower --users.")


def token_counts(processor, rows) -> tuple[int, list[int]]:
    prompts = processor.encode(rows, with_answers=False)["prompt_ids"]
    prefix = min(common_length(prompts[0], prompt) for prompt in prompts[1:])
    return prefix, [len(prompt) - prefix for prompt in prompts]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    language_model, tokenizer = backbone(args)
    generator = torch.Generator().manual_seed(args.seed)
    num_users, num_items, cf_dim = 839, 3256, 256
    cf = CFCheckpoint("mf", cf_dim, num_users, num_items, torch.randn(num_users, cf_dim, generator=generator),
                      torch.randn(num_items, cf_dim, generator=generator))
    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, cf)
    model.add_lora()
    model.to(args.device).eval()
    processor = build_processor(tokenizer, template="collaborative")
    users = pools(args, processor)

    def run(rows, shared):
        scores = []
        batch_size = len(rows) if shared else args.per_row_batch
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(args.device) for k, v in processor(rows[start:start + batch_size]).items()}
            # Score logits (before the sigmoid, which saturates to exactly 0 or 1 and would hide differences).
            with torch.no_grad():
                scores.append(model(**batch, shared_prefix=shared).scores.float().cpu())
        return torch.cat(scores)

    # Warm up both paths once on the first user's first rows.
    run(users[0][1][:args.per_row_batch], False)
    run(users[0][1][:args.per_row_batch], True)
    seconds = {"per_row": 0.0, "shared_prefix": 0.0}
    max_diff, per_user, per_row_tokens, shared_tokens = 0.0, [], 0, 0
    for user, rows in users:
        prefix, suffixes = token_counts(processor, rows)
        per_row_tokens += sum(prefix + s for s in suffixes)
        shared_tokens += prefix + sum(suffixes)
        timings = {}
        scores = {}
        for name in ("per_row", "shared_prefix"):
            synchronize(args.device)
            start = time.perf_counter()
            scores[name] = run(rows, name == "shared_prefix")
            synchronize(args.device)
            timings[name] = time.perf_counter() - start
            seconds[name] += timings[name]
        difference = float((scores["per_row"] - scores["shared_prefix"]).abs().max())
        max_diff = max(max_diff, difference)
        per_user.append({"user": user, "rows": len(rows), "P": prefix, "S": round(float(np.mean(suffixes)), 1),
                         "per_row_s": round(timings["per_row"], 2), "shared_s": round(timings["shared_prefix"], 2),
                         "max_abs_diff": difference})
        print(f"user {user}: P={prefix} S={np.mean(suffixes):.1f} per-row {timings['per_row']:.1f}s "
              f"shared {timings['shared_prefix']:.1f}s", file=sys.stderr, flush=True)

    rows = sum(len(r) for _, r in users)
    rates = {name: rows / value for name, value in seconds.items()}
    speedup = rates["shared_prefix"] / rates["per_row"]
    ideal = per_row_tokens / shared_tokens
    mean_prefix = float(np.mean([u["P"] for u in per_user]))
    mean_suffix = float(np.mean([u["S"] for u in per_user]))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nShared-prefix scoring, {args.backbone} {args.dtype} on {device}: {len(users)} users x "
          f"{args.num_candidates + 1} candidates, user part P = {mean_prefix:.0f} tokens, target part S = {mean_suffix:.1f}")
    print("| user | rows | P | S | per-row s | shared s | speedup | max |Δ logit| |\n|---|---|---|---|---|---|---|---|")
    for u in per_user:
        print(f"| {u['user']} | {u['rows']} | {u['P']} | {u['S']} | {u['per_row_s']} | {u['shared_s']} | "
              f"{u['per_row_s'] / u['shared_s']:.2f}× | {u['max_abs_diff']:.1e} |")
    print(f"\n| method | rows/s |\n|---|---|\n| per row (batches of {args.per_row_batch}) | {rates['per_row']:.2f} |\n"
          f"| shared prefix (one pool per batch) | {rates['shared_prefix']:.2f} |")
    print(f"\nspeedup {speedup:.2f}× of an ideal {ideal:.2f}× from token counts ({speedup / ideal:.0%}); "
          f"max |Δ score logit| {max_diff:.1e}\n")
    print(json.dumps({
        "rows_per_second": {"shared_prefix": round(rates["shared_prefix"], 3), "per_row": round(rates["per_row"], 3)},
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "share_of_ideal": round(speedup / ideal, 3),
        "max_abs_diff": max_diff,
        "prefix_tokens": round(mean_prefix, 1),
        "suffix_tokens": round(mean_suffix, 2),
        "users": len(users),
        "rows": rows,
        "per_row_batch": args.per_row_batch,
        "backbone": args.backbone,
        "dtype": args.dtype,
        "device": device,
        "per_user": per_user,
        **benchmark_environment(),
    }))


if __name__ == "__main__":
    main()
