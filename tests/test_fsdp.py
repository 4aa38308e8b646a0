"""ThinkRec under FSDP2 on two gloo CPU ranks.

accelerate runs an FSDP config on CPU ranks as plain DDP (its state only turns FSDP on for GPU-type
launches), so the FSDP path cannot go through `accelerate launch` here. This test shards the model with
torch's own `fully_shard` — what accelerate's FSDP2 config does, layer by layer and then the whole model —
and checks that every step predict runs outside Trainer's loop gives, sharded over two ranks, what the
same model gives unsharded."""

import json
import os
import subprocess
import sys

import numpy as np
from _tiny_model import REPO_ROOT


def test_sharded_predict_scores_routes_and_generates_like_the_unsharded_model(tmp_path):
    output = tmp_path / "fsdp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(REPO_ROOT, "tests", "_fsdp_predict.py"), str(output)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    reference, sharded = result["reference"], result["sharded"]
    # Sharded for real: each rank holds half of the item table (so no rank can score the CF model alone
    # from its own copy of the tables, as predict used to on rank 0).
    assert sharded["local_item_table_rows"] < sharded["item_table_rows"]
    assert len(sharded["forward"]) == len(reference["forward"]) == 5
    for (score, cf_score, weights), (ref_score, ref_cf_score, ref_weights) in zip(sharded["forward"], reference["forward"]):
        np.testing.assert_allclose([score, cf_score], [ref_score, ref_cf_score], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    # Three rows over two ranks: rank 1 pads its share and drops the padding's result.
    assert sharded["reasons"] == reference["reasons"] and len(reference["reasons"]) == 3
