"""Shared set-up for the CPU training benchmarks: a tiny checkpoint and a synthetic data set."""

from __future__ import annotations

import tempfile
from pathlib import Path


def workspace(n_samples: int, spec_kwargs: dict | None = None) -> tuple[Path, Path, Path]:
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.loading import inspect_folder
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="kimi-lora-bench-"))
    model = build_tiny_checkpoint(root / "tiny", TinySpec(**(spec_kwargs or {})))
    data = write_synthetic_dataset(root / "data", inspect_folder(model).config, n=n_samples, seed=0)
    return root, model, data


def run(model: Path, data: Path, out: Path, **values):
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    base = dict(data_path=str(data), model_name_or_path=str(model), output_dir=str(out), use_lora=True,
                device="cpu", logging_steps=1, save_steps=10**9, learning_rate=1e-4, seed=0)
    base.update(values)
    trainer = Trainer(TrainConfig.build(flag_values=base), Reporter(enabled=False))
    trainer.setup()
    return trainer, trainer.run()
