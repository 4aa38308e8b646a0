"""What ThinkRec's wrapper costs and what scoring without generating saves.

1. Training step (forward + backward + AdamW) of ThinkRecForCausalLM (slot injection, per-row mixed
   losses) against the wrapped LM's own step (`lm(..., labels=...)`) on the identical token batch,
   both training the same LoRA parameters. Target: ratio <= 1.05. ThinkRec turns only the
   answer-predicting positions into vocabulary logits; a second baseline does the same for the plain
   LM (`logits_to_keep=mask`, token-mean CE), isolating the cost of injection and per-row mixing. A
   third row trains LoRA + projector (stage "joint"), whose gradient must reach the input embeddings.
2. `score()` rows/s against generating the 16-token answer of the published evaluation
   (`generate(max_new_tokens=16)`, same prompts, same injection). Target: >= 10x.

Prints a table and, as the last line, one JSON object.

    python benchmarks/model_overhead.py --backbone smollm2   # SmolLM2-135M-Instruct (bundled GGUF)
    python benchmarks/model_overhead.py --backbone tiny      # 2-layer random Llama
"""

import argparse
import json
import random
import statistics
import sys
import time

import torch
from torch.nn import functional as F
from transformers import AutoTokenizer

from data_collator import ThinkRecCollator
from modeling_thinkrec import ThinkRecForCausalLM
from thinkrec.collaborative.models import CFCheckpoint
from thinkrec.training.backbones import load_smollm2, smollm2_tokenizer_dir, tiny_llama
from thinkrec.utils.environment import benchmark_environment


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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer, records = build(args)
    train_batch = ThinkRecCollator(tokenizer)(records)
    prompt_batch = ThinkRecCollator(tokenizer, include_answers=False)(records)
    prompt_inputs = {k: prompt_batch[k] for k in ("input_ids", "attention_mask", "user_slot_ids", "item_slot_ids")}

    parameters = dict(model.named_parameters())
    optimizers = {
        stage: torch.optim.AdamW([parameters[n] for n in model.set_training_stage(stage)], lr=1e-5)
        for stage in ("lora", "joint")
    }
    answer_mask = train_batch["labels"][:, 1:] != -100
    predicts_answer = F.pad(answer_mask, (0, 1), value=False)
    answer_targets = train_batch["labels"][:, 1:][answer_mask]
    lm_inputs = {"input_ids": train_batch["input_ids"], "attention_mask": train_batch["attention_mask"]}

    def thinkrec_step(stage):
        model.set_training_stage(stage)
        optimizers[stage].zero_grad(set_to_none=True)
        model(**train_batch).loss.backward()
        optimizers[stage].step()

    def plain_step():
        # The wrapped LM's own causal-LM loss, LoRA trainable: what a plain fine-tune costs.
        model.set_training_stage("lora")
        optimizers["lora"].zero_grad(set_to_none=True)
        model.language_model(**lm_inputs, labels=train_batch["labels"]).loss.backward()
        optimizers["lora"].step()

    def plain_answer_logits_step():
        # The same LM step with logits only where labels are, isolating injection and per-row mixing.
        model.set_training_stage("lora")
        optimizers["lora"].zero_grad(set_to_none=True)
        logits = model.language_model(**lm_inputs, logits_to_keep=predicts_answer).logits
        F.cross_entropy(logits.float(), answer_targets).backward()
        optimizers["lora"].step()

    steps = {
        "thinkrec_lora": lambda: thinkrec_step("lora"),
        "thinkrec_joint": lambda: thinkrec_step("joint"),
        "plain_lm": plain_step,
        "plain_lm_answer_logits": plain_answer_logits_step,
    }
    inference = {
        "score": lambda: model.score(**prompt_inputs),
        "generate": lambda: model.generate(
            **prompt_inputs, max_new_tokens=args.generate_tokens, min_new_tokens=args.generate_tokens
        ),
    }
    # Interleaved repeats so load from other processes hits every variant alike; medians reported.
    times = {name: [] for name in [*steps, *inference]}
    for phase, functions in (("train", steps), ("inference", inference)):
        model.train(phase == "train")
        for repeat in range(args.warmup + args.repeats):
            for name, function in functions.items():
                elapsed = timed(function)
                if repeat >= args.warmup:
                    times[name].append(elapsed)
            print(f"{phase} repeat {repeat + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}

    rows = len(records)
    score_rows_s = rows / median["score"]
    generate_rows_s = rows / median["generate"]
    result = {
        "backbone": args.backbone,
        "dtype": args.dtype,
        "batch_size": rows,
        "train_tokens_per_batch": int(train_batch["attention_mask"].sum()),
        "train_sequence_length": int(train_batch["input_ids"].shape[1]),
        "prompt_length": int(prompt_batch["input_ids"].shape[1]),
        **{f"{name}_step_s": round(median[name], 4) for name in steps},
        "train_step_ratio": round(median["thinkrec_lora"] / median["plain_lm"], 3),
        "train_step_ratio_vs_answer_logits": round(median["thinkrec_lora"] / median["plain_lm_answer_logits"], 3),
        "joint_step_ratio": round(median["thinkrec_joint"] / median["plain_lm"], 3),
        "score_rows_per_s": round(score_rows_s, 2),
        "generate_rows_per_s": round(generate_rows_s, 2),
        "generate_tokens": args.generate_tokens,
        "score_speedup_vs_generate": round(score_rows_s / generate_rows_s, 2),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"ThinkRec overhead on {args.backbone} ({args.dtype}), batch {rows} "
          f"({result['train_tokens_per_batch']} training tokens, prompts of {result['prompt_length']} tokens), "
          f"median of {args.repeats}")
    table = [
        ("train step s, LoRA (baseline: plain LM step)", median["thinkrec_lora"], median["plain_lm"],
         result["train_step_ratio"], "<=1.05"),
        ("train step s, LoRA (baseline: LM, answer logits)", median["thinkrec_lora"], median["plain_lm_answer_logits"],
         result["train_step_ratio_vs_answer_logits"], ""),
        ("train step s, LoRA+projector (baseline: plain LM)", median["thinkrec_joint"], median["plain_lm"],
         result["joint_step_ratio"], ""),
        (f"rows/s, score() (baseline: generate {args.generate_tokens} tokens)", score_rows_s, generate_rows_s,
         result["score_speedup_vs_generate"], ">=10"),
    ]
    print(f"| {'measure':<52} | {'ThinkRec':>10} | {'baseline':>10} | {'ratio':>6} | {'target':<6} |")
    print(f"|{'-' * 54}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 8}|")
    for measure, ours, baseline, ratio, target in table:
        print(f"| {measure:<52} | {ours:>10.4f} | {baseline:>10.4f} | {ratio:>6.3f} | {target:<6} |")
    print(json.dumps({**result, "environment": benchmark_environment()}))


if __name__ == "__main__":
    main()
