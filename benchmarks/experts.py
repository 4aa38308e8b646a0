#!/usr/bin/env python
"""Expert mixture throughput and exactness: the batched per-row mixture of user-cluster LoRA experts
(experts_thinkrec.ExpertLoraLinear) against the published procedure and against one plain LoRA.

    python benchmarks/experts.py                      # --preset cpu: SmolLM2-135M shape, float32
    python benchmarks/experts.py --preset gpu         # Llama-3-8B shape, bfloat16, on CUDA

Speed does not depend on the weights, so the backbone is random-initialised from the architecture
(no download). All three ways score the same prompts (forward of the LM, last position only) with
LoRA r=8 on q_proj/v_proj; experts in the last 8 layers, G clusters + 1 general expert:

- mixture: one batched forward per batch; each row weighted by its own routing weights (soft).
- published_merge: per batch of 2 rows, `add_weighted_adapter(combination_type="linear")` with the
  first row's weights, score, delete (ThinkRec's evaluation; routing per batch, batch size 2).
- single_lora: one plain PEFT LoRA, same batch size as the mixture (the cost floor).

Exactness: max |mixed layer output - hand-computed sum_g w_g B_g A_g x * scaling| on random rows,
in float32. Prints a table; the last line is one JSON object (quality: see the README; the ML-1M
quality comparison is a separate run of run_thinkrec.py presets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from transformers import AutoModelForCausalLM, LlamaConfig

from experts_thinkrec import ExpertLoraLinear, RoutingState, inject_experts
from thinkrec.utils.environment import benchmark_environment


PRESETS = {
    # SmolLM2-135M-Instruct's architecture.
    "cpu": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "dtype": "float32", "batch_size": 8, "seq_len": 128,
            "batches": 3},
    # Llama-3-8B's architecture.
    "gpu": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "dtype": "bfloat16", "batch_size": 16, "seq_len": 256,
            "batches": 8},
}
TARGETS = ["q_proj", "v_proj"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--num_clusters", type=int, default=5, help="G cluster experts (+1 general).")
    parser.add_argument("--expert_layers", type=int, default=8, help="Last N layers hold the experts.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per way (median reported).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def backbone(preset: dict, device: torch.device):
    """A random-initialised causal LM of the preset's architecture, built directly on `device`."""
    config = LlamaConfig(**{k: preset[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size")})
    dtype = getattr(torch, preset["dtype"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def randomise_lora(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype))


def timed(step, batches, repeats, device) -> float:
    """Median seconds of running `step(i)` over every batch index, after one warm-up pass."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for index in range(min(2, batches)):
        step(index)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(batches):
            step(index)
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def exactness(device: torch.device, num_experts: int, seed: int) -> float:
    """Max abs error of the mixed layer against the hand-computed per-row sum, float32."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(64, 48).to(device)
    layer = ExpertLoraLinear(base, num_experts, r=8, lora_alpha=16, state=RoutingState()).to(device)
    pairs = []
    for g in range(num_experts):
        a, b = torch.randn(8, 64, generator=generator), torch.randn(48, 8, generator=generator)
        layer.set_expert(g, a, b)
        pairs.append((a.to(device), b.to(device)))
    x = torch.randn(6, 5, 64, generator=generator).to(device)
    weights = torch.softmax(torch.randn(6, num_experts, generator=generator), -1).to(device)
    layer.state.weights = weights
    with torch.no_grad():
        mixed = layer(x)
        expected = base(x) + sum(weights[:, g, None, None] * (x @ a.t() @ b.t()) * layer.scaling for g, (a, b) in enumerate(pairs))
    return float((mixed - expected).abs().max())


def main():
    args = parse_args()
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    num_experts = args.num_clusters + 1
    batch_size, seq_len, batches = preset["batch_size"], preset["seq_len"], preset["batches"]
    rows = batch_size * batches
    input_ids = torch.randint(0, preset["vocab_size"], (rows, seq_len), generator=generator).to(device)
    row_weights = torch.softmax(torch.randn(rows, num_experts, generator=generator) / 0.1, -1).to(device)
    num_layers = preset["num_hidden_layers"]
    layers = list(range(num_layers - args.expert_layers, num_layers))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    results = {}

    model = backbone(preset, device)
    # One plain LoRA on every layer (as stage 1 leaves it): the cost floor.
    inject_adapter_in_model(lora, model)
    model.to(device)
    randomise_lora(model, generator)

    def plain(index):
        with torch.no_grad():
            model(input_ids=input_ids[index * batch_size:(index + 1) * batch_size], logits_to_keep=1)

    results["single_lora"] = rows / timed(plain, batches, args.repeats, device)

    # The mixture: the last layers' LoRA become G + 1 experts, each row weighted by its own routing.
    state = inject_experts(model, num_experts, layers)
    randomise_lora(model, generator)

    def mixture(index):
        state.weights = row_weights[index * batch_size:(index + 1) * batch_size]
        with torch.no_grad():
            model(input_ids=input_ids[index * batch_size:(index + 1) * batch_size], logits_to_keep=1)

    results["mixture"] = rows / timed(mixture, batches, args.repeats, device)
    model = state = None  # frees the first backbone (the closures above hold only these names)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Published: one PEFT adapter per expert (last layers only), merged per batch of 2 for its first row.
    base = backbone(preset, device)
    expert_lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, layers_to_transform=layers)
    peft_model = get_peft_model(base, expert_lora, adapter_name="expert0")
    for g in range(1, num_experts):
        peft_model.add_adapter(f"expert{g}", expert_lora)
    peft_model.to(device)
    randomise_lora(peft_model, generator)
    names = [f"expert{g}" for g in range(num_experts)]
    pair_batches = rows // 2

    def published(index):
        weights = row_weights[index * 2].tolist()
        peft_model.add_weighted_adapter(names, weights, "mixed", combination_type="linear")
        peft_model.set_adapter("mixed")
        with torch.no_grad():
            peft_model(input_ids=input_ids[index * 2:index * 2 + 2], logits_to_keep=1)
        peft_model.set_adapter("expert0")
        peft_model.delete_adapter("mixed")

    results["published_merge"] = rows / timed(published, pair_batches, 1, device)

    error = exactness(device, num_experts, args.seed)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"expert mixture throughput — preset {args.preset} ({preset['dtype']}, {num_layers} layers, hidden "
          f"{preset['hidden_size']}), {rows} rows of {seq_len} tokens, G={args.num_clusters}+1 experts in the last "
          f"{args.expert_layers} layers, on {device_name}")
    print(f"{'way':<18}{'rows/s':>10}{'vs mixture':>12}")
    for name in ("mixture", "published_merge", "single_lora"):
        print(f"{name:<18}{results[name]:>10.2f}{results[name] / results['mixture']:>12.3f}")
    print(f"mixture / published_merge = {results['mixture'] / results['published_merge']:.2f}x (target >= 5x); "
          f"single_lora / mixture cost ratio = {results['single_lora'] / results['mixture']:.3f} (target <= 1.3)")
    print(f"max abs error of the mixed layer vs the hand-computed sum: {error:.2e}")
    print(json.dumps({
        "environment": benchmark_environment(),
        "preset": args.preset,
        "device": device_name,
        "rows_per_second": {name: round(value, 3) for name, value in results.items()},
        "speedup_vs_published": round(results["mixture"] / results["published_merge"], 3),
        "cost_vs_single_lora": round(results["single_lora"] / results["mixture"], 3),
        "max_abs_error": error,
        "quality": None,
    }))


if __name__ == "__main__":
    main()
