"""Run by test_fsdp.py on two gloo CPU ranks (torch.distributed.run): a tiny ThinkRec model with user-cluster
experts is sharded with FSDP2 the way accelerate's FSDP config does it (`fully_shard` on every decoder
layer, then on the whole model), and the predict steps that run the model outside Trainer's loop —
scores, the CF model's own scores, routing weights and generated reasons — run on both ranks through
`map_over_ranks`. Rank 0 writes what the sharded model gave next to what the same model gave unsharded,
computed before sharding in the same process. The tests' helpers import as in the tests: Python puts this
script's folder, tests/, first on sys.path, as pytest does for the test modules."""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from _tiny_model import make_records
from test_experts_model import with_experts
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import run_thinkrec
from data_collator import build_processor
from thinkrec.utils.distributed import map_over_ranks


def main(output_path: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model, tokenizer = with_experts("mf")
    processor = build_processor(tokenizer)
    records = make_records(5, seed=4, modes=("rec",))
    for index, record in enumerate(records):
        record["UserID"] = 1 + index % 10

    def forward_outputs(rows: list[dict]) -> list[tuple]:
        results = []
        for start in range(0, len(rows), 2):  # the same number of forwards on every rank
            part = rows[start : start + 2]
            item_ids = torch.tensor([row["TargetItemID"] for row in part])
            with torch.no_grad():
                out = model(**processor(part), item_ids=item_ids, return_cf_scores=True)
            results += list(zip(out.scores.tolist(), out.cf_scores.tolist(), out.routing_weights.tolist()))
        return results

    def reasons(rows: list[dict]) -> list[str]:
        return run_thinkrec.generate_reasons(model, processor, rows, np.zeros(len(rows)), 0.5, max_new_tokens=6, batch_size=2)

    reference = {"forward": forward_outputs(records), "reasons": reasons(records[:3])}
    table_rows = model.item_table.weight.shape[0]

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.language_model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # What one rank holds of the item table once sharded: why reading `item_table.weight` on rank 0 is wrong.
    local_rows = model.item_table.weight.to_local().shape[0]
    sharded = {
        "forward": map_over_ranks(forward_outputs, records),
        "reasons": map_over_ranks(reasons, records[:3]),
        "local_item_table_rows": local_rows,
        "item_table_rows": table_rows,
    }
    if dist.get_rank() == 0:
        with open(output_path, "w", encoding="utf-8") as handle:
            json.dump({"reference": reference, "sharded": sharded}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
