"""`trainer_state.json` with the Hugging Face Trainer's field names (log history, best metric and
checkpoint), the best-model bookkeeping behind --metric-for-best-model, and early stopping.

Best model: after each evaluation the watched metric is compared with the best so far (strictly
better, as the HF Trainer does); the checkpoint saved at that evaluation becomes
`best_model_checkpoint`. Early stopping (HF `EarlyStoppingCallback`): an evaluation counts as an
improvement only when it beats the best by more than the threshold; after `patience` evaluations
without one, training stops.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
LOWER_IS_BETTER = ("loss", "wer", "cer")


def default_greater_is_better(metric: str) -> bool:
    """HF's rule: metrics named like a loss or an error rate are minimised, anything else maximised."""
    return not any(word in metric for word in LOWER_IS_BETTER)


@dataclass
class TrainerState:
    metric_for_best_model: str | None = None
    greater_is_better: bool = False
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    best_global_step: int | None = None
    early_stopping_patience_counter: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any], metric: str | None, greater_is_better: bool) -> TrainerState:
        """The best-model fields of a checkpoint's state (what a resumed run continues from)."""
        state = cls(metric, greater_is_better)
        if data.get("metric_for_best_model") == metric:
            state.best_metric = data.get("best_metric")
            state.best_model_checkpoint = data.get("best_model_checkpoint")
            state.best_global_step = data.get("best_global_step")
            state.early_stopping_patience_counter = int(data.get("early_stopping_patience_counter", 0))
        state.log_history = list(data.get("log_history") or [])
        return state

    def better(self, value: float, than: float | None, threshold: float = 0.0) -> bool:
        if than is None:
            return True
        return value - than > threshold if self.greater_is_better else than - value > threshold

    def observe(self, metrics: dict[str, Any], step: int, checkpoint: Path | None, threshold: float = 0.0) -> bool:
        """Record an evaluation; True when it is the new best. Updates the early-stopping counter."""
        if self.metric_for_best_model is None or self.metric_for_best_model not in metrics:
            return False
        value = float(metrics[self.metric_for_best_model])
        if self.better(value, self.best_metric, threshold):
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1
        if self.better(value, self.best_metric):
            self.best_metric = value
            self.best_global_step = step
            self.best_model_checkpoint = str(checkpoint) if checkpoint is not None else None
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_state(folder: Path, state: dict[str, Any], tag: str | None = None) -> Path:
    """trainer_state.json in `folder`, written to a temporary name and renamed (`tag`: the run id
    the temporary name carries, so a killed run's is recognised and removed)."""
    from kimi_lora_cli.fileops import write_atomic

    path = folder / STATE_FILE
    write_atomic(path, json.dumps(state, indent=1), tag=tag)
    return path
