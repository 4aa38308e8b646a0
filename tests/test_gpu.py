"""The CUDA / bfloat16 paths of the model with experts: skipped with a reason without a GPU (CI has none;
they run on the GPU machines some sessions are lent, see the README's GPU section)."""

import pytest
import torch
from _tiny_model import NUM_USERS, make_model, make_records

from data_collator import ThinkRecCollator
from experts_thinkrec import ExpertLoraLinear, RoutingState
from modeling_thinkrec import ThinkRecForCausalLM
from thinkrec.experts.clusters import fit_user_clusters


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def test_expert_layer_in_bfloat16_on_cuda_matches_float32():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).cuda()
    reference = ExpertLoraLinear(base, 3, r=4, lora_alpha=8, state=RoutingState()).cuda()
    with torch.no_grad():
        reference.lora_B.normal_(0, 0.1)
    half = ExpertLoraLinear(torch.nn.Linear(64, 48).cuda().to(torch.bfloat16), 3, r=4, lora_alpha=8, state=RoutingState()).cuda()
    half.base_layer.load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    half.lora_A.data.copy_(reference.lora_A)
    half.lora_B.data.copy_(reference.lora_B)
    weights = torch.softmax(torch.randn(5, 3, device="cuda"), -1)
    reference.state.weights = half.state.weights = weights
    x = torch.randn(5, 7, 64, device="cuda")
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and half.lora_A.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference(x), rtol=2e-2, atol=2e-2)


def test_experts_model_trains_scores_and_reloads_in_bfloat16_on_cuda(tmp_path):
    model, tokenizer = make_model("mf")
    vectors = model.user_table.weight.detach().numpy()[1:NUM_USERS]
    clusters = fit_user_clusters(vectors, 2, method="kmeans", seed=0)
    model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=[1], routing_rule="soft")
    model.save_pretrained(tmp_path / "fp32")
    model = ThinkRecForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).cuda()
    # The adapters, router, projector and CF tables stay float32 under a bfloat16 backbone.
    assert model.router.centroids.dtype == torch.float32 and model.projector.linear_1.weight.dtype == torch.float32
    assert next(m for m in model.modules() if isinstance(m, ExpertLoraLinear)).lora_A.dtype == torch.float32
    model.set_training_stage("experts")
    model.train()
    batch = {k: v.cuda() for k, v in ThinkRecCollator(tokenizer)(make_records(4, seed=1)).items()}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    scores = model.score(**batch)
    model.save_pretrained(tmp_path / "bf16")
    reloaded = ThinkRecForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).cuda().eval()
    torch.testing.assert_close(reloaded.score(**batch), scores, rtol=0, atol=1e-3)
    prompts = {k: v.cuda() for k, v in ThinkRecCollator(tokenizer, include_answers=False)(make_records(3, seed=2)).items()}
    tokens = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                            user_slot_ids=prompts["user_slot_ids"], item_slot_ids=prompts["item_slot_ids"],
                            history_item_ids=prompts["history_item_ids"], user_ids=prompts["user_ids"], max_new_tokens=4)
    assert tokens.shape[0] == 3 and tokens.device.type == "cuda"


def test_run_thinkrec_in_bfloat16_on_cuda_scores_and_writes_reasons_that_start_with_the_scores_verdict(tmp_path):
    """The whole predict path on the GPU in bf16: tokenised rows with keywords after every title, scores,
    and generated reasons whose verdict is the score's."""
    import json

    import pandas as pd
    from _run_fixtures import write_backbone, write_records

    import run_thinkrec
    from thinkrec.data.keywords import save_item_keywords
    from thinkrec.data.records import load_items

    write_records(tmp_path / "records")
    write_backbone(tmp_path / "backbone")
    items = load_items(tmp_path / "records")
    save_item_keywords(tmp_path / "records", {int(i): [f"kw{i}", "film"] for i in items["ItemID"]}, {"method": "test"})
    args = {"records_dir": str(tmp_path / "records"), "output_dir": str(tmp_path / "out"), "model_name_or_path": str(tmp_path / "backbone"),
            "stage": "lora", "dtype": "bfloat16", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "max_steps": 2,
            "learning_rate": 1e-3, "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "do_train": True,
            "do_predict": True, "generate_reasons_for": 6, "max_new_tokens": 4, "title_keywords": 2, "seed": 1}
    (tmp_path / "args.json").write_text(json.dumps(args))
    results = run_thinkrec.main([str(tmp_path / "args.json")])
    assert results["test"]["verdict_agrees_with_score"] == 1.0
    predictions = pd.read_parquet(tmp_path / "out" / "test_predictions.parquet")
    generated = predictions[predictions["generated"].notna()]
    assert len(generated) == 6 and ((generated["score"] >= 0.5) == generated["generated"].str.startswith("Yes.")).all()
