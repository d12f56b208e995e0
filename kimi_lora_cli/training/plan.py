"""The deterministic batch plan: which samples every rank sees in every micro-batch of every step.

The whole run is a function of (seed, number of samples, global batch), not of the number of
processes: each optimizer step takes the next `world * per_device * accumulation` samples of the
epoch's shuffled order and deals them out to ranks and micro-batches. So one process with micro-batch
4 and two with micro-batch 2 train on exactly the same global batches, and a resumed run skips the
steps already taken and continues with the very same batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Step:
    epoch: int
    step_in_epoch: int
    micro: list[list[int]]  # this rank's micro-batches (sample indices)
    total_samples: int  # samples of the step over all ranks


def split_eval(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded hold-out of ceil(ratio * n) samples (at least one)."""
    if ratio <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, math.ceil(ratio * n)))
    return sorted(order[k:]), sorted(order[:k])


def epoch_order(indices: list[int], seed: int, epoch: int, lengths: list[int] | None = None,
                group_by_length: bool = False, global_batch: int = 1) -> list[int]:
    order = list(indices)
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if group_by_length and lengths is not None:
        # Sort inside mega-batches so a step holds similar lengths (less padding), then shuffle steps.
        mega = max(global_batch * 16, global_batch)
        grouped = []
        for start in range(0, len(order), mega):
            grouped += sorted(order[start : start + mega], key=lambda i: -lengths[i])
        steps = [grouped[i : i + global_batch] for i in range(0, len(grouped), global_batch)]
        head, tail = steps[:-1], steps[-1:]
        rng.shuffle(head)
        order = [i for s in head + tail for i in s]
    return order


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(items[start : start + size])
        start += size
    return out


def steps_for_epoch(order: list[int], epoch: int, world: int, rank: int, per_device: int, accumulation: int,
                    fixed_micro_count: bool = False) -> list[Step]:
    """Steps of one epoch. A last, smaller step keeps its samples when every rank gets one
    (spread evenly); `fixed_micro_count` (DeepSpeed) drops it instead."""
    global_batch = world * per_device * accumulation
    steps = []
    for k, start in enumerate(range(0, len(order), global_batch)):
        chunk = order[start : start + global_batch]
        if len(chunk) < global_batch and (fixed_micro_count or len(chunk) < world):
            break
        if len(chunk) == global_batch:
            # rank r's micro-batch j = samples (j * world + r) * per_device ... in the step's order
            per_rank = [[chunk[(j * world + r) * per_device + b] for j in range(accumulation)
                         for b in range(per_device)] for r in range(world)]
            mine = per_rank[rank]
            micro = [mine[j * per_device : (j + 1) * per_device] for j in range(accumulation)]
        else:
            ranks = _split(chunk, world)
            n_micro = max(1, math.ceil(min(len(x) for x in ranks) / per_device))
            micro = _split(ranks[rank], n_micro)
        steps.append(Step(epoch=epoch, step_in_epoch=k, micro=micro, total_samples=len(chunk)))
    return steps


def steps_per_epoch(n: int, world: int, per_device: int, accumulation: int, fixed_micro_count: bool = False) -> int:
    global_batch = world * per_device * accumulation
    full, rest = divmod(n, global_batch)
    return full + (1 if rest and not fixed_micro_count and rest >= world else 0)


def total_steps(n: int, epochs: float, max_steps: int, world: int, per_device: int, accumulation: int,
                fixed_micro_count: bool = False) -> int:
    if max_steps > 0:
        return max_steps
    per_epoch = steps_per_epoch(n, world, per_device, accumulation, fixed_micro_count)
    return max(1, math.ceil(epochs * per_epoch))


def iterate_steps(indices: list[int], lengths: list[int], seed: int, world: int, rank: int, per_device: int,
                  accumulation: int, group_by_length: bool = False, fixed_micro_count: bool = False):
    """Endless stream of steps, epoch after epoch (the caller stops at the step budget)."""
    epoch = 0
    global_batch = world * per_device * accumulation
    while True:
        order = epoch_order(indices, seed, epoch, lengths, group_by_length, global_batch)
        steps = steps_for_epoch(order, epoch, world, rank, per_device, accumulation, fixed_micro_count)
        if not steps:
            raise ValueError("no step fits in an epoch")
        yield from steps
        epoch += 1
