"""Adapters on the served model: which of them are attached (least recently used leave first) and how
one batch runs them (one adapter for all rows or the plain base; one adapter per row: row_adapters.py)."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kimi_lora_cli.adapter_names import BASE


class AdapterSlots:
    """The adapters given at start; at most `capacity` attached to the model at once (least recently
    used leave first). Only the worker thread calls `ensure`."""

    def __init__(self, loaded: Any, folders: dict[str, Path], capacity: int, allow_pickle: bool) -> None:
        self.loaded = loaded
        self.folders = folders
        self.capacity = capacity
        self.allow_pickle = allow_pickle
        self.present: OrderedDict[str, None] = OrderedDict((n, None) for n in loaded.adapter_names)
        self.loads = 0
        self.evictions = 0

    def ensure(self, names: set[str]) -> None:
        from kimi_lora_cli.loading import attach_adapters

        for n in names:
            if n in self.present:
                self.present.move_to_end(n)
        missing = [n for n in names if n not in self.present]
        for n in missing:
            while len(self.present) >= self.capacity:
                victim = next(k for k in self.present if k not in names)
                self.loaded.model.delete_adapter(victim)
                self.loaded.adapter_names.remove(victim)
                del self.present[victim]
                self.evictions += 1
            attach_adapters(self.loaded, [(n, self.folders[n])], allow_pickle=self.allow_pickle)
            self.loaded.model.eval()
            self.present[n] = None
            self.loads += 1


@contextmanager
def one_adapter(model: Any, attached: list[str], adapter: str):
    """`model` as one adapter (or the plain base) for a whole batch."""
    if not attached:
        yield
    elif adapter == BASE:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield
