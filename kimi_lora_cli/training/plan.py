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
from dataclasses import dataclass, field


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


def too_few(count: int, what: str, world: int, per_device: int, accumulation: int, fixed_micro_count: bool) -> Exception:
    """No optimizer step fits in an epoch: one line with the numbers and what to change. A step needs
    one sample (row) per process, or the whole global batch where every step must be full (DeepSpeed)."""
    from kimi_lora_cli.errors import ConfigError

    if fixed_micro_count:
        need = (f"{world * per_device * accumulation} (DeepSpeed takes full steps only: {world} processes x "
                f"--per-device-train-batch-size {per_device} x --gradient-accumulation-steps {accumulation})")
    else:
        need = f"{world} (one per process)"
    return ConfigError(f"no optimizer step fits in an epoch: the training data gives {count} {what}, and one step "
                       f"needs at least {need}; use fewer processes or a smaller batch, or add data")


def iterate_steps(indices: list[int], lengths: list[int], seed: int, world: int, rank: int, per_device: int,
                  accumulation: int, group_by_length: bool = False, fixed_micro_count: bool = False):
    """Endless stream of steps, epoch after epoch (the caller stops at the step budget)."""
    epoch = 0
    global_batch = world * per_device * accumulation
    while True:
        order = epoch_order(indices, seed, epoch, lengths, group_by_length, global_batch)
        steps = steps_for_epoch(order, epoch, world, rank, per_device, accumulation, fixed_micro_count)
        if not steps:
            raise too_few(len(order), "samples", world, per_device, accumulation, fixed_micro_count)
        yield from steps
        epoch += 1


# -------------------------------------------------------------------------------------------
# Packing: samples laid end to end in rows of a fixed token budget
# -------------------------------------------------------------------------------------------


class PackedMicro(list):
    """A packed micro-batch: iterates and counts as its samples; `rows` says which share a row and
    `length` is the row length every row is padded to (one shape for all batches: no recompiles
    for flex_attention, no allocator churn)."""

    def __init__(self, rows: list[list[int]], length: int | None = None) -> None:
        super().__init__(i for row in rows for i in row)
        self.rows = rows
        self.length = length


def pack_rows(items: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: longest first, each into the first row with room (a new row when none).

    Sorting is stable, so equal lengths keep the order of `items`; the rows' fill pattern depends only
    on the lengths. A max-tree over the rows' free space finds the first fit in O(log n)."""
    order = sorted(items, key=lambda i: -lengths[i])
    size = 1
    while size < max(1, len(order)):
        size *= 2
    free = [0] * size + [capacity] * size  # leaves: free space of row j at size + j
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than the packing length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def packed_epoch_rows(indices: list[int], lengths: list[int], capacity: int, seed: int, epoch: int,
                      world: int = 1, global_rows: int = 1) -> list[list[int]]:
    """The epoch's rows in training order: seeded shuffle, first-fit decreasing, seeded row shuffle.

    The row count is the same every epoch (it depends only on the lengths). When the epoch's last,
    partial step holds a number of rows that the processes cannot share evenly, its fullest rows are
    halved until they can, so no process ever gets more rows in a micro-batch than asked for; only
    that step changes, so every step holds the same samples whatever the number of processes."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(indices)
    rng.shuffle(order)
    rows = pack_rows(order, lengths, capacity)
    rng.shuffle(rows)
    tail = len(rows) % global_rows
    while tail % world:
        last = rows[len(rows) - tail :]
        widest = max(range(len(last)), key=lambda j: len(last[j]))
        if len(last[widest]) < 2:
            break
        row = last[widest]
        rows[len(rows) - tail + widest] = row[: len(row) // 2]
        rows.append(row[len(row) // 2 :])
        tail += 1
    return rows


def packed_steps_for_epoch(rows: list[list[int]], epoch: int, world: int, rank: int, per_device: int,
                           accumulation: int, fixed_micro_count: bool = False, length: int | None = None
                           ) -> list[Step]:
    """`steps_for_epoch` over rows: each step deals `world * per_device * accumulation` rows out to the
    ranks' micro-batches; `total_samples` counts the samples in all of them (the loss divides by it)."""
    global_rows = world * per_device * accumulation
    steps = steps_for_epoch(list(range(len(rows))), epoch, world, rank, per_device, accumulation,
                            fixed_micro_count)
    for s in steps:
        chunk = rows[s.step_in_epoch * global_rows : (s.step_in_epoch + 1) * global_rows]
        s.total_samples = sum(len(r) for r in chunk)
        s.micro = [PackedMicro([rows[j] for j in mb], length) for mb in s.micro]
    return steps


@dataclass
class BatchPlan:
    """Everything the trainer asks of the batch plan, padded (`packing_length=None`) or packed."""

    indices: list[int]
    lengths: list[int]
    seed: int
    world: int
    rank: int
    per_device: int  # samples (padded) or rows (packed) per micro-batch
    accumulation: int
    group_by_length: bool = False
    fixed_micro_count: bool = False
    packing_length: int | None = None
    _packed: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def _rows(self, epoch: int) -> list[list[int]]:
        if self._packed is None or self._packed[0] != epoch:
            rows = packed_epoch_rows(self.indices, self.lengths, self.packing_length, self.seed, epoch, self.world,
                                     self.world * self.per_device * self.accumulation)
            self._packed = (epoch, rows)
        return self._packed[1]

    def packing_summary(self) -> str:
        """One line for the log: how the first epoch packs (empty without packing)."""
        if not self.packing_length:
            return ""
        rows = self._rows(0)
        fill = sum(self.lengths[i] for r in rows for i in r) / (len(rows) * self.packing_length)
        return (f"{len(self.indices)} samples in {len(rows)} rows of {self.packing_length} tokens "
                f"({100 * fill:.1f}% filled), {self.per_device} rows per micro-batch")

    def steps_per_epoch(self) -> int:
        units = len(self._rows(0)) if self.packing_length else len(self.indices)
        return steps_per_epoch(units, self.world, self.per_device, self.accumulation, self.fixed_micro_count)

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch()))

    def steps(self):
        """Endless stream of this rank's steps, epoch after epoch."""
        if not self.packing_length:
            yield from iterate_steps(self.indices, self.lengths, self.seed, self.world, self.rank, self.per_device,
                                     self.accumulation, self.group_by_length, self.fixed_micro_count)
            return
        epoch = 0
        while True:
            steps = packed_steps_for_epoch(self._rows(epoch), epoch, self.world, self.rank, self.per_device,
                                           self.accumulation, self.fixed_micro_count, self.packing_length)
            if not steps:
                raise too_few(len(self._rows(epoch)), "packed rows", self.world, self.per_device, self.accumulation,
                              self.fixed_micro_count)
            yield from steps
            epoch += 1

    def eval_batches(self, eval_indices: list[int], batch_size: int) -> list[list[int]]:
        """This rank's evaluation micro-batches; every rank gets the same number (ZeRO-3 gathers weights
        collectively), an empty one where a rank has run out."""
        per_rank = [eval_indices[r :: self.world] for r in range(self.world)]
        if self.packing_length:
            batches = []
            for mine in per_rank:
                rows = pack_rows(mine, self.lengths, self.packing_length)
                batches.append([PackedMicro(rows[b : b + batch_size], self.packing_length)
                                for b in range(0, len(rows), batch_size)])
        else:
            batches = [[mine[b : b + batch_size] for b in range(0, len(mine), batch_size)] for mine in per_rank]
        count = max(len(b) for b in batches)
        return batches[self.rank] + [[] for _ in range(count - len(batches[self.rank]))]
