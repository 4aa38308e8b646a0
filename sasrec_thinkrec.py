"""SASRec, the self-attentive sequential encoder: ThinkRec reads a user's vector from the encoding of
their history. Part of the model's code payload (copied next to checkpoints for `trust_remote_code`):
it imports only torch. Id 0 is padding.
"""

import torch
from torch import nn
from torch.nn import functional as F


PADDING_ID = 0


class SASRecBlock(nn.Module):
    """One SASRec block: pre-norm causal self-attention, then a point-wise feed-forward, each residual."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.feed_forward_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.Dropout(dropout),
        )

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = states.shape
        return states.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # As in the SASRec reference code, the query is normalised and the keys/values are not.
        normed = self.attention_norm(states)
        attended = F.scaled_dot_product_attention(
            self._split_heads(self.query(normed)),
            self._split_heads(self.key(states)),
            self._split_heads(self.value(states)),
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(states.shape)
        states = normed + self.output(attended)
        normed = self.feed_forward_norm(states)
        return normed + self.feed_forward(normed)


class SASRec(nn.Module):
    """Self-attentive sequential encoder; the user vector is the last position's hidden state.

    Histories are left-padded with 0 (most recent item last). Inputs longer than ``max_len`` keep
    their last ``max_len`` items; shorter ones are padded to ``max_len`` so that extra leading
    padding never changes the output.
    """

    def __init__(
        self,
        num_items: int,
        hidden_size: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        max_len: int = 25,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.num_items = num_items
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.max_len = max_len
        self.dropout_rate = dropout
        self.item_embedding = nn.Embedding(num_items, hidden_size, padding_idx=PADDING_ID)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden_size, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        with torch.no_grad():
            self.item_embedding.weight[PADDING_ID].zero_()

    def config_dict(self) -> dict:
        """Constructor arguments, enough to rebuild the module."""
        return {
            "num_items": self.num_items,
            "hidden_size": self.hidden_size,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "max_len": self.max_len,
            "dropout": self.dropout_rate,
        }

    def _fit_length(self, history_ids: torch.Tensor) -> torch.Tensor:
        length = history_ids.shape[1]
        if length >= self.max_len:
            return history_ids[:, length - self.max_len :]
        return F.pad(history_ids, (self.max_len - length, 0), value=PADDING_ID)

    def encode(self, history_ids: torch.Tensor) -> torch.Tensor:
        """User vectors [B, hidden] from left-padded histories [B, L]."""
        if history_ids.dim() != 2:
            raise ValueError(f"history_ids: expected shape [batch, length], found {tuple(history_ids.shape)}")
        history_ids = self._fit_length(history_ids)
        is_item = history_ids != PADDING_ID  # [B, L]
        positions = torch.arange(self.max_len, device=history_ids.device)
        states = self.item_embedding(history_ids) * self.hidden_size**0.5 + self.position_embedding(positions)
        states = self.embedding_dropout(states) * is_item.unsqueeze(-1)
        # Causal mask over real items; every position may also attend to itself so that padding
        # rows (and all-padding histories) get a finite softmax instead of NaN.
        causal = torch.ones(self.max_len, self.max_len, dtype=torch.bool, device=history_ids.device).tril()
        diagonal = torch.eye(self.max_len, dtype=torch.bool, device=history_ids.device)
        attention_mask = (causal & is_item[:, None, :]) | diagonal  # [B, L(query), L(key)]
        attention_mask = attention_mask.unsqueeze(1)  # broadcast over heads
        for block in self.blocks:
            states = block(states, attention_mask) * is_item.unsqueeze(-1)
        return self.final_norm(states[:, -1])

    def forward(self, history_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        return (self.encode(history_ids) * self.item_embedding(item_ids)).sum(-1)


__all__ = ["PADDING_ID", "SASRec", "SASRecBlock"]
