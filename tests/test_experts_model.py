"""ThinkRecForCausalLM with user-cluster experts: exact start from the LoRA, per-row routing in
forward, the general expert trained on every row, save / load, and the errors a user can act on."""

import os

import numpy as np
import pytest
import torch
from _tiny_model import CF_DIM, NUM_USERS, make_model, make_records
from transformers import AutoModelForCausalLM

from data_collator import ThinkRecCollator
from experts_thinkrec import ExpertLoraLinear
from modeling_thinkrec import ThinkRecForCausalLM
from thinkrec.experts.clusters import fit_user_clusters, train_user_vectors


def clusters_for(model, num_clusters=2, seed=0):
    users = np.arange(1, NUM_USERS)
    vectors = model.user_table.weight.detach().numpy()[users]
    return fit_user_clusters(vectors, num_clusters, method="kmeans", seed=seed)


def with_experts(cf_model_type="mf", routing_rule="thinkrec", layers=(1,), seed=0):
    model, tokenizer = make_model(cf_model_type, seed=seed)
    if cf_model_type == "sasrec":
        records = make_records(12, seed=3)
        users, vectors = train_user_vectors(model, {"UserID": [r["UserID"] for r in records],
                                                   "HisItemIDs": [r["HisItemIDs"] for r in records]})
        clusters = fit_user_clusters(vectors, 2, method="kmeans", seed=0)
    else:
        clusters = clusters_for(model)
    model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=list(layers),
                      routing_rule=routing_rule)
    return model.eval(), tokenizer


@pytest.mark.parametrize("rule", ["hard", "soft", "thinkrec"])
def test_experts_start_as_the_lora_they_were_copied_from(rule):
    model, tokenizer = make_model("mf")
    batch = ThinkRecCollator(tokenizer)(make_records(6, seed=1))
    expected = model.score(**batch)
    clusters = clusters_for(model)
    model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=[1], routing_rule=rule)
    assert model.config.num_experts == 2 and model.config.expert_layers == [1]
    assert sum(isinstance(m, ExpertLoraLinear) for m in model.modules()) == 2  # q_proj and v_proj of layer 1
    torch.testing.assert_close(model.score(**batch), expected, rtol=0, atol=1e-6)


def test_each_row_is_served_by_its_own_mixture_in_one_batch():
    model, tokenizer = with_experts(routing_rule="hard")
    # Make the experts differ, then check a mixed batch against each row scored alone.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertLoraLinear):
                module.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    records = make_records(6, seed=2)
    collator = ThinkRecCollator(tokenizer)
    together = model.score(**collator(records))
    alone = torch.cat([model.score(**collator([record])) for record in records])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    weights = model.route(collator(records)["user_ids"])
    assert weights.shape == (6, 3) and torch.equal(weights.sum(-1), torch.ones(6))


def test_training_sends_every_row_through_the_general_expert_too():
    model, tokenizer = with_experts(routing_rule="hard")
    trainable = model.set_training_stage("experts")
    assert trainable and all(name.endswith(("lora_A", "lora_B")) and "layers.1." in name for name in trainable)
    model.train()
    batch = ThinkRecCollator(tokenizer)(make_records(4, seed=4, modes=("rec",)))
    output = model(**batch)
    assert output.scores.shape == (4,) and output.bce_loss.shape == (8,)  # routed rows, then general rows
    output.loss.backward()
    layer = next(m for m in model.modules() if isinstance(m, ExpertLoraLinear))
    r = layer.r
    general_grad = layer.lora_B.grad[:, -r:]
    assert general_grad.abs().sum() > 0
    # Without general training the general expert gets no gradient under hard routing.
    model.zero_grad()
    model.config.train_general_expert = False
    model(**batch).loss.backward()
    assert layer.lora_B.grad[:, -r:].abs().sum() == 0


def test_save_and_reload_keep_experts_router_and_scores(tmp_path):
    model, tokenizer = with_experts(routing_rule="soft")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertLoraLinear):
                module.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
    batch = ThinkRecCollator(tokenizer)(make_records(5, seed=6))
    expected = model.score(**batch)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "experts_thinkrec.py" in os.listdir(tmp_path)
    for loaded in (ThinkRecForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.config.routing_rule == "soft" and loaded.has_experts
        torch.testing.assert_close(loaded.router.centroids, model.router.centroids, rtol=0, atol=0)
        torch.testing.assert_close(loaded.score(**batch), expected, rtol=0, atol=1e-6)


def test_generation_routes_rows_like_scoring():
    model, tokenizer = with_experts(routing_rule="hard")
    batch = ThinkRecCollator(tokenizer, include_answers=False)(make_records(3, seed=7))
    tokens = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            user_slot_ids=batch["user_slot_ids"], item_slot_ids=batch["item_slot_ids"],
                            history_item_ids=batch["history_item_ids"], user_ids=batch["user_ids"], max_new_tokens=3)
    assert tokens.shape[0] == 3
    torch.testing.assert_close(model.routing_state.weights, model.route(batch["user_ids"]))


def test_sasrec_rows_are_routed_by_their_history():
    model, tokenizer = with_experts("sasrec", routing_rule="soft")
    batch = ThinkRecCollator(tokenizer)(make_records(4, seed=8))
    weights = model.route(history_item_ids=batch["history_item_ids"])
    assert weights.shape == (4, 3)
    assert model.score(**batch).shape == (4,)


def test_errors_name_what_is_wrong():
    model, tokenizer = make_model("mf", lora=False)
    clusters = clusters_for(model)
    with pytest.raises(ValueError, match="has none: start from a stage-1 or stage-2 folder"):
        model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids)
    text_only, _ = make_model("none")
    with pytest.raises(ValueError, match="CF user vectors"):
        text_only.add_experts(np.zeros(CF_DIM), np.ones(CF_DIM), np.ones((2, CF_DIM)))
    model, tokenizer = with_experts()
    with pytest.raises(ValueError, match="row 1 holds the padding id 0"):
        model.route(torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="outside the CF table"):
        model.route(torch.tensor([1, NUM_USERS]))
    with pytest.raises(ValueError, match="already has 2 experts"):
        model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids)
    with pytest.raises(ValueError, match="cannot make 20 clusters from 10 users"):
        fit_user_clusters(model.user_table.weight.detach().numpy()[1:], 20, method="kmeans", seed=0)
    fresh, _ = make_model("mf")
    with pytest.raises(ValueError, match=r"expert_layers \[5\] outside the LM's 2 decoder layers"):
        fresh.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=[5])
    assert fresh.config.num_experts == 0 and not fresh.has_experts
