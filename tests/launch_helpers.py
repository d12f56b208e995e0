"""Helpers for tests that start `kimi-lora` or torchrun in subprocesses."""

from __future__ import annotations

import os
from pathlib import Path


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a launched `kimi-lora` / torchrun subprocess: this checkout's package, one
    thread, and none of an outer launcher's rank variables."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
