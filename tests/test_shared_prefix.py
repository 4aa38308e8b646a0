"""Shared-prefix scoring (prefix_thinkrec.py): the candidates of a user scored from one encoding of
the prompt they share give the scores each prompt gets on its own — for every CF kind, text-only,
LoRA, experts, 4-bit and bf16 backbones, sdpa and eager attention, id slots in the history — and
the grouping shares what can be shared and nothing else."""

import random

import numpy as np
import pytest
import torch
from _tiny_model import NUM_ITEMS, NUM_USERS, TITLES, make_model

from data_collator import build_processor
from experts_thinkrec import ExpertLoraLinear
from prefix_thinkrec import PrefixGroup, chunks, plan_groups, sharing_problem
from thinkrec.experts.clusters import fit_user_clusters, train_user_vectors


EXTRA_TITLES = ["A", "The Long Title Of Something Else Entirely (2001)", "Short (1990)", "Two Words"]


def candidate_records(num_users=3, candidates=5, seed=0, history=4):
    """Rows of a few users, each user's candidates sharing its history (titles of different lengths)."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_users):
        user = rng.randrange(1, NUM_USERS)
        items = rng.sample(range(1, NUM_ITEMS), history)
        for target in rng.sample(range(1, NUM_ITEMS), candidates):
            title = TITLES[target] if rng.random() < 0.6 else rng.choice(EXTRA_TITLES)
            records.append({"UserID": user, "HisItemIDs": items, "HisItemTitles": [TITLES[i] for i in items],
                            "TargetItemID": target, "TargetItemTitle": title})
    rng.shuffle(records)
    return records


def both_ways(model, batch):
    with torch.no_grad():
        per_row = model(**batch).scores
        shared = model(**batch, shared_prefix=True).scores
    return per_row, shared


def processor_for(tokenizer, model, **settings):
    template = "text_only" if model.config.cf_model_type == "none" else "collaborative"
    processor = build_processor(tokenizer, template=template, **settings)
    return processor


@pytest.mark.parametrize("packed_row_tokens", [4096, 30])  # one packed row per group; about one per candidate
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("cf_model_type", ["mf", "lightgcn", "sasrec", "none"])
def test_shared_prefix_scores_equal_per_row_scores(cf_model_type, attention, packed_row_tokens):
    model, tokenizer = make_model(cf_model_type)
    model.language_model.config._attn_implementation = attention
    model.packed_row_tokens = packed_row_tokens
    processor = processor_for(tokenizer, model)
    batch = processor(candidate_records(seed=1))
    per_row, shared = both_ways(model, batch)
    assert per_row.shape == shared.shape == (15,)
    assert per_row.std() > 1e-3  # the rows differ, so equality below is not trivial
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-4)


def test_each_row_scored_alone_gives_the_same_score():
    model, tokenizer = make_model("mf")
    processor = processor_for(tokenizer, model)
    records = candidate_records(num_users=2, candidates=4, seed=2)
    with torch.no_grad():
        alone = torch.cat([model(**processor([record])).scores for record in records])
        shared = model(**processor(records), shared_prefix=True).scores
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-4)


def test_history_id_slots_are_shared_only_between_rows_that_inject_the_same_vectors():
    model, tokenizer = make_model("mf")
    processor = processor_for(tokenizer, model, history_item_slots=True)
    records = candidate_records(seed=3)
    # Same titles, different history ids: the text is equal, the injected vectors are not.
    records.append({**records[0], "HisItemIDs": [i % (NUM_ITEMS - 1) + 1 for i in records[0]["HisItemIDs"]]})
    batch = processor(records)
    per_row, shared = both_ways(model, batch)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-4)


def test_left_padded_and_answer_carrying_batches_score_the_same():
    model, tokenizer = make_model("mf")
    processor = processor_for(tokenizer, model)
    records = [{**record, "label": i % 2, "mode": "rec"} for i, record in enumerate(candidate_records(seed=4))]
    batch = processor(records, include_answers=True)
    assert (batch["labels"] != -100).any()
    with torch.no_grad():
        per_row = model.score(**batch)
        shared = model.score(**batch, shared_prefix=True)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-5)


def with_distinct_experts(cf_model_type):
    model, tokenizer = make_model(cf_model_type)
    users = np.arange(1, NUM_USERS)
    if cf_model_type == "sasrec":
        records = candidate_records(seed=5)
        _, vectors = train_user_vectors(model, {"UserID": [r["UserID"] for r in records],
                                               "HisItemIDs": [r["HisItemIDs"] for r in records]})
    else:
        vectors = model.user_table.weight.detach().numpy()[users]
    clusters = fit_user_clusters(vectors, 2, method="kmeans", seed=0)
    model.add_experts(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids, expert_layers=[0, 1],
                      routing_rule="soft")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertLoraLinear):
                module.lora_B.normal_(0, 0.3, generator=generator)
    return model.eval(), tokenizer


@pytest.mark.parametrize("cf_model_type", ["mf", "sasrec"])
def test_expert_rows_keep_their_own_mixture(cf_model_type):
    model, tokenizer = with_distinct_experts(cf_model_type)
    model.packed_row_tokens = 40  # several packed rows per group: each keeps its group's mixture
    batch = processor_for(tokenizer, model)(candidate_records(seed=6))
    with torch.no_grad():
        per_row = model(**batch).scores
        output = model(**batch, shared_prefix=True)
    torch.testing.assert_close(output.scores, per_row, rtol=0, atol=1e-4)
    torch.testing.assert_close(output.routing_weights, model.route(batch["user_ids"], batch["history_item_ids"]))


def test_cf_scores_come_back_with_shared_prefix_scores():
    model, tokenizer = make_model("mf")
    records = candidate_records(seed=7)
    batch = {**processor_for(tokenizer, model)(records), "item_ids": torch.tensor([r["TargetItemID"] for r in records])}
    with torch.no_grad():
        expected = model(**batch, return_cf_scores=True)
        shared = model(**batch, return_cf_scores=True, shared_prefix=True)
    torch.testing.assert_close(shared.cf_scores, expected.cf_scores)


def test_bf16_backbone_scores_match_within_bf16_rounding():
    model, tokenizer = make_model("mf")
    model = model.to(torch.bfloat16)
    batch = processor_for(tokenizer, model)(candidate_records(seed=8))
    per_row, shared = both_ways(model, batch)
    assert shared.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: batched and single scoring differ by that much too.
    assert (shared - per_row).abs().max() <= 0.03 * per_row.abs().max()
    assert np.corrcoef(shared.numpy(), per_row.numpy())[0, 1] > 0.999


def test_4bit_backbone_scores_equal_per_row_scores(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from modeling_thinkrec import ThinkRecForCausalLM
    from thinkrec.training.backbones import tiny_llama

    _, tokenizer = make_model("mf", lora=False)
    # bitsandbytes' CPU 4-bit kernel works in blocks of 64 inputs: hidden size 128.
    tiny_llama(len(tokenizer) + 2, hidden_size=128, num_attention_heads=4, seed=0).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    from _tiny_model import make_cf_checkpoint

    model = ThinkRecForCausalLM.from_language_model(base, tokenizer, make_cf_checkpoint("mf"))
    model.eval()
    batch = processor_for(tokenizer, model)(candidate_records(seed=9))
    per_row, shared = both_ways(model, batch)
    assert per_row.std() > 1e-4
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-4)


def test_rows_are_grouped_by_their_common_prefix():
    tokens = [[1, 2, 3, 4, 9], [1, 2, 3, 5, 9, 9], [7, 8, 9], [1, 2, 3, 6], [7, 8, 1]]
    def found(keys):
        return {(tuple(sorted(group.rows)), group.prefix_length) for group in plan_groups(tokens, keys)}

    assert found([None] * len(tokens)) == {((0, 1, 3), 3), ((2, 4), 2)}
    # A key that differs keeps rows apart, however much text they share.
    assert found([0, 1, 0, 0, 0]) == {((0, 3), 3), ((1,), 5), ((2, 4), 2)}
    # A row never gives its last token to the prefix: the score is read there.
    assert plan_groups([[1, 2, 3], [1, 2, 3]], [None, None]) == [PrefixGroup((0, 1), 2)]


def test_a_group_is_not_joined_when_sharing_costs_more_than_it_saves():
    long = list(range(100))
    tokens = [long + [1], long + [2], [0, 500, 501]]
    groups = plan_groups(tokens, [None] * 3)
    assert PrefixGroup((0, 1), 100) in groups and PrefixGroup((2,), 2) in groups


def test_backbones_that_take_no_4d_mask_score_per_row_and_say_so():
    model, tokenizer = make_model("mf")
    model.language_model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in sharing_problem(model.language_model.config)
    assert model._sharing_problem is not None
    model.language_model.config._attn_implementation = "sdpa"  # only the check was cached; per-row runs on sdpa
    batch = processor_for(tokenizer, model)(candidate_records(seed=10))
    per_row, shared = both_ways(model, batch)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=0)


def test_shared_prefix_refuses_training_and_embeddings():
    model, tokenizer = make_model("mf")
    batch = processor_for(tokenizer, model)(candidate_records(seed=11))
    model.train()
    with pytest.raises(ValueError, match="computes no loss"):
        model(**batch, shared_prefix=True)
    model.eval()
    with pytest.raises(ValueError, match="no inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32), shared_prefix=True)


def test_trainer_prediction_with_shared_prefixes_gives_per_row_predictions_in_dataset_order(tmp_path):
    import datasets
    from transformers import TrainingArguments

    from data_collator import METRIC_COLUMNS, ThinkRecCollator, tokenize_dataset
    from thinkrec.training.trainer import ThinkRecTrainer, metrics_for, prefix_order

    model, tokenizer = make_model("mf", seed=2)
    records = [{**record, "label": i % 2, "not_cold": 1, "mode": "rec"}
               for i, record in enumerate(candidate_records(num_users=4, candidates=6, seed=12))]
    processor = processor_for(tokenizer, model)
    encoded = tokenize_dataset(datasets.Dataset.from_list(records), processor, keep_columns=METRIC_COLUMNS)
    order = prefix_order(encoded)
    prompts = encoded["prompt_ids"]
    assert [prompts[i] for i in order] == sorted(prompts)
    results = {}
    for shared in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, remove_unused_columns=False,
                                 report_to=[], use_cpu=True, disable_tqdm=True)
        args.shared_prefix_scoring = shared
        trainer = ThinkRecTrainer(model=model, args=args, data_collator=ThinkRecCollator(processor=processor),
                                  compute_metrics=metrics_for(encoded))
        results[shared] = trainer.predict(encoded)
    np.testing.assert_allclose(results[True].predictions, results[False].predictions, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(results[True].label_ids, [record["label"] for record in records])
    assert results[True].metrics["test_auc"] == pytest.approx(results[False].metrics["test_auc"], abs=1e-6)
    assert "test_loss" in results[False].metrics and "test_loss" not in results[True].metrics


def test_the_evaluation_order_is_computed_once_per_dataset(tmp_path, monkeypatch):
    import datasets
    from transformers import TrainingArguments

    import thinkrec.training.trainer as trainer_module
    from data_collator import METRIC_COLUMNS, ThinkRecCollator, tokenize_dataset

    model, tokenizer = make_model("mf")
    records = [{**record, "label": i % 2, "not_cold": 1, "mode": "rec"} for i, record in enumerate(candidate_records(seed=13))]
    processor = processor_for(tokenizer, model)
    encoded = tokenize_dataset(datasets.Dataset.from_list(records), processor, keep_columns=METRIC_COLUMNS)
    calls = []
    order = trainer_module.prefix_order
    monkeypatch.setattr(trainer_module, "prefix_order", lambda dataset: calls.append(1) or order(dataset))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, remove_unused_columns=False,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    args.shared_prefix_scoring = True
    trainer = trainer_module.ThinkRecTrainer(model=model, args=args, data_collator=ThinkRecCollator(processor=processor))
    first = trainer.predict(encoded).predictions
    second = trainer.predict(encoded).predictions
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1


def test_suffixes_are_packed_in_order_into_rows_of_bounded_length():
    assert chunks([10, 10, 10, 30, 5], 25) == [[0, 1], [2], [3], [4]]
    assert chunks([10, 10], 1) == [[0], [1]]
    assert chunks([3, 3, 3], 256) == [[0, 1, 2]]
