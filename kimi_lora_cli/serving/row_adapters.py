"""One decode, a different LoRA adapter on each row: every adapter of the batch in one pair of matmuls.

peft can route rows itself (`adapter_names=`), but it does so per layer and per adapter: it finds
each adapter's rows with Python lists, runs that adapter on the gathered rows and scatters the sum
back, so its cost grows with the number of adapters in the batch. Here, per LoRA layer, the
A matrices of the batch's adapters are stacked into one [R, in] matrix and the B matrices side by
side into one [out, R] matrix (R = the sum of their ranks). For a batch x:

    delta = ((x @ A_all.T) * W) @ B_all.T

where W[row] holds the row's adapter scaling over that adapter's rank block and zero elsewhere, so
each row gets exactly `scaling * B_a(A_a(x))` of its own adapter a and nothing of the others (a row
of the plain base gets zero). The model runs with its adapters disabled (peft computes the base
layer only) and a forward hook adds `delta`: two matmuls and a product per layer and step,
whatever the number of adapters. W is rebuilt only when the batch's rows change.

Vanilla LoRA on linear layers only (`stackable`); the engine decodes a batch with DoRA, an adapter of
another kind or modules_to_save one adapter at a time (peft refuses per-row routing with DoRA).
"""

from __future__ import annotations

from typing import Any

from kimi_lora_cli.adapter_names import BASE


def stackable(model: Any, adapters: set[str]) -> bool:
    """Whether every LoRA layer of `model` runs `adapters` as plain LoRA on a linear layer."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and adapters & set(m.modules_to_save):
            return False
        if not isinstance(m, LoraLayer):
            continue
        here = adapters & set(m.lora_A)
        if not here:
            continue
        if here & set(getattr(m, "lora_variant", {}) or {}) or any(m.use_dora.get(a) for a in here):
            return False
        if not all(isinstance(m.lora_A[a], torch.nn.Linear) and isinstance(m.lora_B[a], torch.nn.Linear)
                   for a in here):
            return False
        if any(getattr(m.lora_B[a], "bias", None) is not None for a in here):
            return False
    return True


class StackedRows:
    """Forward hooks that add each row's own adapter to every LoRA layer (see the module docstring); the
    adapters must be `stackable`. `row_adapters[i]` is the adapter of prompt i (BASE: none); `route(rows)` names the prompt of each
    row the next forward computes. Use with the model's adapters disabled; `close()` removes the hooks."""

    def __init__(self, model: Any, row_adapters: list[str]) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        self.row_adapters = row_adapters
        wanted = list(dict.fromkeys(a for a in row_adapters if a != BASE))
        self._tables: dict[tuple, torch.Tensor] = {}  # layout -> [prompts, R] scaling per rank column
        self._current: dict[tuple, torch.Tensor] = {}  # layout -> [rows, R] for the rows of this step
        self._rows: list[int] | None = None
        self.handles = []
        self._like = None
        for m in model.modules():
            if not isinstance(m, LoraLayer):
                continue
            names = [a for a in wanted if a in m.lora_A]
            if not names:
                continue
            a_all = torch.cat([m.lora_A[a].weight for a in names])  # [R, in]
            b_all = torch.cat([m.lora_B[a].weight for a in names], dim=1)  # [out, R]
            layout = tuple((a, m.lora_A[a].weight.shape[0], float(m.scaling[a])) for a in names)
            self._tables.setdefault(layout, None)
            self._like = a_all
            self.handles.append(m.register_forward_hook(self._hook(a_all, b_all, layout)))
        self.adapters = set(wanted)
        self._build()

    def add(self, row_adapters: list[str]) -> None:
        """Rows for samples that join the batch (their adapters must be among the batch's, or BASE)."""
        if set(row_adapters) - self.adapters - {BASE}:
            raise ValueError(f"adapters {sorted(set(row_adapters) - self.adapters - {BASE})} are not stacked here")
        self.row_adapters = [*self.row_adapters, *row_adapters]
        self._build()

    def _build(self) -> None:
        for layout in self._tables:
            self._tables[layout] = self._table(layout, self._like)
        self._rows = None

    def _table(self, layout: tuple, like: Any) -> Any:
        import torch

        width = sum(rank for _, rank, _ in layout)
        table = torch.zeros((len(self.row_adapters), width), dtype=like.dtype, device=like.device)
        start = {}
        col = 0
        for name, rank, scale in layout:
            start[name] = (col, rank, scale)
            col += rank
        for i, name in enumerate(self.row_adapters):
            if name in start:
                col, rank, scale = start[name]
                table[i, col : col + rank] = scale
        return table

    def route(self, rows: list[int]) -> None:
        if rows == self._rows:
            return
        import torch

        self._rows = list(rows)
        for layout, table in self._tables.items():
            index = torch.tensor(rows, device=table.device)
            self._current[layout] = table[index]

    def _hook(self, a_all: Any, b_all: Any, layout: tuple):
        import torch.nn.functional as F

        def add_rows(module, args, output):
            x = args[0]
            weights = self._current[layout]
            weights = weights.view(weights.shape[0], *([1] * (x.dim() - 2)), weights.shape[1])
            low = F.linear(x.to(a_all.dtype), a_all) * weights
            return output + F.linear(low, b_all).to(output.dtype)

        return add_rows

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
