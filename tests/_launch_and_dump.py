"""Run run_thinkrec.main under `accelerate launch`, then write this rank's trainable weights so the
test can check that both ranks ended with identical parameters."""

import os
import sys

from safetensors.torch import save_file

import run_thinkrec


captured = {}
original = run_thinkrec.ThinkRecTrainer.train


def train_and_capture(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    captured["model"] = self.accelerator.unwrap_model(self.model)
    return result


run_thinkrec.ThinkRecTrainer.train = train_and_capture
run_thinkrec.main(sys.argv[1:])
model = captured["model"]
weights = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if "lora_" in name}
rank = int(os.environ.get("RANK", "0"))
save_file(weights, os.path.join(os.environ["THINKREC_DUMP_RANK_WEIGHTS"], f"rank{rank}.safetensors"))
