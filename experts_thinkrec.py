"""User-cluster LoRA experts mixed exactly per row, and the router that weights them.

Part of the model's remote-code payload (saved next to `modeling_thinkrec.py`), so it imports only
torch, peft, the standard library and its sibling `configuration_thinkrec.py`.

The G cluster experts plus the general expert (E = G + 1 in all) of one adapted linear layer are
stored as ONE rank-E·r LoRA; each row's routing weights scale the expert slices between A and B
(as iLoRA does), which gives exactly `Σ_g w[row, g] · B_g A_g x · scaling` for every row of a mixed
batch in one batched pass.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F


# Imported as a checkpoint's remote code (a package) or as a top-level module of the repository; only
# the second kind of failure falls back, so a real import error surfaces as itself.
try:
    from .configuration_thinkrec import ROUTING_RULES
except ImportError:
    if __package__:
        raise
    from configuration_thinkrec import ROUTING_RULES

# Decoder layer index inside names such as `model.layers.3.self_attn.q_proj`.
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class RoutingState:
    """Per-row expert weights [batch, E], shared by every expert layer of one model.

    The model sets `.weights` before the LM forward; the layers only read it.
    """

    def __init__(self, weights: torch.Tensor | None = None):
        self.weights = weights

    def clear(self) -> None:
        """Forget the weights so that a forward without routing fails loudly instead of reusing them."""
        self.weights = None


class ExpertLoraLinear(nn.Module):
    """A linear layer plus E LoRA experts stored as one rank-E·r LoRA, mixed per row by `state.weights`."""

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        state: RoutingState | None = None,
    ):
        super().__init__()
        if num_experts < 1 or r < 1:
            raise ValueError(f"ExpertLoraLinear needs num_experts >= 1 and r >= 1, found {num_experts} and {r}")
        self.base_layer = base_layer
        self.num_experts = int(num_experts)
        self.r = int(r)
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.scaling = float(lora_alpha) / self.r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # A plain attribute, not a submodule: it holds no parameters and is shared by every layer.
        self.state = state if state is not None else RoutingState()
        device = _module_device(base_layer)
        rank = self.num_experts * self.r
        # Kept in float32 whatever the base dtype (as PEFT does for adapters on a quantised base).
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        # PEFT's default LoRA init (A random, B zero): a fresh layer adds nothing to the base output.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_peft_lora(
        cls,
        lora_linear: nn.Module,
        num_experts: int,
        state: RoutingState | None = None,
        adapter_name: str = "default",
    ) -> "ExpertLoraLinear":
        """Build from a PEFT LoRA linear layer, every expert a copy of its adapter `adapter_name`."""
        if not isinstance(lora_linear, LoraLayer) or adapter_name not in lora_linear.lora_A:
            raise ValueError(
                f"expected a PEFT LoRA linear layer with an adapter named {adapter_name!r}, "
                f"found {type(lora_linear).__name__}"
            )
        if getattr(lora_linear, "merged", False):
            raise ValueError("the PEFT LoRA layer has its adapter merged into the base weights; unmerge it first")
        if adapter_name in getattr(lora_linear, "lora_variant", {}):
            raise ValueError(
                f"the PEFT LoRA layer uses a LoRA variant ({type(lora_linear.lora_variant[adapter_name]).__name__},"
                " e.g. DoRA); expert layers support plain LoRA only"
            )
        if getattr(lora_linear, "lora_bias", {}).get(adapter_name, False):
            raise ValueError("the PEFT LoRA layer has lora_bias=True; expert layers support plain LoRA only")
        a = lora_linear.lora_A[adapter_name].weight.detach()
        b = lora_linear.lora_B[adapter_name].weight.detach()
        r = a.shape[0]
        layer = cls(lora_linear.get_base_layer(), num_experts, r, lora_alpha=r, state=state)
        # Scaling taken as is, so rank-stabilised or pattern-specific alphas carry over unchanged.
        layer.scaling = float(lora_linear.scaling[adapter_name])
        layer.lora_dropout = copy.deepcopy(lora_linear.lora_dropout[adapter_name])
        with torch.no_grad():
            layer.lora_A.copy_(a.float().repeat(num_experts, 1))
            layer.lora_B.copy_(b.float().repeat(1, num_experts))
        return layer

    def expert(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `index`'s (A_g [r, in], B_g [out, r]), as views of the stacked parameters."""
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        rows = slice(index * self.r, (index + 1) * self.r)
        return self.lora_A[rows], self.lora_B[:, rows]

    def set_expert(self, index: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Overwrite expert `index` with the given A [r, in] and B [out, r]."""
        a, b = self.expert(index)
        with torch.no_grad():
            a.copy_(lora_A)
            b.copy_(lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base_layer(x) + scaling · Σ_g w[row, g] · B_g A_g dropout(x), for every row at once."""
        result = self.base_layer(x, *args, **kwargs)
        weights = self._checked_weights(x)
        # float32 LoRA path as PEFT does, so bf16/4-bit bases keep full-precision adapters.
        h = self.lora_dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()  # [batch, ..., E*r]
        h = h.view(*h.shape[:-1], self.num_experts, self.r)
        # Row weights broadcast over every middle dim (sequence) and over each expert's rank slice.
        w = weights.to(device=h.device, dtype=h.dtype)
        w = w.reshape(w.shape[0], *([1] * (h.dim() - 3)), self.num_experts, 1)
        delta = (h * w).flatten(-2) @ self.lora_B.t()
        return result + (delta * self.scaling).to(result.dtype)

    def _checked_weights(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.state.weights
        if weights is None:
            raise ValueError(
                "expert layer called without routing weights: set state.weights to a "
                f"[batch, {self.num_experts}] tensor before the forward"
            )
        expected = (x.shape[0], self.num_experts)
        if tuple(weights.shape) != expected:
            raise ValueError(
                f"routing weights have shape {tuple(weights.shape)}, expected (batch, experts) = {expected} "
                f"for an input of shape {tuple(x.shape)}"
            )
        return weights

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"r={self.r}, scaling={self.scaling}"
        )


def _one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """`F.one_hot` without its range check, which reads the indices back to the host (they come from argmax)."""
    return (index[:, None] == torch.arange(num_classes, device=index.device)).to(dtype)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _is_peft_lora_linear(module: nn.Module, adapter_name: str) -> bool:
    return (
        isinstance(module, LoraLayer)
        and adapter_name in module.lora_A
        and isinstance(module.lora_A[adapter_name], nn.Linear)
    )


def _num_decoder_layers(language_model: nn.Module) -> int:
    config = getattr(language_model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if count is not None:
        return int(count)
    names = (name + "." for name, _ in language_model.named_modules())
    indices = [int(m.group(1)) for m in map(_LAYER_INDEX.search, names) if m]
    return max(indices) + 1 if indices else 0


def inject_experts(
    language_model: nn.Module,
    num_experts: int,
    layer_indices: list[int] | tuple[int, ...] | None = None,
    state: RoutingState | None = None,
    adapter_name: str = "default",
) -> RoutingState:
    """Replace the PEFT LoRA linears of the given decoder layers (None = all) by expert layers.

    `num_experts` counts every expert, the general one included (G clusters + 1). Negative indices
    count from the last layer (-8..-1 = the last 8 layers). Returns the routing state the new layers
    share; set its `.weights` before each forward.
    """
    state = state if state is not None else RoutingState()
    lora_layers = [(name, m) for name, m in language_model.named_modules() if _is_peft_lora_linear(m, adapter_name)]
    if not lora_layers:
        already = any(isinstance(m, ExpertLoraLinear) for m in language_model.modules())
        raise ValueError(
            "the language model already has expert layers; inject experts only once"
            if already
            else "the language model has no PEFT LoRA layers: "
            "start the experts stage from a folder with a LoRA adapter"
        )
    selected = None
    if layer_indices is not None:
        num_layers = _num_decoder_layers(language_model)
        bad = [i for i in layer_indices if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for a model with {num_layers} decoder layers")
        selected = {i % num_layers for i in layer_indices}
    replaced = 0
    for name, module in lora_layers:
        if selected is not None:
            match = _LAYER_INDEX.search(name + ".")
            if match is None or int(match.group(1)) not in selected:
                continue
        parent_name, _, child_name = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, child_name, ExpertLoraLinear.from_peft_lora(module, num_experts, state, adapter_name))
        replaced += 1
    if replaced == 0:
        raise ValueError(
            f"no PEFT LoRA layers in decoder layers {sorted(selected)}; the first LoRA layer is {lora_layers[0][0]}"
        )
    return state


class UserRouter(nn.Module):
    """Routing weights [batch, G + 1] from CF user vectors: G cluster experts, then the general expert.

    Buffers (saved with the model): the training users' scaler and the cluster centroids in the
    standardised space, so routing needs no side file and new users are routed by their vectors.
    """

    def __init__(self, num_clusters: int, dim: int):
        super().__init__()
        if num_clusters < 1 or dim < 1:
            raise ValueError(f"UserRouter needs num_clusters >= 1 and dim >= 1, found {num_clusters} and {dim}")
        self.num_clusters = int(num_clusters)
        self.dim = int(dim)
        self.register_buffer("scaler_mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("scaler_scale", torch.ones(dim, dtype=torch.float32))
        self.register_buffer("centroids", torch.zeros(num_clusters, dim, dtype=torch.float32))

    def set_clusters(self, scaler_mean, scaler_scale, centroids) -> None:
        """Store a fitted scaler (mean, scale [d]) and standardised centroids [G, d] (arrays or tensors)."""
        values = {
            "scaler_mean": (torch.as_tensor(scaler_mean, dtype=torch.float32), (self.dim,)),
            "scaler_scale": (torch.as_tensor(scaler_scale, dtype=torch.float32), (self.dim,)),
            "centroids": (torch.as_tensor(centroids, dtype=torch.float32), (self.num_clusters, self.dim)),
        }
        for name, (value, shape) in values.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} has non-finite values")
        if (values["scaler_scale"][0] == 0).any():
            raise ValueError("scaler_scale has zeros; a fitted StandardScaler never stores zero scales")
        with torch.no_grad():
            for name, (value, _) in values.items():
                getattr(self, name).copy_(value)

    def has_no_centroids(self) -> torch.Tensor:
        """0-dim flag: no clusters were fitted (all centroids zero)."""
        return ~self.centroids.any()

    def check_centroids(self) -> None:
        if bool(self.has_no_centroids()):
            raise ValueError("the router has no centroids yet: fit the user clusters and call set_clusters first")

    def similarities(self, user_vectors: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Cosine similarity [B, G] between each standardised user vector and each centroid. `check=False`
        skips the centroid check (a host sync) for a caller that folded it into its own."""
        if user_vectors.dim() != 2 or user_vectors.shape[1] != self.dim:
            raise ValueError(f"user vectors have shape {tuple(user_vectors.shape)}, expected (batch, {self.dim})")
        if check:
            self.check_centroids()
        z = (user_vectors.to(self.centroids.dtype) - self.scaler_mean) / self.scaler_scale
        return F.normalize(z, dim=-1) @ F.normalize(self.centroids, dim=-1).t()

    def forward(
        self,
        user_vectors: torch.Tensor,
        rule: str,
        temperature: float = 0.1,
        confidence_base: float = 0.5,
        confidence_scale: float = 0.6,
        entropy_fraction: float = 0.95,
        check: bool = True,
    ) -> torch.Tensor:
        """Weights [B, G + 1] under `rule` (one of ROUTING_RULES); the last column is the general expert."""
        if rule not in ROUTING_RULES:
            raise ValueError(f"unknown routing rule {rule!r}; expected one of {ROUTING_RULES}")
        if not temperature > 0:
            raise ValueError(f"routing temperature must be > 0, found {temperature}")
        cos = self.similarities(user_vectors, check=check)
        num_clusters = self.num_clusters
        general = torch.zeros_like(cos[:, :1])
        if rule == "hard":
            onehot = _one_hot(cos.argmax(dim=-1), num_clusters, cos.dtype)
            return torch.cat([onehot, general], dim=-1)
        w = torch.softmax(cos / temperature, dim=-1)
        soft = torch.cat([w, general], dim=-1)
        if rule == "soft":
            return soft
        # "thinkrec": a confident row goes to its cluster alone, a near-uniform one to the general expert.
        top, top_index = w.max(dim=-1)
        entropy = -torch.special.xlogy(w, w).sum(dim=-1)  # xlogy: 0·log 0 = 0, no NaN for saturated rows
        one_cluster = _one_hot(top_index, num_clusters + 1, w.dtype)
        only_general = _one_hot(torch.full_like(top_index, num_clusters), num_clusters + 1, w.dtype)
        confident = (top > confidence_base + confidence_scale / num_clusters)[:, None]
        uncertain = (entropy >= entropy_fraction * math.log(num_clusters))[:, None]
        return torch.where(confident, one_cluster, torch.where(uncertain, only_general, soft))

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, dim={self.dim}"
