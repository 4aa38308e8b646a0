"""What ThinkRec's wrapper costs and what scoring without generating saves.

1. Training step (forward + backward + AdamW) of ThinkRecForCausalLM (slot injection, per-row mixed
   losses, LoRA + projector trainable) against the wrapped LM's own step (`lm(..., labels=...)`,
   LoRA trainable) on the identical token batch. Target: ratio <= 1.05.
2. `score()` rows/s against generating the 16-token answer of the published evaluation
   (`generate(max_new_tokens=16)`, same prompts, same injection). Target: >= 10x.

Prints a table and, as the last line, one JSON object.

    python benchmarks/model_overhead.py --backbone smollm2   # SmolLM2-135M-Instruct (bundled GGUF)
    python benchmarks/model_overhead.py --backbone tiny      # 2-layer random Llama
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backbones import load_smollm2, smollm2_tokenizer_dir, tiny_llama  # noqa: E402
from collaborative_models import CFCheckpoint  # noqa: E402
from data_collator import ThinkRecCollator  # noqa: E402
from modeling_thinkrec import ThinkRecForCausalLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


WORDS = (
    "star wars return empire night day love story city lost dark light king queen war game man woman "
    "house river road summer winter secret island dream fire stone heart world time"
).split()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="LM weights dtype")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--history", type=int, default=10, help="history items per prompt (published: 10)")
    parser.add_argument("--reason_share", type=float, default=0.2, help="share of reasoning rows (published: 0.2)")
    parser.add_argument("--reason_words", type=int, default=60, help="words per synthetic reason")
    parser.add_argument("--cf_dim", type=int, default=256, help="CF vector size (MF: 256)")
    parser.add_argument("--generate_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=None, help="backbone cache (default $THINKREC_CACHE or ~/.cache/thinkrec)")
    return parser.parse_args()


def synthetic_records(args, num_users=1000, num_items=3000):
    """Rows shaped like docs/records.md: ML-1M-like titles, `history` items, a share of reasoning rows."""
    generator = random.Random(args.seed)

    def title(item_id):
        words = random.Random(item_id).sample(WORDS, 3)
        return " ".join(words).title() + f" ({1950 + item_id % 50})"

    records = []
    for row in range(args.batch_size):
        history = generator.sample(range(1, num_items), args.history)
        target = generator.randrange(1, num_items)
        label = generator.randint(0, 1)
        is_reason = row < round(args.reason_share * args.batch_size)
        reason = ""
        if is_reason:
            reason = ("Yes. " if label else "No. ") + " ".join(generator.choices(WORDS, k=args.reason_words)) + "."
        records.append(
            {
                "UserID": generator.randrange(1, num_users),
                "HisItemIDs": history,
                "HisItemTitles": [title(i) for i in history],
                "TargetItemID": target,
                "TargetItemTitle": title(target),
                "label": label,
                "mode": "reason" if is_reason else "rec",
                "reason": reason,
            }
        )
    return records, num_users, num_items


def build(args):
    dtype = getattr(torch, args.dtype)
    if args.backbone == "smollm2":
        language_model, tokenizer = load_smollm2(dtype=dtype, cache_dir=args.cache_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(args.cache_dir))
        language_model = tiny_llama(len(tokenizer) + 2, hidden_size=64).to(dtype)
    records, num_users, num_items = synthetic_records(args)
    generator = torch.Generator().manual_seed(args.seed)
    cf_checkpoint = CFCheckpoint(
        "mf", args.cf_dim, num_users, num_items,
        torch.randn(num_users, args.cf_dim, generator=generator),
        torch.randn(num_items, args.cf_dim, generator=generator),
    )
    model = ThinkRecForCausalLM.from_language_model(language_model, tokenizer, cf_checkpoint)
    model.add_lora()
    return model, tokenizer, records


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer, records = build(args)
    train_batch = ThinkRecCollator(tokenizer)(records)
    prompt_batch = ThinkRecCollator(tokenizer, include_answers=False)(records)
    prompt_inputs = {k: prompt_batch[k] for k in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids")}

    trainable = model.set_training_stage("joint")
    parameters = dict(model.named_parameters())
    thinkrec_optimizer = torch.optim.AdamW([parameters[n] for n in trainable], lr=1e-5)
    lora_parameters = [parameters[n] for n in trainable if "lora_" in n]
    plain_optimizer = torch.optim.AdamW(lora_parameters, lr=1e-5)

    def thinkrec_step():
        thinkrec_optimizer.zero_grad(set_to_none=True)
        model(**train_batch).loss.backward()
        thinkrec_optimizer.step()

    def plain_step():
        plain_optimizer.zero_grad(set_to_none=True)
        model.language_model(
            input_ids=train_batch["input_ids"], attention_mask=train_batch["attention_mask"], labels=train_batch["labels"]
        ).loss.backward()
        plain_optimizer.step()

    def score():
        model.score(**prompt_inputs)

    def generate():
        model.generate(**prompt_inputs, max_new_tokens=args.generate_tokens, min_new_tokens=args.generate_tokens)

    # Interleaved repeats so load from other processes hits both sides alike.
    model.train()
    for _ in range(args.warmup):
        thinkrec_step(), plain_step()
    thinkrec_times, plain_times = [], []
    for _ in range(args.repeats):
        thinkrec_times.append(timed(thinkrec_step))
        plain_times.append(timed(plain_step))
    model.eval()
    for _ in range(args.warmup):
        score(), generate()
    score_times, generate_times = [], []
    for _ in range(args.repeats):
        score_times.append(timed(score))
        generate_times.append(timed(generate))

    rows = len(records)
    thinkrec_step_s = statistics.median(thinkrec_times)
    plain_step_s = statistics.median(plain_times)
    score_rows_s = rows / statistics.median(score_times)
    generate_rows_s = rows / statistics.median(generate_times)
    result = {
        "backbone": args.backbone,
        "dtype": args.dtype,
        "batch_size": rows,
        "train_tokens_per_batch": int(train_batch["attention_mask"].sum()),
        "train_sequence_length": int(train_batch["input_ids"].shape[1]),
        "prompt_length": int(prompt_batch["input_ids"].shape[1]),
        "thinkrec_step_s": round(thinkrec_step_s, 4),
        "plain_lm_step_s": round(plain_step_s, 4),
        "train_step_ratio": round(thinkrec_step_s / plain_step_s, 3),
        "score_rows_per_s": round(score_rows_s, 2),
        "generate_rows_per_s": round(generate_rows_s, 2),
        "generate_tokens": args.generate_tokens,
        "score_speedup_vs_generate": round(score_rows_s / generate_rows_s, 2),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"ThinkRec overhead on {args.backbone} ({args.dtype}), batch {rows} "
          f"({result['train_tokens_per_batch']} training tokens, prompts of {result['prompt_length']} tokens)")
    print(f"| {'measure':<42} | {'ThinkRec':>12} | {'baseline':>12} | {'ratio':>8} | target |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 14}|{'-' * 10}|--------|")
    print(f"| {'train step s (baseline: plain LM step)':<42} | {thinkrec_step_s:>12.4f} | {plain_step_s:>12.4f} | "
          f"{result['train_step_ratio']:>8.3f} | <=1.05 |")
    print(f"| {f'rows/s (baseline: generate {args.generate_tokens} tokens)':<42} | {score_rows_s:>12.2f} | "
          f"{generate_rows_s:>12.2f} | {result['score_speedup_vs_generate']:>8.2f} | >=10   |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
