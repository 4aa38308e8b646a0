"""User-cluster LoRA experts: the exact per-row mixture layer, injection into a tiny Llama, the
router's rules, and the user clustering."""

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from sklearn.metrics import adjusted_rand_score
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from experts_thinkrec import ROUTING_RULES, ExpertLoraLinear, UserRouter, inject_experts
from thinkrec.experts.clusters import fit_user_clusters


IN, OUT, R, ALPHA, E, BATCH, SEQ = 6, 5, 2, 4.0, 3, 4, 3


def random_expert_layer(seed=0):
    """An expert layer with distinct random A/B per expert, no dropout."""
    torch.manual_seed(seed)
    layer = ExpertLoraLinear(nn.Linear(IN, OUT), E, R, ALPHA, lora_dropout=0.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer


def random_row_weights(batch=BATCH, experts=E):
    return torch.softmax(torch.randn(batch, experts), dim=-1)


def hand_mixture(layer, x, weights):
    """Σ_g w[row, g] · B_g A_g x · scaling + base, one row and one expert at a time."""
    out = layer.base_layer(x).clone()
    for row in range(x.shape[0]):
        for g in range(layer.num_experts):
            a, b = layer.expert(g)
            out[row] += weights[row, g] * layer.scaling * (x[row] @ a.t() @ b.t())
    return out


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.lin(x)


# --- the expert layer ------------------------------------------------------------------------


def test_mixture_equals_hand_computed_sum():
    layer = random_expert_layer()
    x = torch.randn(BATCH, SEQ, IN)
    weights = random_row_weights()
    layer.state.weights = weights
    with torch.no_grad():
        got = layer(x)
        expected = hand_mixture(layer, x, weights)
    assert (got - expected).abs().max().item() < 1e-5


def test_one_row_equals_peft_cat_merge_and_not_linear_merge():
    torch.manual_seed(1)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=False)
    peft_model = get_peft_model(TinyNet(), config, adapter_name="e0")
    for g in range(1, E):
        peft_model.add_adapter(f"e{g}", config)
    lora = peft_model.base_model.model.lin
    layer = ExpertLoraLinear(lora.get_base_layer(), E, R, ALPHA)
    for g in range(E):
        layer.set_expert(g, lora.lora_A[f"e{g}"].weight, lora.lora_B[f"e{g}"].weight)
    weights = [0.5, 0.3, 0.2]
    adapters = [f"e{g}" for g in range(E)]
    x = torch.randn(1, SEQ, IN)
    layer.state.weights = torch.tensor([weights])
    with torch.no_grad():
        mixed = layer(x)
        peft_model.add_weighted_adapter(adapters, weights, "cat_mix", combination_type="cat")
        peft_model.set_adapter("cat_mix")
        cat = peft_model(x)
        # "linear" (what the published code used) scales A's and B's separately and multiplies the
        # sums, so B'A' carries cross terms B_i A_j: not the weighted sum of the experts' updates.
        peft_model.add_weighted_adapter(adapters, weights, "linear_mix", combination_type="linear")
        peft_model.set_adapter("linear_mix")
        linear = peft_model(x)
    assert (mixed - cat).abs().max().item() < 1e-5
    assert (mixed - linear).abs().max().item() > 1e-2


def test_one_hot_weights_equal_that_expert_alone():
    layer = random_expert_layer(2)
    x = torch.randn(E, SEQ, IN)
    layer.state.weights = torch.eye(E)  # row g -> expert g
    with torch.no_grad():
        got = layer(x)
        for g in range(E):
            a, b = layer.expert(g)
            alone = layer.base_layer(x[g]) + layer.scaling * (x[g] @ a.t() @ b.t())
            assert (got[g] - alone).abs().max().item() < 1e-5


def test_init_from_peft_lora_reproduces_the_lora_for_weights_summing_to_one():
    torch.manual_seed(3)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=False)
    lora = inject_adapter_in_model(config, TinyNet()).lin
    layer = ExpertLoraLinear.from_peft_lora(lora, E)
    x = torch.randn(BATCH, SEQ, IN)
    # Any weights summing to 1 per row, including signed ones.
    for weights in (random_row_weights(), torch.eye(E)[[0, 1, 2, 0]], torch.tensor([[2.0, -1.5, 0.5]] * BATCH)):
        layer.state.weights = weights
        with torch.no_grad():
            assert (layer(x) - lora(x)).abs().max().item() < 1e-5
    assert layer.scaling == lora.scaling["default"]


def test_missing_or_misshaped_weights_raise():
    layer = random_expert_layer()
    x = torch.randn(BATCH, SEQ, IN)
    with pytest.raises(ValueError, match="without routing weights"):
        layer(x)
    layer.state.weights = torch.ones(BATCH, E + 1)
    with pytest.raises(ValueError, match=r"shape \(4, 4\), expected .*\(4, 3\)"):
        layer(x)


def test_bf16_input_keeps_output_dtype_and_float32_adapters():
    layer = random_expert_layer()
    layer.base_layer.to(torch.bfloat16)
    layer.state.weights = random_row_weights()
    out = layer(torch.randn(BATCH, SEQ, IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32


def expert_grads(layer):
    """Per expert: does A_g or B_g have a nonzero gradient?"""
    touched = []
    for g in range(layer.num_experts):
        rows = slice(g * layer.r, (g + 1) * layer.r)
        touched.append(bool(layer.lora_A.grad[rows].any() or layer.lora_B.grad[:, rows].any()))
    return touched


def test_gradient_reaches_only_the_routed_experts():
    router = UserRouter(num_clusters=E - 1, dim=3)  # E - 1 clusters + the general expert
    router.set_clusters(np.zeros(3), np.ones(3), np.eye(3)[:2])
    cases = {
        "hard": (torch.tensor([[0.0, 2.0, 0.1]]), [False, True, False]),
        # Equally close to both centroids: the entropy rule sends the row to the general expert.
        "thinkrec": (torch.tensor([[1.0, 1.0, 0.0]]), [False, False, True]),
        "soft": (torch.tensor([[1.0, 0.6, 0.0]]), [True, True, False]),
    }
    for rule, (user, expected) in cases.items():
        layer = random_expert_layer(4)
        layer.state.weights = router(user, rule)
        layer(torch.randn(1, SEQ, IN)).sum().backward()
        assert expert_grads(layer) == expected, rule
    # A mixed batch: each row's gradient reaches its own expert and no other.
    layer = random_expert_layer(5)
    layer.state.weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = layer(torch.randn(2, SEQ, IN))
    out[1].sum().backward()
    assert expert_grads(layer) == [False, False, True]


# --- injection into a tiny Llama --------------------------------------------------------------


def tiny_lora_llama(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    # init_lora_weights=False: random B too, so "logits unchanged" is not trivially true.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return inject_adapter_in_model(lora, model)


def test_inject_experts_in_last_layers_of_tiny_llama(tmp_path):
    model = tiny_lora_llama(0)
    input_ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        lora_logits = model(input_ids=input_ids).logits
    state = inject_experts(model, E, layer_indices=[2, 3])
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            assert isinstance(proj, ExpertLoraLinear if i >= 2 else LoraLayer)
            if i >= 2:
                assert proj.state is state
    state.weights = random_row_weights(3)
    with torch.no_grad():
        expert_logits = model(input_ids=input_ids).logits
    assert (expert_logits - lora_logits).abs().max().item() < 1e-5

    # Make the experts differ, then check the state_dict carries them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertLoraLinear):
                module.lora_B.add_(0.1 * torch.randn_like(module.lora_B))
        trained_logits = model(input_ids=input_ids).logits
    assert (trained_logits - lora_logits).abs().max().item() > 1e-4
    path = tmp_path / "experts.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = tiny_lora_llama(1)
    inject_experts(fresh, E, layer_indices=[2, 3], state=state)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=input_ids).logits, trained_logits)


def test_inject_experts_errors():
    with pytest.raises(ValueError, match="no PEFT LoRA layers.*folder with a LoRA adapter"):
        inject_experts(LlamaForCausalLM(LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )), E)
    model = tiny_lora_llama(0)
    with pytest.raises(ValueError, match=r"\[4\] out of range .* 4 decoder layers"):
        inject_experts(model, E, layer_indices=[3, 4])
    # Negative indices count from the end, as in "the last 2 layers".
    inject_experts(model, E, layer_indices=[-2, -1])
    assert isinstance(model.model.layers[3].self_attn.q_proj, ExpertLoraLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, LoraLayer)


# --- routing ----------------------------------------------------------------------------------


def three_cluster_router():
    """Centroids e1, e2, e3 in a standardised space with a non-trivial scaler."""
    router = UserRouter(num_clusters=3, dim=3)
    router.set_clusters([1.0, -1.0, 2.0], [2.0, 0.5, 4.0], np.eye(3))
    return router


def raw(router, z):
    """Raw user vectors whose standardised form is `z`."""
    return torch.tensor(z, dtype=torch.float32) * router.scaler_scale + router.scaler_mean


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_router_hard_and_soft_by_hand():
    router = three_cluster_router()
    users = raw(router, [[0.1, 3.0, 0.2], [1.0, 1.0, 0.0]])
    assert router(users, "hard").tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    soft = router(users, "soft", temperature=0.5)
    # Row 2: cos = (1/√2, 1/√2, 0); T = 0.5.
    c = 1 / math.sqrt(2)
    assert soft[1].tolist() == pytest.approx(softmax([c / 0.5, c / 0.5, 0.0]) + [0.0], abs=1e-6)
    assert soft.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert soft[:, 3].tolist() == [0.0, 0.0]


def test_router_thinkrec_thresholds_by_hand():
    router = three_cluster_router()
    # G = 3: a cluster alone when max w > 0.5 + 0.6/3 = 0.7; general when entropy >= 0.95·ln 3.
    users = raw(router, [[0.0, 0.0, 5.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = router(users, "thinkrec", temperature=0.1)
    # Row 1: cos = (0, 0, 1) -> softmax((0, 0, 10)) has max 0.9999 > 0.7 -> cluster 2 alone.
    assert w[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    # Row 2: equal cosines -> uniform w, entropy ln 3 >= 0.95·ln 3 -> the general expert alone.
    assert w[1].tolist() == [0.0, 0.0, 0.0, 1.0]
    # Row 3: w ≈ (0.4996, 0.4996, 0.0008): max < 0.7, entropy ≈ ln 2 < 0.95·ln 3 -> mixture on clusters.
    c = 1 / math.sqrt(2)
    expected = softmax([c / 0.1, c / 0.1, 0.0])
    assert max(expected) < 0.7
    assert -sum(p * math.log(p) for p in expected) < 0.95 * math.log(3)
    assert w[2].tolist() == pytest.approx(expected + [0.0], abs=1e-6)


def test_router_rejects_bad_input():
    router = three_cluster_router()
    assert ROUTING_RULES == ("hard", "soft", "thinkrec")
    with pytest.raises(ValueError, match="unknown routing rule 'sharp'"):
        router(torch.zeros(1, 3), "sharp")
    with pytest.raises(ValueError, match=r"expected \(batch, 3\)"):
        router(torch.zeros(1, 4), "hard")
    with pytest.raises(ValueError, match="no centroids"):
        UserRouter(2, 3)(torch.zeros(1, 3), "hard")
    with pytest.raises(ValueError, match=r"centroids has shape \(2, 3\), expected \(3, 3\)"):
        router.set_clusters(np.zeros(3), np.ones(3), np.ones((2, 3)))


def test_router_buffers_are_saved():
    router = three_cluster_router()
    assert set(router.state_dict()) == {"scaler_mean", "scaler_scale", "centroids"}
    copy = UserRouter(3, 3)
    copy.load_state_dict(router.state_dict())
    users = torch.randn(5, 3)
    assert torch.equal(copy(users, "thinkrec"), router(users, "thinkrec"))


# --- clustering -------------------------------------------------------------------------------


def blobs(seed=0, per_blob=40, dim=6):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=20.0, size=(3, dim))
    labels = np.repeat(np.arange(3), per_blob)
    return centers[labels] + rng.normal(scale=0.5, size=(labels.size, dim)), labels


@pytest.mark.parametrize("method", ["kmeans", "ward"])
def test_clustering_recovers_separated_blobs(method):
    vectors, truth = blobs()
    clusters = fit_user_clusters(vectors, 3, method=method, seed=0)
    assert adjusted_rand_score(truth, clusters.labels) == 1.0
    assert clusters.sizes.tolist() == [40, 40, 40] and clusters.num_clusters == 3
    assert clusters.silhouette > 0.8
    # Routing the training users with the stored scaler and centroids gives back their clusters.
    router = UserRouter(3, vectors.shape[1])
    router.set_clusters(clusters.scaler_mean, clusters.scaler_scale, clusters.centroids)
    hard = router(torch.tensor(vectors, dtype=torch.float32), "hard")
    assert hard[:, :3].argmax(-1).numpy().tolist() == clusters.labels.tolist()


@pytest.mark.parametrize("method", ["kmeans", "ward"])
def test_silhouette_chooses_three_clusters(method):
    clusters = fit_user_clusters(blobs(1)[0], None, method=method, seed=0, max_clusters=6)
    assert clusters.num_clusters == 3
    assert max(clusters.silhouette_by_k, key=clusters.silhouette_by_k.get) == 3
    summary = clusters.summary()
    assert summary["num_clusters"] == 3 and summary["method"] == method
    assert summary["users_per_cluster"] == [40, 40, 40] and set(summary["silhouette_by_k"]) == {"2", "3", "4", "5", "6"}


def test_clustering_errors_name_the_problem():
    vectors, _ = blobs()
    with pytest.raises(ValueError, match=r"6 clusters from 5 users"):
        fit_user_clusters(vectors[:5], 6, method="kmeans", seed=0)
    bad = vectors.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"row 7 "):
        fit_user_clusters(bad, 3, method="ward", seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_user_clusters(vectors, 1, method="ward", seed=0)
    with pytest.raises(ValueError, match="unknown clustering method 'dbscan'"):
        fit_user_clusters(vectors, 3, method="dbscan", seed=0)
