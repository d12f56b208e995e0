"""Evaluation, best-model tracking, early stopping and the run's summary files (a part of `Trainer`,
split out for size): the start banner, evaluations with their log lines, trainer_state.json and the
model card."""

from __future__ import annotations

from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.distributed import deepspeed_config
from kimi_lora_cli.training.reporting import MetricsLog
from kimi_lora_cli.training.result import TrainResult
from kimi_lora_cli.training.setup import model_locations


class EvaluationMixin:
    """Expects the Trainer's attributes: cfg, dataset, eval_idx, train_idx, store, accelerator, model,
    reporter, state, selection, deepspeed, fsdp, rank, world, is_main, device, steps_per_epoch, total_steps,
    output_dir, command."""

    def _make_evaluator(self, tokenizer: Any, config: Any) -> Any:
        from kimi_lora_cli.training.evaluation import Evaluator, default_max_new_tokens, generation_samples

        cfg = self.cfg
        generate = []
        if cfg.eval_generate_count:
            generate = generation_samples(self.dataset.samples, self.eval_idx, cfg.eval_generate_count)
            if not generate:
                raise ConfigError("--eval-generate: no evaluation conversation ends with an assistant text answer "
                                  "to score")
        sharded = self.fsdp is not None or bool(self.deepspeed and deepspeed_config(cfg, self.world)
                                                 .get("zero_optimization", {}).get("stage", 0) == 3)
        return Evaluator(indices=self.eval_idx, batch_size=cfg.eval_batch_size,
                         decode_batch_size=cfg.decode_batch_size, rank=self.rank,
                         world=self.world, reduce=self._reduce, to_device=self._batch,
                         text_weight=cfg.text_loss_weight, audio_weight=cfg.audio_loss_weight, generate=generate,
                         tokenizer=tokenizer, config=config, store=self.store,
                         max_new_tokens=cfg.eval_max_new_tokens or default_max_new_tokens(generate, tokenizer),
                         sharded=sharded, autocast=self.accelerator.autocast, plan=self.plan)

    def _banner(self) -> None:
        from kimi_lora_cli.formatting import human_count

        cfg = self.cfg
        per_step = self.world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        from kimi_lora_cli.quantization import logical_numel

        trainable = sum(p.numel() for p in self._unwrapped().parameters() if p.requires_grad)
        total = sum(logical_numel(p) for p in self._unwrapped().parameters())
        precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
        engine = f"DeepSpeed {cfg.deepspeed}" if cfg.deepspeed else "DDP" if self.world > 1 else "single process"
        if self.fsdp is not None:
            engine = "FSDP" + (", CPU offload" if self.fsdp.settings.cpu_offload else "")
        targets = f"LoRA r={cfg.lora_rank} on {len(self.selection.names)} modules ({cfg.lora_target})" \
            if self.selection is not None else "full fine-tuning"
        rows = [("World size", f"{self.world} ({engine}, {self.device})"),
                ("Batch", f"{cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
                          f"accumulation x {self.world} processes = {per_step} "
                          f"{'packed rows' if cfg.packing else 'samples'} per step"),
                *([("Packing", self.plan.packing_summary())] if cfg.packing else []),
                ("Steps", f"{self.steps_per_epoch} per epoch, {self.total_steps} in total"),
                ("Trainable", f"{human_count(trainable)} of {human_count(total)} parameters "
                              f"({100.0 * trainable / max(total, 1):.3f}%)"),
                ("Precision", precision + (", gradient checkpointing" if cfg.gradient_checkpointing else "")),
                ("Targets", targets)]
        if cfg.quantization:
            import torch

            from kimi_lora_cli.quantization import quant_spec, summary
            from kimi_lora_cli.training.setup import load_dtype

            spec = quant_spec(cfg.quantization, cfg.double_quant)
            rows.append(("Quantized", summary(self._unwrapped(), spec, getattr(torch, load_dtype(cfg)), True)))
        if self.eval_idx:
            gen = len(self.evaluator.generate)
            rows.append(("Evaluation", f"{len(self.eval_idx)} samples" + (f", {gen} decoded for WER/CER" if gen else "")))
        self.reporter.banner(rows)

    def evaluate(self) -> dict[str, float]:
        metrics = self.evaluator.evaluate(self.model, self._unwrapped())
        pairs = self.evaluator.last_pairs if "eval_wer" in metrics else []
        if pairs and self.is_main:
            self.reporter.eval_pairs(pairs)
        return metrics

    # -- evaluation, best model, early stopping -----------------------------------------------
    def _evaluate_and_track(self, step: int, epoch: float, metrics: MetricsLog, result: TrainResult) -> None:
        ev = self.evaluate()
        record = {"step": step, "epoch": round(epoch, 4), **ev}
        metrics.write(record)
        result.last_eval_loss, result.last_eval = ev["eval_loss"], ev
        checkpoint = self.output_dir / f"checkpoint-{step}"
        best = self.state.observe(ev, step, checkpoint, self.cfg.early_stopping_threshold)
        text = f"eval at step {step}: loss {ev['eval_loss']:.4f} (text {ev['eval_text_loss']:.4f} audio " \
               f"{ev['eval_audio_loss']:.4f})"
        if "eval_wer" in ev:
            text += f", WER {ev['eval_wer']:.4f} CER {ev['eval_cer']:.4f} on {ev['eval_generated']} decoded"
        if best:
            text += f" [bold]best {self.state.metric_for_best_model}[/]"
        self.reporter.print(text)

    def _should_stop_early(self) -> bool:
        patience = self.cfg.early_stopping_patience
        if patience and self.state.early_stopping_patience_counter >= patience:
            self.reporter.print(f"Early stopping: {self.state.metric_for_best_model} has not improved by more than "
                                f"{self.cfg.early_stopping_threshold} for {patience} evaluations (best "
                                f"{self.state.best_metric:.4f} at step {self.state.best_global_step}).")
            return True
        return False

    def _state_dict(self, step: int, records: list[dict[str, Any]]) -> dict[str, Any]:
        """trainer_state.json content (HF field names) for a checkpoint or the output folder."""
        cfg = self.cfg
        return {"global_step": step, "epoch": round(step / self.steps_per_epoch, 4), "max_steps": self.total_steps,
                "num_train_epochs": cfg.num_train_epochs, "logging_steps": cfg.logging_steps,
                "eval_steps": cfg.eval_steps or cfg.save_steps, "save_steps": cfg.save_steps,
                "train_batch_size": cfg.per_device_train_batch_size, "world_size": self.world,
                **self.state.to_dict(), "log_history": records}

    def _write_run_files(self, result: TrainResult, records: list[dict[str, Any]], step: int) -> None:
        from kimi_lora_cli.training.model_card import render_card, write_card
        from kimi_lora_cli.training.state import write_state

        write_state(self.output_dir, self._state_dict(step, records))
        final = next((r for r in reversed(records) if "loss" in r), {})
        final = {**{k: v for k, v in final.items() if k in ("loss", "text_loss", "audio_loss")}, **result.last_eval}
        best = None
        if self.state.best_metric is not None:
            best = next((r for r in records if r.get("step") == self.state.best_global_step
                         and self.state.metric_for_best_model in r), None)
        peft_version = None
        if self.selection is not None:
            import peft

            peft_version = peft.__version__
        weights, base = model_locations(self.cfg)
        card = render_card(base_model=str(base or weights), config=self.cfg.to_dict(), samples=len(self.train_idx),
                           eval_samples=len(self.eval_idx), steps=step, final=final, best=best,
                           best_metric=self.state.metric_for_best_model, holds_best=self.cfg.load_best_model_at_end,
                           lora=self.selection is not None, command=self.command,
                           plot=result.plot.name if result.plot else None, peft_version=peft_version)
        result.card = write_card(self.output_dir, card)
        if result.card is None:
            self.reporter.print(f"[yellow]Note:[/] {self.output_dir / 'README.md'} is not a kimi-lora model card; "
                                "left as it is (no card written)")
