"""Checkpoints and final saves of a training run (a part of `Trainer`, split out for size): atomic
`checkpoint-N/` folders with everything a resume needs, the resume itself, restoring the best
checkpoint's weights, and the final adapter / full model.

Under FSDP every tensor is gathered to full size before it is saved (the files are the same as an
unsharded run's), and on loading each process reads only the rows it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, remove_tree, save_torch
from kimi_lora_cli.outputs import write_marker
from kimi_lora_cli.training import checkpoint as ckpt
from kimi_lora_cli.training.distributed import gathered_named_parameters
from kimi_lora_cli.training.optim import resync_learning_rate
from kimi_lora_cli.training.output import resolved_paths
from kimi_lora_cli.training.saving import atomic_files, save_adapter, save_full_model


class CheckpointMixin:
    """Expects the Trainer's attributes: cfg, accelerator, model, optimizer, scheduler, out, output_dir,
    selection, deepspeed, fsdp, rank, world, is_main, loaded, state, metrics, data_sha256, resume_state."""

    def _in_fresh_tmp(self, tmp: Path, write: Any) -> Any:
        """`write()` into a new temporary folder of this run (rank 0 creates and marks it); on any
        failure the folder is removed, so nothing half-written stays behind."""
        try:
            if self.is_main:
                remove_tree(tmp)
                with naming_errors(tmp):
                    tmp.mkdir(parents=True)
                write_marker(tmp, "train", run_id=self.out.run_id)
            self.accelerator.wait_for_everyone()
            return write()
        except BaseException:
            if self.is_main:
                remove_tree(tmp)
            raise

    def save_checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        tmp = ckpt.tmp_dir_for(self.output_dir, step, self.out.run_id)
        return self._in_fresh_tmp(tmp, lambda: self._write_checkpoint(step, extra, tmp, final))

    def _write_checkpoint(self, step: int, extra: dict[str, Any], tmp: Path, final: Path) -> Path:
        acc = self.accelerator
        unwrapped = self._unwrapped()
        if self.deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
        trainable = gathered_named_parameters(unwrapped, acc)
        optimizer = None
        if self.fsdp is not None:  # every process takes part in gathering the sharded state
            optimizer = self.fsdp.full_optimizer_state(self.optimizer, keep=self.is_main)
        elif self.is_main and not self.deepspeed:
            optimizer = self.optimizer.state_dict()
        if self.is_main:
            if not self.deepspeed:
                ckpt.save_tensors(trainable, tmp / "trainable.safetensors")
                save_torch(optimizer, tmp / "optimizer.pt")
            save_torch(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.selection is not None:
                save_adapter(unwrapped, trainable, tmp)
        ckpt.save_rng(tmp, self.rank)
        acc.wait_for_everyone()
        if self.is_main:
            state = {**self._state_dict(step, self.metrics.records),
                     "global_batch": self.world * self.cfg.per_device_train_batch_size
                     * self.cfg.gradient_accumulation_steps, "config": self.cfg.to_dict(),
                     "paths": resolved_paths(self.cfg), "data_sha256": self.data_sha256,
                     "series": self.out.series, "run_id": self.out.run_id, **extra}
            ckpt.finish(tmp, final, state)
            best = self.state.best_model_checkpoint
            ckpt.rotate(self.output_dir, self.cfg.save_total_limit, self.out.series,
                        keep=[final] + ([Path(best)] if best else []))
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        state = self.resume_state or ckpt.read_state(folder)
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
        else:
            path = folder / "trainable.safetensors"
            shapes = ckpt.tensor_shapes(path)
            params = dict(self._unwrapped().named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in shapes]
            if missing:
                raise ConfigError(f"{folder}: checkpoint lacks {len(missing)} trainable tensors ({missing[0]}, ...); "
                                  "it comes from a run with other targets")
            wrong = [n for n, shape in shapes.items() if n in params and shape != tuple(params[n].shape)]
            if wrong:
                raise ConfigError(f"{folder}: tensor {wrong[0]} has shape {shapes[wrong[0]]}, this "
                                  f"run's is {tuple(params[wrong[0]].shape)}; it comes from a run with other settings")
            self._fill_trainable(path)
            optimizer = ckpt.load_torch_file(folder / "optimizer.pt")
            if self.fsdp is not None:
                optimizer = self.fsdp.local_optimizer_state(optimizer, self.optimizer)
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(ckpt.load_torch_file(folder / "scheduler.pt"))
        resync_learning_rate(self.optimizer, self.scheduler, self.cfg.learning_rate)
        rng = ckpt.load_rng(folder, self.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        return state

    def save_final(self) -> list[Path]:
        tmp = self.out.tmp_name("final")
        return self._in_fresh_tmp(tmp, lambda: self._write_final(tmp))

    def _write_final(self, tmp: Path) -> list[Path]:
        acc = self.accelerator
        unwrapped = self._unwrapped()
        files: list[Path] = []
        if self.selection is not None:
            trainable = gathered_named_parameters(unwrapped, acc)
            if self.is_main:
                save_adapter(unwrapped, trainable, tmp)
        else:
            if self.fsdp is not None:
                state = gathered_named_parameters(unwrapped, acc, only_trainable=False)
            else:
                state = acc.get_state_dict(self.model)
            if self.is_main:
                save_full_model(state, tmp, self.cfg, self.loaded)
        acc.wait_for_everyone()
        if self.is_main:
            files = atomic_files(tmp, self.output_dir)
        acc.wait_for_everyone()
        return files

    def _fill_trainable(self, path: Path) -> None:
        """Copy a checkpoint's trainable tensors into the model (each process reads only its rows)."""
        from safetensors import SafetensorError

        from kimi_lora_cli.errors import ModelLoadError
        from kimi_lora_cli.sharded import fill_from_file

        params = {n: [p] for n, p in self._unwrapped().named_parameters()}
        try:
            fill_from_file(path, params)
        except (ModelLoadError, SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: unreadable ({str(e).splitlines()[0][:160]}); resume from another "
                              "checkpoint") from None

    def _load_best(self) -> None:
        """Put the best checkpoint's trainable weights back, so the final save is the best model."""
        best = self.state.best_model_checkpoint
        if best is None:
            return
        folder = Path(best)
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
        else:
            self._fill_trainable(folder / "trainable.safetensors")
        self.reporter.print(f"Loaded the best checkpoint {folder.name} ({self.state.metric_for_best_model} "
                            f"{self.state.best_metric:.4f}) as the final {'adapter' if self.selection else 'model'}.")
