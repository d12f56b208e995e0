"""What a training run returns to its caller (`kimi-lora train` prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    total_steps: int
    interrupted: bool = False
    first_loss: float | None = None
    last_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_checkpoint: str | None = None
    stopped_early: bool = False
    card: Path | None = None
    checkpoint: Path | None = None
    saved: list[Path] = field(default_factory=list)
    plot: Path | None = None
    samples: int = 0
    eval_samples: int = 0
    skipped_too_long: int = 0
    truncated: int = 0
    seconds: float = 0.0
    tokens: int = 0
    is_main: bool = True
    signal: int | None = None  # SIGINT / SIGTERM that stopped the run (exit 128 + signal)
