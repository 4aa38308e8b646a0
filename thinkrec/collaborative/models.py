"""Collaborative-filtering encoders (MF, LightGCN; SASRec lives in the model payload,
`sasrec_thinkrec.py`) and their safetensors checkpoint format. Id 0 is padding in every table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn

from sasrec_thinkrec import PADDING_ID, SASRec
from thinkrec.training.loading import read_safetensors
from thinkrec.utils.errors import MissingInputError
from thinkrec.utils.files import atomic_write, write_json


MODEL_TYPES = ("mf", "lightgcn", "sasrec")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "cf_config.json"


class MatrixFactorization(nn.Module):
    """Score = dot product of a user row and an item row."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int):
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.user_embedding = nn.Embedding(num_users, embedding_dim, padding_idx=PADDING_ID)
        self.item_embedding = nn.Embedding(num_items, embedding_dim, padding_idx=PADDING_ID)
        # std 0.1 * d^-1/4 makes the initial dot products ~0.01 at any dimension (loss ~ log 2).
        nn.init.normal_(self.user_embedding.weight, std=0.1 * embedding_dim**-0.25)
        nn.init.normal_(self.item_embedding.weight, std=0.1 * embedding_dim**-0.25)
        with torch.no_grad():
            self.user_embedding.weight[PADDING_ID].zero_()
            self.item_embedding.weight[PADDING_ID].zero_()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (user_table, item_table) used for scoring."""
        return self.user_embedding.weight, self.item_embedding.weight

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        return (self.user_embedding(user_ids) * self.item_embedding(item_ids)).sum(-1)


class LightGCN(nn.Module):
    """LightGCN: embeddings smoothed over the symmetric-normalised user-item graph, mean of layers.

    Call :meth:`set_graph` with the positive train interactions before training or scoring.
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, num_layers: int = 2):
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.user_embedding = nn.Embedding(num_users, embedding_dim, padding_idx=PADDING_ID)
        self.item_embedding = nn.Embedding(num_items, embedding_dim, padding_idx=PADDING_ID)
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.user_embedding.weight[PADDING_ID].zero_()
            self.item_embedding.weight[PADDING_ID].zero_()
        # Built from data, not learned: kept out of the state dict.
        self.register_buffer("adjacency", None, persistent=False)

    def set_graph(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> None:
        """Build D^-1/2 A D^-1/2 over users then items from (user, item) positive pairs."""
        user_ids = torch.as_tensor(user_ids, dtype=torch.long).flatten()
        item_ids = torch.as_tensor(item_ids, dtype=torch.long).flatten()
        pairs = torch.unique(torch.stack([user_ids, item_ids]), dim=1)  # repeated pairs count once
        user_nodes = pairs[0]
        item_nodes = pairs[1] + self.num_users
        rows = torch.cat([user_nodes, item_nodes])
        cols = torch.cat([item_nodes, user_nodes])
        num_nodes = self.num_users + self.num_items
        degree = torch.bincount(rows, minlength=num_nodes).float()
        inverse_sqrt_degree = degree.clamp(min=1).pow(-0.5)
        values = inverse_sqrt_degree[rows] * inverse_sqrt_degree[cols]
        adjacency = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, (num_nodes, num_nodes), check_invariants=True
        )
        self.adjacency = adjacency.coalesce().to(self.user_embedding.weight.device)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user_table, item_table): the mean of the layer-0..num_layers embeddings."""
        if self.adjacency is None:
            raise RuntimeError("LightGCN.propagate: call set_graph(user_ids, item_ids) with the train positives first")
        layer = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layer_sum = layer
        for _ in range(self.num_layers):
            layer = torch.sparse.mm(self.adjacency, layer)
            layer_sum = layer_sum + layer
        mean = layer_sum / (self.num_layers + 1)
        return mean[: self.num_users], mean[self.num_users :]

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The propagated (user_table, item_table) used for scoring."""
        return self.propagate()

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        user_table, item_table = self.propagate()
        return (user_table[user_ids] * item_table[item_ids]).sum(-1)


@dataclass
class CFCheckpoint:
    """Frozen collaborative vectors for the LLM: tables indexed by id (row 0 = padding).

    ``user_table`` is None for SASRec, whose user vectors come from ``sequence_encoder.encode``.
    """

    model_type: str
    embedding_dim: int
    num_users: int
    num_items: int
    user_table: torch.Tensor | None
    item_table: torch.Tensor
    sequence_encoder: SASRec | None = None
    config: dict = field(default_factory=dict)

    def user_vectors(self, user_ids: torch.Tensor | None = None, history_ids: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors: table rows for MF/LightGCN, encoded histories for SASRec."""
        if self.sequence_encoder is not None:
            if history_ids is None:
                raise ValueError("SASRec user vectors need history_ids (left-padded item ids)")
            return self.sequence_encoder.encode(history_ids)
        if user_ids is None:
            raise ValueError(f"{self.model_type} user vectors need user_ids")
        return self.user_table[user_ids]


def _model_type(model: nn.Module) -> str:
    if isinstance(model, MatrixFactorization):
        return "mf"
    if isinstance(model, LightGCN):
        return "lightgcn"
    if isinstance(model, SASRec):
        return "sasrec"
    raise TypeError(f"expected MatrixFactorization, LightGCN or SASRec, found {type(model).__name__}")


@torch.no_grad()
def checkpoint_from_model(model: nn.Module, num_users: int | None = None, config: dict | None = None) -> CFCheckpoint:
    """Freeze a trained encoder into a CFCheckpoint (LightGCN tables after one final propagation)."""
    model_type = _model_type(model)
    was_training = model.training
    model.eval()
    config = dict(config or {})
    if model_type == "sasrec":
        encoder = model
        config.update(encoder.config_dict())
        checkpoint = CFCheckpoint(
            model_type="sasrec",
            embedding_dim=model.hidden_size,
            num_users=int(num_users or 0),
            num_items=model.num_items,
            user_table=None,
            item_table=model.item_embedding.weight.detach().clone(),
            sequence_encoder=encoder,
            config=config,
        )
    else:
        user_table, item_table = model.tables()
        if model_type == "lightgcn":
            config["num_layers"] = model.num_layers
        checkpoint = CFCheckpoint(
            model_type=model_type,
            embedding_dim=model.embedding_dim,
            num_users=model.num_users,
            num_items=model.num_items,
            user_table=user_table.detach().clone(),
            item_table=item_table.detach().clone(),
            config=config,
        )
    model.train(was_training)
    return checkpoint


def save_cf_checkpoint(checkpoint: CFCheckpoint | nn.Module, directory: str, config: dict | None = None) -> str:
    """Write ``model.safetensors`` and ``cf_config.json`` into ``directory`` (atomically); return it.

    ``checkpoint`` may be a CFCheckpoint or a trained encoder; ``config`` (hyper-parameters,
    metrics, ...) is merged into the saved config.
    """
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint_from_model(checkpoint, config=config)
    elif config:
        checkpoint.config = {**checkpoint.config, **config}
    if checkpoint.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, found {checkpoint.model_type!r}")
    os.makedirs(directory, exist_ok=True)
    if checkpoint.model_type == "sasrec":
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in checkpoint.sequence_encoder.state_dict().items()}
    else:
        tensors = {
            "user_table": checkpoint.user_table.detach().cpu().contiguous(),
            "item_table": checkpoint.item_table.detach().cpu().contiguous(),
        }
    metadata = {
        "model_type": checkpoint.model_type,
        "embedding_dim": checkpoint.embedding_dim,
        "num_users": checkpoint.num_users,
        "num_items": checkpoint.num_items,
        "padding_id": PADDING_ID,
        "config": checkpoint.config,
    }
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda path: save_file(tensors, path, metadata={"format": "pt"}))

    write_json(metadata, os.path.join(directory, CONFIG_NAME), sort_keys=True)
    return directory


def load_cf_checkpoint(directory: str, device: str | torch.device = "cpu") -> CFCheckpoint:
    """Read a directory written by :func:`save_cf_checkpoint`; SASRec comes back in eval mode."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise MissingInputError(f"collaborative checkpoint file missing: {path}")
    with open(config_path, encoding="utf-8") as handle:
        metadata = json.load(handle)
    model_type = metadata.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type must be one of {MODEL_TYPES}, found {model_type!r}")
    if metadata.get("padding_id", PADDING_ID) != PADDING_ID:
        raise ValueError(f"{config_path}: padding_id must be {PADDING_ID}, found {metadata['padding_id']}")
    # A truncated, empty or pickled tables file is one message naming it (read_safetensors never unpickles).
    tensors = read_safetensors(weights_path, device)
    config = metadata.get("config", {})
    if model_type == "sasrec":
        encoder_arguments = {name: config[name] for name in ("num_items", "hidden_size", "num_blocks", "num_heads", "max_len", "dropout")}
        encoder = SASRec(**encoder_arguments).to(device)
        encoder.load_state_dict(tensors)
        encoder.eval()
        user_table, item_table = None, encoder.item_embedding.weight.detach()
    else:
        encoder = None
        user_table, item_table = tensors["user_table"], tensors["item_table"]
    checkpoint = CFCheckpoint(
        model_type=model_type,
        embedding_dim=int(metadata["embedding_dim"]),
        num_users=int(metadata["num_users"]),
        num_items=int(metadata["num_items"]),
        user_table=user_table,
        item_table=item_table,
        sequence_encoder=encoder,
        config=config,
    )
    expected = {"item_table": (checkpoint.num_items, checkpoint.embedding_dim)}
    if user_table is not None:
        expected["user_table"] = (checkpoint.num_users, checkpoint.embedding_dim)
    for name, shape in expected.items():
        found = tuple(getattr(checkpoint, name).shape)
        if found != shape:
            raise ValueError(f"{weights_path}: {name} has shape {found}, {config_path} says {shape}")
    return checkpoint


def check_ids_fit(cf: CFCheckpoint, max_user_id: int, max_item_id: int, source: str = "records") -> None:
    """Raise ValueError when the largest user/item id of ``source`` has no row in the tables."""
    problems = []
    if cf.user_table is not None and max_user_id >= cf.num_users:
        problems.append(
            f"largest UserID {max_user_id} does not fit the {cf.model_type} user table of "
            f"{cf.num_users} rows (ids 0..{cf.num_users - 1})"
        )
    if max_item_id >= cf.num_items:
        problems.append(
            f"largest ItemID {max_item_id} does not fit the {cf.model_type} item table of "
            f"{cf.num_items} rows (ids 0..{cf.num_items - 1})"
        )
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ". Train the collaborative model on the same prepared records.")
