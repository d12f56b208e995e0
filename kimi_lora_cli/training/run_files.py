"""The run's summary files in the output folder: `trainer_state.json` (the Hugging Face Trainer's
field names; also inside every checkpoint) and the model card `README.md`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.output_folder import absolute, with_absolute_paths
from kimi_lora_cli.training.preflight import model_locations
from kimi_lora_cli.training.trainer_state import TrainerState, write_state


def planned_epochs(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Epochs the run plans: --num-train-epochs, or what --max-steps makes of them (HF's field
    would otherwise say 3.0 beside an epoch of 15.0)."""
    if cfg.max_steps > 0:
        return round(total_steps / steps_per_epoch, 4)
    return cfg.num_train_epochs


def trainer_state(cfg: TrainConfig, best: TrainerState, step: int, records: list[dict[str, Any]], *,
                  steps_per_epoch: int, total_steps: int, world: int) -> dict[str, Any]:
    """trainer_state.json content for a checkpoint or the output folder."""
    return {"global_step": step, "epoch": round(step / steps_per_epoch, 4), "max_steps": total_steps,
            "num_train_epochs": planned_epochs(cfg, total_steps, steps_per_epoch),
            "logging_steps": cfg.logging_steps, "eval_steps": cfg.eval_steps or cfg.save_steps,
            "save_steps": cfg.save_steps, "train_batch_size": cfg.per_device_train_batch_size, "world_size": world,
            **best.to_dict(), "log_history": records}


def write_run_files(output_dir: Path, cfg: TrainConfig, state: dict[str, Any], best: TrainerState, *, run_id: str,
                    last_eval: dict[str, float], lora: bool, samples: int, eval_samples: int,
                    command: list[str] | None, plot: Path | None) -> Path | None:
    """trainer_state.json and the model card; returns the card (None: the folder holds a README.md
    that is not a kimi-lora card, left as it is)."""
    from kimi_lora_cli.training.model_card import render_card, write_card

    write_state(output_dir, state, tag=run_id)
    records = state["log_history"]
    final = next((r for r in reversed(records) if "loss" in r), {})
    final = {**{k: v for k, v in final.items() if k in ("loss", "text_loss", "audio_loss")}, **last_eval}
    best_record = None
    if best.best_metric is not None:
        best_record = next((r for r in records if r.get("step") == best.best_global_step
                            and best.metric_for_best_model in r), None)
    peft_version = None
    if lora:
        import peft

        peft_version = peft.__version__
    weights, base = model_locations(cfg)
    card = render_card(base_model=absolute(str(base or weights)), config=with_absolute_paths(cfg).to_dict(),
                       samples=samples, eval_samples=eval_samples, steps=state["global_step"], final=final,
                       best=best_record, best_metric=best.metric_for_best_model, holds_best=cfg.load_best_model_at_end,
                       lora=lora, command=command, plot=plot.name if plot else None, peft_version=peft_version)
    return write_card(output_dir, card, tag=run_id)
