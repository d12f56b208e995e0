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
    """Whether every LoRA layer of `model` that holds one of `adapters` runs it as plain LoRA on a linear
    layer of the decoder stacks or heads (one row of the batch = one sample there; not the audio adaptor,
    whose rows are audio positions), with no embedding LoRA, trainable tokens or modules_to_save."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for name, m in model.named_modules():
        if isinstance(m, ModulesToSaveWrapper) and adapters & set(m.modules_to_save):
            return False
        if not isinstance(m, BaseTunerLayer):
            continue
        held = set()
        for attr in ("lora_A", "lora_embedding_A", "token_adapter", "trainable_tokens_delta"):
            held |= set(getattr(m, attr, {}) or {})
        here = adapters & held
        if not here:
            continue
        if not isinstance(m, LoraLayer) or here - set(m.lora_A) or here & set(getattr(m, "lora_embedding_A", {})):
            return False
        if "adaptor" in name or here & set(getattr(m, "lora_variant", {}) or {}) or any(m.use_dora.get(a)
                                                                                       for a in here):
            return False
        if not all(isinstance(m.lora_A[a], torch.nn.Linear) and isinstance(m.lora_B[a], torch.nn.Linear)
                   for a in here):
            return False
        if any(getattr(m.lora_B[a], "bias", None) is not None for a in here):
            return False
    return True


class StackedRows:
    """Forward hooks that add each row's own adapter to every LoRA layer (see the module docstring); the
    adapters must be `stackable`. `row_adapters[i]` is the adapter of prompt i (BASE: none); `route(rows)`
    names the prompt of each row the next forward computes. Use with the model's adapters disabled;
    `close()` removes the hooks."""

    def __init__(self, model: Any, row_adapters: list[str]) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        wanted = list(dict.fromkeys(a for a in row_adapters if a != BASE))
        self.adapters = set(wanted)
        self._slot = {name: k + 1 for k, name in enumerate(wanted)}  # 0: the base
        self._layouts: dict[tuple, tuple[Any, Any]] = {}  # layout -> ([slots, R] 0/1 block, [slots] scale)
        self._current: dict[tuple, tuple[Any, Any]] = {}  # layout -> the same for the rows of this step
        self._rows: list[int] | None = None
        self.handles: list[Any] = []
        layers = []
        for m in model.modules():
            if not isinstance(m, LoraLayer):
                continue
            names = [a for a in wanted if a in m.lora_A]
            if not names:
                continue
            a_all = torch.cat([m.lora_A[a].weight for a in names])  # [R, in]
            b_all = torch.cat([m.lora_B[a].weight for a in names], dim=1)  # [out, R]
            layout = tuple((a, m.lora_A[a].weight.shape[0], float(m.scaling[a])) for a in names)
            if layout not in self._layouts:
                self._layouts[layout] = self._blocks(layout, a_all)
            layers.append((m, a_all, b_all, layout))
        self._slots = torch.tensor([self._slot.get(a, 0) for a in row_adapters], dtype=torch.long)
        for m, a_all, b_all, layout in layers:  # hooks last: a failure above leaves the model untouched
            self.handles.append(m.register_forward_hook(self._hook(a_all, b_all, layout)))

    def _blocks(self, layout: tuple, like: Any) -> tuple[Any, Any]:
        import torch

        width = sum(rank for _, rank, _ in layout)
        block = torch.zeros((len(self._slot) + 1, width), dtype=like.dtype, device=like.device)
        scale = torch.zeros(len(self._slot) + 1, dtype=like.dtype, device=like.device)
        col = 0
        for name, rank, factor in layout:
            block[self._slot[name], col : col + rank] = 1
            scale[self._slot[name]] = factor
            col += rank
        return block, scale

    def add(self, row_adapters: list[str]) -> None:
        """Rows for samples that join the batch (their adapters must be among the batch's, or BASE)."""
        import torch

        if set(row_adapters) - self.adapters - {BASE}:
            raise ValueError(f"adapters {sorted(set(row_adapters) - self.adapters - {BASE})} are not stacked here")
        more = torch.tensor([self._slot.get(a, 0) for a in row_adapters], dtype=torch.long)
        self._slots = torch.cat([self._slots, more])
        self._rows = None

    def route(self, rows: list[int]) -> None:
        if rows == self._rows:
            return
        self._rows = list(rows)
        slots = self._slots[rows]
        for layout, (block, scale) in self._layouts.items():
            picked = slots.to(block.device)
            self._current[layout] = (block[picked], scale[picked])

    def _hook(self, a_all: Any, b_all: Any, layout: tuple):
        import torch.nn.functional as F

        def add_rows(module, args, output):
            x = args[0]
            block, scale = self._current[layout]
            if x.shape[0] != block.shape[0]:
                raise RuntimeError(f"per-row adapters: a LoRA layer saw {x.shape[0]} rows for a batch of "
                                   f"{block.shape[0]}")
            shape = (block.shape[0], *([1] * (x.dim() - 2)))
            low = F.linear(x.to(a_all.dtype), a_all) * block.view(*shape, block.shape[1])
            # scaled after B, as peft computes `lora_B(lora_A(x)) * scaling`
            return output + (F.linear(low, b_all) * scale.view(*shape, 1)).to(output.dtype)

        return add_rows

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
