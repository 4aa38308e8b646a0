"""The per-row checks of a ThinkRec batch (slot counts, CF id ranges, routing ids, label layout, padding
side), all paid for with one host sync on the happy path.

Part of the model's remote-code payload (saved next to `modeling_thinkrec.py`); it imports only torch.
"""

from __future__ import annotations

import torch


IGNORE_INDEX = -100


def prompt_length(labels: torch.LongTensor) -> int:
    """Column of the first answer token, shared by all rows (prompts are left-padded to one length)."""
    has_label = labels != IGNORE_INDEX
    empty = (~has_label.any(-1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"row {empty[0].item()}: labels are all -100; every row needs its answer tokens and EOS as labels."
        )
    first = has_label.int().argmax(-1)
    if (first != first[0]).any():
        row = (first != first[0]).nonzero()[0].item()
        raise ValueError(
            f"row {row}: answer starts at column {first[row].item()} but row 0's at column {first[0].item()}; "
            "prompts must be left-padded to one length (ThinkRecCollator does this)."
        )
    return int(first[0].item())


def check_batch(config, router=None, input_ids=None, attention_mask=None, labels=None, user_slot_ids=None,
                item_slot_ids=None, history_item_ids=None, user_ids=None, routes: bool = False, item_ids=None) -> None:
    """Every per-row check of a batch for a model of `config`, at the cost of one host sync on the happy
    path: each check is a tensor flag paired with a function that names the row; the flags are reduced to
    one (LLaVA's one numel comparison, for all of them at once), and only when it is set are the messages
    built. `routes`: the batch is routed to experts by `router`; `item_ids`: CF scores are asked for;
    `labels` / `attention_mask`: the score is read at the last prompt column (left padding)."""
    sasrec = config.cf_model_type == "sasrec"
    for name, ids in (("user_slot_ids", user_slot_ids), ("item_slot_ids", item_slot_ids)):
        if input_ids is not None and ids is not None and ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{name}: expected {input_ids.shape[0]} rows like input_ids, found {ids.shape[0]}.")
    reads_users = routes or item_ids is not None  # routing and CF scores read each row's user vector
    has_user_slots = input_ids is not None and user_slot_ids is not None and user_slot_ids.shape[1] > 0
    if sasrec and (reads_users or has_user_slots) and history_item_ids is None:
        raise ValueError("SASRec user vectors (slots, routing, CF scores) need history_item_ids ([batch, length], "
                         "left-padded with 0).")
    if reads_users and not sasrec and user_ids is None:
        raise ValueError("Routing and CF scores need user_ids (one CF user id per row; ThinkRecCollator provides them).")
    checks = []

    def id_range(name, ids, table_size):
        bad = (ids < 0) | (ids >= table_size)

        def explain():
            index = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}: row {index[0]} holds id {ids[tuple(index)].item()}, outside the CF table "
                             f"(0..{table_size - 1}).")
        checks.append((bad.any(), explain))

    if input_ids is not None and config.cf_model_type == "none":
        for kind, token_id in (("user", config.user_slot_token_id), ("item", config.item_slot_token_id)):
            if token_id is None:
                continue
            has_slot = (input_ids == token_id).any(-1)

            def explain(kind=kind, has_slot=has_slot):
                raise ValueError(
                    f"rows {has_slot.nonzero().flatten().tolist()}: {kind} slot tokens in a text-only model "
                    "(cf_model_type='none') which has no CF vectors; use a template without id slots or build the "
                    "model with a CF checkpoint."
                )
            checks.append((has_slot.any(), explain))
    elif input_ids is not None:
        for kind, token_id, slot_ids in (("user", config.user_slot_token_id, user_slot_ids),
                                         ("item", config.item_slot_token_id, item_slot_ids)):
            slots_per_row = (input_ids == token_id).sum(-1)
            ids_per_row = torch.zeros_like(slots_per_row) if slot_ids is None else (slot_ids != 0).sum(-1)
            mismatched = slots_per_row != ids_per_row * config.tokens_per_id

            def explain(kind=kind, slots_per_row=slots_per_row, ids_per_row=ids_per_row, mismatched=mismatched):
                rows = mismatched.nonzero().flatten()
                row = rows[0].item()
                per_id = f" x {config.tokens_per_id} tokens per id" if config.tokens_per_id > 1 else ""
                raise ValueError(
                    f"row {row}: {slots_per_row[row].item()} {kind} slots but {ids_per_row[row].item()} {kind} ids"
                    f"{per_id} ({rows.numel()} mismatched rows)."
                )
            checks.append((mismatched.any(), explain))
        if user_slot_ids is not None and not sasrec:
            id_range("user_slot_ids", user_slot_ids, config.num_users)
        if item_slot_ids is not None:
            id_range("item_slot_ids", item_slot_ids, config.num_items)
    if sasrec and (reads_users or has_user_slots):
        id_range("history_item_ids", history_item_ids, config.num_items)
    if reads_users and not sasrec:
        id_range("user_ids", user_ids, config.num_users)
        if routes:
            padding = user_ids == 0

            def explain():
                raise ValueError(f"user_ids: row {padding.nonzero()[0].item()} holds the padding id 0, which has no "
                                 "CF vector to route by.")
            checks.append((padding.any(), explain))
    if item_ids is not None:
        id_range("item_ids", item_ids, config.num_items)
    if routes:
        checks.append((router.has_no_centroids(), router.check_centroids))
    if labels is not None:
        has_label = labels != IGNORE_INDEX
        first = has_label.int().argmax(-1)
        checks.append((~has_label.any(-1).all() | (first != first[0]).any(), lambda: prompt_length(labels)))
    elif attention_mask is not None:
        last_is_padding = attention_mask[:, -1] == 0

        def explain():
            raise ValueError(
                f"row {last_is_padding.nonzero()[0].item()}: the last column is padding, so the score would be read "
                "at a pad token; prompts must be left-padded (ThinkRecCollator and ThinkRecProcessor do this; a "
                "tokenizer needs padding_side='left')."
            )
        checks.append((last_is_padding.any(), explain))
    if checks and bool(torch.stack([flag for flag, _ in checks]).any()):  # the one host sync
        for flag, explain in checks:
            if bool(flag):
                explain()
        raise AssertionError("an input check flagged a problem it could not name")  # unreachable
