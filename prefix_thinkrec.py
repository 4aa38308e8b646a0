"""Scoring rows that share the start of their prompt from one encoding of it (shared-prefix scoring).

The candidates of one user differ only in the target part at the end of the prompt (target title,
item slot, the question's tail). Instead of running each full prompt, a batch is split into groups
of rows with a common token prefix; each group's prefix runs once into a key/value cache
(transformers' `DynamicCache`), and all its rows' remaining tokens ("suffixes") run packed a few
hundred tokens to a row on top of that cache (its rows selected per packed row with the cache's own
`batch_select_indices`), under a 4-D float mask in which each suffix sees the prefix and itself
(causally) and explicit position ids that continue each suffix from the prefix. Every row then sees
exactly the tokens, slot vectors and positions it sees when scored alone, so the scores are the
same (up to float summation order; the tests hold them to 1e-4 in fp32).

Exact by construction for any template: the groups are found from the tokens themselves (longest
common prefix of rows in token order), not from the template's text; a template that puts target
text before user text just shares less. Slots are compared by their CF ids, SASRec user slots by
the history they encode, expert rows by their routing weights. Attention backends that take a raw
4-D mask (sdpa, eager) are used; others (flash-attention, flex) and sliding-window layers fall back
to per-row scoring, with `sharing_problem` saying why.

This file is part of a checkpoint's remote code (see modeling_thinkrec.py); it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# Attention backends that apply a 4-D float mask as given (transformers' masking_utils passes a 4-D
# mask through; eager adds it to the weights, sdpa takes it as `attn_mask`).
MASKABLE_ATTENTION = ("sdpa", "eager")


def sharing_problem(text_config) -> str | None:
    """Why a backbone cannot score from a shared prefix (None when it can)."""
    implementation = getattr(text_config, "_attn_implementation", None) or "eager"
    if implementation not in MASKABLE_ATTENTION:
        return (f"the backbone's attention is {implementation!r}, which takes no 4-D mask "
                f"(shared-prefix scoring needs one of {MASKABLE_ATTENTION})")
    layer_types = getattr(text_config, "layer_types", None) or ()
    if any("sliding" in str(kind) for kind in layer_types) or getattr(text_config, "use_sliding_window", False):
        return "the backbone has sliding-window attention layers, which a packed 4-D mask would not window"
    return None


@dataclass(frozen=True)
class PrefixGroup:
    """Batch rows (in order) that share their first `prefix_length` prompt tokens."""

    rows: tuple[int, ...]
    prefix_length: int


def common_length(a: list, b: list, limit: int | None = None) -> int:
    """Length of the common start of two token lists (at most `limit`)."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_groups(tokens: list[list[int]], keys: list) -> list[PrefixGroup]:
    """Split rows into groups that share a prefix, at the lowest token count.

    tokens: each row's prompt, as comparable codes (a slot token carries its CF id, so two rows share
        a slot only when they inject the same vector there).
    keys: rows may share a prefix only when their keys are equal (what the tokens do not show: the
        history a SASRec user slot encodes, the routing weights of expert rows).

    Rows of one key are taken in token order and added to the running group while that costs fewer
    tokens than starting a new one; every row keeps at least its last token as suffix (the score is
    read there). Cost of a group: its prefix once plus every row's suffix.
    """
    groups: list[PrefixGroup] = []
    by_key: dict = {}
    for row, key in enumerate(keys):
        by_key.setdefault(key, []).append(row)
    for rows in by_key.values():
        rows = sorted(rows, key=lambda row: tokens[row])
        current = [rows[0]]
        prefix = len(tokens[rows[0]]) - 1
        suffix_total = 1
        for row in rows[1:]:
            shared = common_length(tokens[current[0]], tokens[row], min(prefix, len(tokens[row]) - 1))
            # Suffix tokens of the group if `row` joins it: everyone's tokens beyond the new prefix.
            joined = suffix_total + (prefix - shared) * len(current) + len(tokens[row]) - shared
            if shared + joined < prefix + suffix_total + len(tokens[row]):
                current.append(row)
                prefix, suffix_total = shared, joined
            else:
                groups.append(PrefixGroup(tuple(current), prefix))
                current, prefix, suffix_total = [row], len(tokens[row]) - 1, 1
        groups.append(PrefixGroup(tuple(current), prefix))
    return groups


# Suffixes packed into one row of the second pass, at most (tokens; a longer suffix gets a row of its
# own). The packed row's attention grows with its length squared while the prefix cache is copied once
# per row. On ML-1M pools of 100 (SmolLM2-135M, 2-core CPU, a noisy one-off sweep of 32..4096) 128 was
# fastest; benchmarks/ranking_speed.py measures the result against per-row scoring.
PACKED_ROW_TOKENS = 128


@dataclass
class PackedBatch:
    """The two passes of shared-prefix scoring, as tensors.

    prefix_*: [G, P] one left-padded prefix per group. suffix_*: [C, S] the groups' suffixes packed in
    right-padded rows ("chunks"), `chunk_groups` [C] naming the group (prefix cache row) of each;
    `suffix_mask` is the [C, 1, S, P + S] float mask (0 attend, dtype min masked) over the prefix cache
    and the packed row; `score_positions` [C, S] marks each row's last token, in chunk order then row
    order (`score_rows` names the batch row of each mark).
    """

    prefix_embeds: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_positions: torch.Tensor
    suffix_embeds: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_positions: torch.Tensor
    score_positions: torch.Tensor
    score_rows: torch.Tensor
    first_rows: torch.Tensor
    chunk_groups: torch.Tensor


def chunks(lengths: list[int], limit: int) -> list[list[int]]:
    """Consecutive members (by index) packed into rows of at most `limit` suffix tokens (one each at least)."""
    rows, current, used = [], [], 0
    for member, length in enumerate(lengths):
        if current and used + length > limit:
            rows.append(current)
            current, used = [], 0
        current.append(member)
        used += length
    if current:
        rows.append(current)
    return rows


def pack(inputs_embeds: torch.Tensor, real_columns: list[torch.Tensor], groups: list[PrefixGroup],
         packed_row_tokens: int = PACKED_ROW_TOKENS) -> PackedBatch:
    """Lay out the prefix pass and the packed suffix pass.

    inputs_embeds: [B, T, d] the batch's embedded prompts (slot vectors injected), padded any way;
    real_columns: per row, the columns of its real tokens in order.
    """
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    hidden = inputs_embeds.shape[-1]
    n_groups = len(groups)
    longest_prefix = max(group.prefix_length for group in groups)
    layout = []  # (group index, [batch rows]) per packed row
    for g, group in enumerate(groups):
        lengths = [len(real_columns[row]) - group.prefix_length for row in group.rows]
        layout.extend((g, [group.rows[m] for m in members]) for members in chunks(lengths, packed_row_tokens))
    row_lengths = [sum(len(real_columns[row]) - groups[g].prefix_length for row in rows) for g, rows in layout]
    longest_suffix = max(row_lengths)
    n_chunks = len(layout)

    prefix_embeds = inputs_embeds.new_zeros(n_groups, longest_prefix, hidden)
    prefix_mask = torch.zeros(n_groups, longest_prefix, dtype=torch.long, device=device)
    for g, group in enumerate(groups):
        length = group.prefix_length
        if length:
            prefix_embeds[g, longest_prefix - length:] = inputs_embeds[group.rows[0], real_columns[group.rows[0]][:length]]
            prefix_mask[g, longest_prefix - length:] = 1
    suffix_embeds = inputs_embeds.new_zeros(n_chunks, longest_suffix, hidden)
    # Per packed column: which row of the chunk it belongs to (-1 padding), and its position.
    segment = torch.full((n_chunks, longest_suffix), -1, dtype=torch.long)
    suffix_positions = torch.zeros(n_chunks, longest_suffix, dtype=torch.long)
    score_positions = torch.zeros(n_chunks, longest_suffix, dtype=torch.bool)
    score_rows = []
    for c, (g, rows) in enumerate(layout):
        length = groups[g].prefix_length
        start = 0
        for member, row in enumerate(rows):
            columns = real_columns[row][length:]
            end = start + len(columns)
            suffix_embeds[c, start:end] = inputs_embeds[row, columns]
            segment[c, start:end] = member
            suffix_positions[c, start:end] = torch.arange(length, length + len(columns))
            score_positions[c, end - 1] = True
            score_rows.append(row)
            start = end

    chunk_groups = torch.tensor([g for g, _ in layout], dtype=torch.long, device=device)
    # Each packed token sees its group's prefix (real tokens), and the tokens of its own row up to itself.
    segment = segment.to(device)
    same_row = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    causal = torch.ones(longest_suffix, longest_suffix, dtype=torch.bool, device=device).tril()
    sees = torch.cat([prefix_mask.bool()[chunk_groups][:, None, :].expand(-1, longest_suffix, -1), same_row & causal], dim=-1)
    # Padding columns of a packed row see the prefix only (or nothing, in which case softmax over the
    # all-masked row is uniform and finite: the mask uses dtype min, not -inf). Their outputs are unused.
    suffix_mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
    prefix_positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(
        prefix_embeds=prefix_embeds,
        prefix_mask=prefix_mask,
        prefix_positions=prefix_positions,
        suffix_embeds=suffix_embeds,
        suffix_mask=suffix_mask,
        suffix_positions=suffix_positions.to(device),
        score_positions=score_positions.to(device),
        score_rows=torch.tensor(score_rows, dtype=torch.long, device=device),
        first_rows=torch.tensor([group.rows[0] for group in groups], dtype=torch.long, device=device),
        chunk_groups=chunk_groups,
    )


def token_codes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slot_columns: list) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each row's real prompt tokens as comparable codes, and the columns they sit in.

    slot_columns: [(slot_token_id, slot_ids [B, S])] in a fixed order: the k-th occurrence of the j-th
    slot token in a row is coded as a negative number made of j and the row's k-th slot id, so rows
    share it only when they inject the same CF vector there. One host transfer for the whole batch.
    """
    ids = input_ids.tolist()
    mask = attention_mask.tolist() if attention_mask is not None else None
    kinds = len(slot_columns)
    slots = {token: (kind, slot_ids.tolist()) for kind, (token, slot_ids) in enumerate(slot_columns) if slot_ids is not None}
    codes, columns = [], []
    for row, row_ids in enumerate(ids):
        real = [column for column, keep in enumerate(mask[row]) if keep] if mask is not None else list(range(len(row_ids)))
        seen = dict.fromkeys(slots, 0)
        row_codes = []
        for column in real:
            token = row_ids[column]
            if token in slots:
                kind, slot_ids = slots[token]
                row_codes.append(-1 - (slot_ids[row][seen[token]] * kinds + kind))
                seen[token] += 1
            else:
                row_codes.append(token)
        codes.append(row_codes)
        columns.append(torch.tensor(real, dtype=torch.long, device=input_ids.device))
    return codes, columns
