"""`CheckpointClient`: the one object a training run saves and loads its weights through: atomic
`checkpoint-N/` folders with everything a resume needs, the resume itself, restoring the best
checkpoint's trainable weights, and the final adapter / full model. The model, optimizer and
scheduler are passed to each call; what the client holds is the run's fixed context (folder, engine,
process rank).

Under FSDP every tensor is gathered to full size before it is saved (the files are the same as an
unsharded run's), and on loading each process reads only the rows it holds. DeepSpeed runs keep the
engine's own files under `deepspeed/`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, remove_tree, save_torch
from kimi_lora_cli.outputs import write_marker
from kimi_lora_cli.training.checkpoints import folder as ckpt
from kimi_lora_cli.training.checkpoints.final import atomic_files, save_adapter, save_full_model
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import gathered_named_parameters
from kimi_lora_cli.training.optim import resync_learning_rate


@dataclass
class CheckpointClient:
    cfg: TrainConfig
    output_dir: Path
    accelerator: Any
    run_id: str
    series: str
    tmp_name: Any  # OutputDir.tmp_name: a temporary entry of this run, cleaned if it dies
    rank: int = 0
    is_main: bool = True
    lora: bool = True  # an adapter (else the full model) is what a save holds
    deepspeed: bool = False
    fsdp: Any = None  # FsdpRun when the model is sharded by kimi-lora
    loaded: Any = None  # LoadedModel: configs and tokenizer files copied next to a full model

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
             best: str | None = None) -> Path:
        """Write `checkpoint-N` (trainable tensors, optimizer, scheduler, RNG, adapter, then
        `trainer_state.json` = `state` + this run's series and id, last), then rotate older ones
        of the series by --save-total-limit, never `best`."""
        final = self.output_dir / f"checkpoint-{step}"
        tmp = ckpt.tmp_dir_for(self.output_dir, step, self.run_id)
        return self._in_fresh_tmp(tmp, lambda: self._write(model, optimizer, scheduler, state, tmp, final, best))

    def _write(self, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], tmp: Path, final: Path,
               best: str | None) -> Path:
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model)
        if self.deepspeed:
            model.save_checkpoint(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
        trainable = gathered_named_parameters(unwrapped, acc)
        optim_state = None
        if self.fsdp is not None:  # every process takes part in gathering the sharded state
            optim_state = self.fsdp.full_optimizer_state(optimizer, keep=self.is_main)
        elif self.is_main and not self.deepspeed:
            optim_state = optimizer.state_dict()
        if self.is_main:
            if not self.deepspeed:
                ckpt.save_tensors(trainable, tmp / "trainable.safetensors")
                save_torch(optim_state, tmp / "optimizer.pt")
            save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            if self.lora:
                save_adapter(unwrapped, trainable, tmp)
        ckpt.save_rng(tmp, self.rank)
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.finish(tmp, final, {**state, "series": self.series, "run_id": self.run_id})
            ckpt.rotate(self.output_dir, self.cfg.save_total_limit, self.series,
                        keep=[final] + ([Path(best)] if best else []))
        acc.wait_for_everyone()
        return final

    def load(self, folder: Path, model: Any, optimizer: Any, scheduler: Any,
             state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Put a checkpoint's trainable weights, optimizer, scheduler and RNG back; returns its
        trainer_state.json. The schedule follows THIS run's learning rate (a resume may change it)."""
        state = state or ckpt.read_state(folder)
        if self.deepspeed:
            model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
        else:
            path = folder / "trainable.safetensors"
            shapes = ckpt.tensor_shapes(path)
            params = dict(self.accelerator.unwrap_model(model).named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in shapes]
            if missing:
                raise ConfigError(f"{folder}: checkpoint lacks {len(missing)} trainable tensors ({missing[0]}, ...); "
                                  "it comes from a run with other targets")
            wrong = [n for n, shape in shapes.items() if n in params and shape != tuple(params[n].shape)]
            if wrong:
                raise ConfigError(f"{folder}: tensor {wrong[0]} has shape {shapes[wrong[0]]}, this "
                                  f"run's is {tuple(params[wrong[0]].shape)}; it comes from a run with other settings")
            self._fill_trainable(path, model)
            optim_state = ckpt.load_torch_file(folder / "optimizer.pt")
            if self.fsdp is not None:
                optim_state = self.fsdp.local_optimizer_state(optim_state, optimizer)
            optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(ckpt.load_torch_file(folder / "scheduler.pt"))
        resync_learning_rate(optimizer, scheduler, self.cfg.learning_rate)
        rng = ckpt.load_rng(folder, self.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        return state

    def restore_trainable(self, folder: Path, model: Any) -> None:
        """Only the trainable weights of a checkpoint (the best one, before the final save)."""
        if self.deepspeed:
            model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False,
                                  load_optimizer_states=False, load_lr_scheduler_states=False)
        else:
            self._fill_trainable(folder / "trainable.safetensors", model)

    def _fill_trainable(self, path: Path, model: Any) -> None:
        """Copy a checkpoint's trainable tensors into the model (each process reads only its rows)."""
        from safetensors import SafetensorError

        from kimi_lora_cli.errors import ModelLoadError
        from kimi_lora_cli.sharded import fill_from_file

        params = {n: [p] for n, p in self.accelerator.unwrap_model(model).named_parameters()}
        try:
            fill_from_file(path, params)
        except (ModelLoadError, SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: unreadable ({str(e).splitlines()[0][:160]}); resume from another "
                              "checkpoint") from None

    # -- the final adapter / model --------------------------------------------------------------
    def save_final(self, model: Any) -> list[Path]:
        """The adapter (or the full model) into the output folder, each file renamed into place."""
        tmp = self.tmp_name("final")
        return self._in_fresh_tmp(tmp, lambda: self._write_final(model, tmp))

    def _write_final(self, model: Any, tmp: Path) -> list[Path]:
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model)
        files: list[Path] = []
        if self.lora:
            trainable = gathered_named_parameters(unwrapped, acc)
            if self.is_main:
                save_adapter(unwrapped, trainable, tmp)
        else:
            if self.fsdp is not None:
                state = gathered_named_parameters(unwrapped, acc, only_trainable=False)
            else:
                state = acc.get_state_dict(model)
            if self.is_main:
                save_full_model(state, tmp, self.cfg, self.loaded)
        acc.wait_for_everyone()
        if self.is_main:
            files = atomic_files(tmp, self.output_dir)
        acc.wait_for_everyone()
        return files

    def _in_fresh_tmp(self, tmp: Path, write: Any) -> Any:
        """`write()` into a new temporary folder of this run (rank 0 creates and marks it); on any
        failure the folder is removed, so nothing half-written stays behind."""
        try:
            if self.is_main:
                remove_tree(tmp)
                with naming_errors(tmp):
                    tmp.mkdir(parents=True)
                write_marker(tmp, "train", run_id=self.run_id)
            self.accelerator.wait_for_everyone()
            return write()
        except BaseException:
            if self.is_main:
                remove_tree(tmp)
            raise
