"""Work shared out over the ranks of a launch, for steps that run the model outside Trainer's loops."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from accelerate import PartialState
from accelerate.utils import gather_object


def map_over_ranks(work: Callable[[list], list], items: Sequence) -> list:
    """`work(items)` with every rank taking an equal, contiguous share; returns all results in item order,
    on every rank.

    Each rank gets the same number of items (the short ones repeat their last item, whose result is then
    dropped), so every rank makes the same number of model calls: under FSDP / ZeRO-3 each forward is
    collective, and a rank that stopped early would leave the others waiting for it. `work` must return
    one result per item, in order.
    """
    state = PartialState()
    if state.num_processes == 1 or not items:
        return list(work(list(items)))
    share = math.ceil(len(items) / state.num_processes)
    own = list(range(state.process_index * share, min((state.process_index + 1) * share, len(items))))
    padded = own + [own[-1] if own else 0] * (share - len(own))
    results = list(work([items[i] for i in padded]))
    if len(results) != len(padded):
        raise ValueError(f"map_over_ranks: work returned {len(results)} results for {len(padded)} items.")
    gathered = dict(gather_object(list(zip(own, results[: len(own)]))))
    return [gathered[i] for i in range(len(items))]


def synced_generation() -> bool:
    """Whether `generate` must keep every rank stepping until all have finished (several ranks: a rank
    whose rows all stopped still takes part in the others' collective forwards)."""
    return PartialState().num_processes > 1


def from_main_process(value):
    """`value` as the main process has it, on every rank (a decision only the main process can take, such
    as whether it got the output folder's lock, so every rank acts on it alike)."""
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]
