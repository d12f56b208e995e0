"""The training run: pre-flight -> accelerate -> load (meta build, wrap, shard, fill) -> loop -> saves.

`train(cfg)` is what `kimi-lora train` calls; the same function runs in every process under
`torchrun` / `accelerate launch` (DDP), with `--fsdp` (FSDP2) and with `--deepspeed` (ZeRO-2/3). The
model is built on the meta device and each process reads its weights straight onto its device (with
FSDP only its own shard, with ZeRO-3 one layer at a time before DeepSpeed keeps its partition), so no
process holds a full CPU copy first. One optimizer step takes
`world * per_device * accumulation` samples of the deterministic batch plan; each rank's loss is scaled
so the step's gradient is that of the mean per-sample loss over the whole global batch.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from kimi_lora_cli.fileops import write_atomic
from kimi_lora_cli.sharded import as_plain
from kimi_lora_cli.training.checkpoints import folder as ckpt
from kimi_lora_cli.training.checkpoints.client import CheckpointClient
from kimi_lora_cli.training.checkpoints.final import final_save_error
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import deepspeed_config, env_rank, env_world, full_numel, is_zero3
from kimi_lora_cli.training.engines import engine_name, load_for_training, make_accelerator
from kimi_lora_cli.training.evaluation import EvaluationTracker, build_evaluator
from kimi_lora_cli.training.optim import check_scheduler, make_optimizer, make_scheduler
from kimi_lora_cli.training.output_folder import (
    OutputDir,
    absolute,
    check_resume,
    data_digest,
    resolved_paths,
    with_absolute_paths,
)
from kimi_lora_cli.training.preflight import check_data_and_targets, load_dtype, model_locations
from kimi_lora_cli.training.reporting import MetricsLog, Reporter, banner_rows, parse_report_to, plot_losses
from kimi_lora_cli.training.result import TrainResult
from kimi_lora_cli.training.run_files import trainer_state, write_run_files
from kimi_lora_cli.training.signals import StopFlag
from kimi_lora_cli.training.trainer_state import TrainerState

CONFIG_FILE = "train_config.yaml"


class Trainer:
    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None) -> None:
        from kimi_lora_cli.training import fsdp, zero

        cfg, self.launcher_notes = fsdp.from_launcher(cfg)  # `accelerate launch --use_fsdp` -> --fsdp
        cfg, notes = zero.from_launcher(cfg)  # `accelerate launch --use_deepspeed` -> --deepspeed
        self.launcher_notes += notes
        self.cfg = cfg
        self.fsdp = None  # FsdpRun when the model is sharded
        self.engine = None  # the DeepSpeedEngine with --deepspeed
        self.rank = env_rank()
        self.world = env_world()
        self.is_main = self.rank == 0
        self.reporter = reporter or Reporter(enabled=self.is_main)
        if self.rank != 0:
            self.reporter.enabled = False
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.out = OutputDir(cfg)
        self.command: list[str] | None = None  # the command line, for the model card
        # Behave as if Ctrl-C came during this step (tests and drills of the interruption path).
        self.stop_after: int | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check everything that can be checked without weights, claim the output folder, then load
        and wrap the model (the folder's lock is released again if that fails)."""
        self._check_inputs()
        try:
            self._build()
        except BaseException:
            self._release(before_start=True)
            raise

    def _check_inputs(self) -> None:
        import torch

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        say = self.reporter.print
        parse_report_to(cfg.report_to)  # a missing tracker package fails here, before any weight is read
        check_scheduler(cfg, max(cfg.max_steps, 1))  # and --lr-scheduler-kwargs the schedule does not take
        self.ds_config = None
        if cfg.deepspeed:
            from kimi_lora_cli.training.zero import require_deepspeed

            require_deepspeed(cfg.deepspeed)
            self.ds_config = deepspeed_config(cfg, self.world)
        for note in self.launcher_notes:
            say(f"[yellow]Note:[/] {note}")
        self.resume_dir, self.resume_state = None, None
        if cfg.resume_from_checkpoint:
            latest = cfg.resume_from_checkpoint in ckpt.LATEST
            if latest and self.output_dir.is_dir() and not ckpt.list_checkpoints(self.output_dir):
                raise self.out.no_checkpoint()  # (a folder that does not exist: find_checkpoint says so)
            self.resume_dir = ckpt.find_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        self.out.check(resuming=self.resume_dir is not None)
        self.data_sha256 = data_digest(cfg)  # every rank: they must agree on refusing a resume
        if self.resume_dir is not None:
            self.resume_state = ckpt.read_state(self.resume_dir)
            for change in check_resume(cfg, self.resume_state, self.resume_dir, self.world, self.data_sha256):
                say(f"[bold]Resuming[/] with {change}")

        # Data and targets are checked against config + tokenizer (no tensor read) before the
        # weights load, so a typo costs seconds, not a 20 GB load.
        checked = check_data_and_targets(cfg, self.world, say)
        skeleton, self.data = checked.skeleton, checked.data
        if self.ds_config is not None:
            from kimi_lora_cli.training.distributed import fill_model_sizes

            fill_model_sizes(self.ds_config, skeleton.config)
        self.samples, self.train_idx, self.eval_idx = checked.samples, checked.train_idx, checked.eval_idx
        if self.is_main:
            self.out.claim(self.resume_state)  # created and locked only now, before the weights load
            for note in self.out.notes:
                say(f"[yellow]Note:[/] {note}")
        say(f"[bold]Output[/] {escape(absolute(str(self.output_dir)))}", soft_wrap=True)
        if not cfg.lora_enabled:
            from kimi_lora_cli.formatting import human_count

            weights_count = sum(p.numel() for p in skeleton.model.parameters())
            say(f"[bold yellow]Warning:[/] no --use-lora, so this is full fine-tuning: all {human_count(weights_count)} "
                "weights are trained (memory for their gradients and optimizer state too) and the output is a "
                "full copy of the model; add --use-lora to train a small LoRA adapter", soft_wrap=True)
        self.skeleton = skeleton

    def _build(self) -> None:
        from kimi_lora_cli.data.dataset import KimiDataset
        from kimi_lora_cli.data.features import FeatureStore

        cfg, skeleton, say = self.cfg, self.skeleton, self.reporter.print
        config = skeleton.config
        has_audio_free = any(not s.seq.media for s in self.data.samples)
        acc, self.owns_group = make_accelerator(cfg, self.world, has_audio_free)
        self.accelerator = acc
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            ids = broadcast_object_list([self.out.run_id, self.out.series])
            self.out.run_id, self.out.series = ids
        self.device = acc.device
        weights, base = model_locations(cfg)
        say(f"[bold]Loading[/] {weights}" + (f" (tokenizer and Whisper from {base})" if base else ""))
        built = load_for_training(cfg, weights, base, self.device, self.ds_config)
        self.loaded, self.selection, self.fsdp = built.loaded, built.selection, built.fsdp
        self.model = model = built.loaded.model
        self._report_parameters()
        encoder = self.loaded.feature_encoder
        encoder.encoder.to(self.device)
        store = FeatureStore(encoder, cache_dir=cfg.feature_cache_dir)
        self.store = store
        self.dataset = KimiDataset(self.samples, skeleton.tokenizer.pad, config.kimia_adaptor_input_dim, store)

        from kimi_lora_cli.training.plan import BatchPlan

        self.fixed_micro = bool(cfg.deepspeed)
        self.plan = BatchPlan(self.train_idx, self.dataset.lengths(), cfg.seed, self.world, self.rank,
                              cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.group_by_length,
                              self.fixed_micro, cfg.row_length(config.max_position_embeddings))
        self.total_steps = self.plan.total_steps(cfg.num_train_epochs, cfg.max_steps)
        self.steps_per_epoch = max(1, self.plan.steps_per_epoch())
        optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(optimizer, cfg, self.total_steps)
        if cfg.quantization:  # each process quantized the same files: DDP need not broadcast them
            from kimi_lora_cli.quantization import is_quantized_weight

            model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters()
                                                       if is_quantized_weight(p)]
        if self.fsdp is not None:  # sharded by kimi-lora; accelerate must not wrap it again
            self.model, self.optimizer = model, acc.prepare(optimizer)
        elif cfg.deepspeed:  # the engine steps this optimizer; the schedule above sets its learning rate
            from kimi_lora_cli.training.zero import initialize

            self.engine = initialize(model, optimizer, self.ds_config)
            self.model, self.optimizer = self.engine, optimizer
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.deepspeed = self.engine is not None
        self.checkpoints = CheckpointClient(cfg, self.output_dir, acc, self.out.run_id, self.out.series,
                                            self.out.tmp_name, rank=self.rank, is_main=self.is_main,
                                            lora=self.selection is not None, deepspeed=self.deepspeed, fsdp=self.fsdp,
                                            loaded=self.loaded, world=self.world)
        self.evaluation = self._make_evaluation(skeleton.tokenizer, config)
        self._banner()

    def _make_evaluation(self, tokenizer: Any, config: Any) -> EvaluationTracker:
        cfg = self.cfg
        sharded = self.fsdp is not None or (self.engine is not None and self.engine.zero_optimization_stage() == 3)
        evaluator = build_evaluator(cfg, self.dataset.samples, self.eval_idx, tokenizer=tokenizer, config=config,
                                    rank=self.rank, world=self.world, reduce=self._reduce, to_device=self._batch,
                                    store=self.store, sharded=sharded, autocast=self.accelerator.autocast,
                                    plan=self.plan)
        return EvaluationTracker(evaluator, cfg, self.output_dir, say=self.reporter.print,
                                 show_pairs=self.reporter.eval_pairs if self.is_main else None)

    def _banner(self) -> None:
        from kimi_lora_cli.quantization import logical_numel

        params = list(self._unwrapped().parameters())
        rows = banner_rows(
            self.cfg, world=self.world, engine=engine_name(self.model, self.engine, self.fsdp), device=self.device,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
            trainable=sum(full_numel(p) for p in params if p.requires_grad),
            total=sum(full_numel(p) if is_zero3(p) else logical_numel(p) for p in params),
            lora_modules=len(self.selection.names) if self.selection is not None else None,
            packing=self.plan.packing_summary() if self.cfg.packing else None, eval_samples=len(self.eval_idx),
            decoded=len(self.evaluation.evaluator.generate))
        if self.cfg.quantization:
            import torch

            from kimi_lora_cli.quantization import quant_spec, summary

            spec = quant_spec(self.cfg.quantization, self.cfg.double_quant)
            rows.append(("Quantized", summary(self._unwrapped(), spec, getattr(torch, load_dtype(self.cfg)), True)))
        self.reporter.banner(rows)

    def _report_parameters(self) -> None:
        from kimi_lora_cli.training.lora import parameter_rows

        enc = self.loaded.feature_encoder
        whisper = sum(p.numel() for p in enc.encoder.parameters()) if enc is not None else 0
        rows = parameter_rows(self.model, self.loaded.config.kimia_mimo_transformer_from_layer_index, whisper)
        if self.selection is not None:
            c = self.cfg
            kind = "DoRA" if c.use_dora else "rsLoRA" if c.use_rslora else "LoRA"
            title = (f"{kind} r={c.lora_rank} alpha={c.lora_alpha} on {len(self.selection.names)} modules "
                     f"(--lora-target {c.lora_target!r})")
        else:
            title = "Full fine-tuning (Whisper frozen)"
        self.reporter.parameter_table(rows, title)

    # -- pieces of the loop ---------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> dict[str, Any]:
        from kimi_lora_cli.data.collate import batch_to

        return batch_to(self.dataset.batch(indices), self.device)

    def _reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def _unwrapped(self) -> Any:
        return self.engine.module if self.engine is not None else self.accelerator.unwrap_model(self.model)

    def _no_sync(self) -> Any:
        """Skip the gradient reduction (all but the last micro-batch of a step)."""
        return self.fsdp.no_sync() if self.fsdp is not None else self.accelerator.no_sync(self.model)

    def _micro_step(self, batch: dict[str, Any], last: bool, scale: float) -> Any:
        """Forward and backward of one micro-batch (`scale`: this rank's share of the step's mean);
        the gradients are reduced on the `last` one. Returns the loss parts."""
        from kimi_lora_cli.training.loss import compute_loss

        cfg = self.cfg
        if self.engine is not None:  # DeepSpeed reduces (and steps) at the boundary we set
            self.engine.set_gradient_accumulation_boundary(last)
            with self.accelerator.autocast():
                parts = compute_loss(self.engine, batch, cfg.text_loss_weight, cfg.audio_loss_weight)
            self.engine.backward(parts.total.sum() * scale, scale_wrt_gas=False)
            self.engine.step()
            return parts
        with contextlib.nullcontext() if last else self._no_sync():
            parts = compute_loss(self.model, batch, cfg.text_loss_weight, cfg.audio_loss_weight)
            self.accelerator.backward(parts.total.sum() * scale)
        return parts

    def _optimizer_step(self, trainable: list[Any]) -> Any:
        """Clip, step and clear the gradients (DeepSpeed did all that in its step at the boundary);
        returns the gradient norm before clipping (None without clipping)."""
        cfg, acc = self.cfg, self.accelerator
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm() if cfg.max_grad_norm > 0 else None
        else:
            norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            self.optimizer.step()
        self.scheduler.step()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            result = self._run()
        except BaseException:
            self._release()
            raise
        self._release(together=True)
        return result

    def _release(self, together: bool = False, before_start: bool = False) -> None:
        """Unlock the output folder; destroy the process group this run created (FSDP). `together`:
        the run ended normally, so every process first waits for the others (a process that tears its
        connections down while another still uses them aborts). `before_start`: set-up failed, so a
        folder this run created and left empty is removed."""
        self.out.release(before_start=before_start)
        if getattr(self, "owns_group", False):
            import torch.distributed as dist

            if dist.is_initialized():
                if together and dist.get_world_size() > 1:
                    dist.barrier()
                dist.destroy_process_group()
            self.owns_group = False

    def _run(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(output_dir=self.output_dir, global_step=0, total_steps=self.total_steps,
                             samples=len(self.train_idx), eval_samples=len(self.eval_idx),
                             skipped_too_long=self.data.skipped_too_long, truncated=self.data.truncated,
                             is_main=self.is_main)
        if self.is_main:
            write_atomic(self.output_dir / CONFIG_FILE, with_absolute_paths(cfg).to_yaml(), tag=self.out.run_id)
        acc.wait_for_everyone()

        start_step, tokens_total = 0, 0
        best = TrainerState(cfg.best_metric_name, cfg.best_greater_is_better)
        if self.resume_dir is not None:
            state = self.checkpoints.load(self.resume_dir, self.model, self.optimizer, self.scheduler,
                                          self.resume_state)
            start_step = int(state["global_step"])
            tokens_total = int(state.get("tokens", 0))
            best = TrainerState.from_dict(state, cfg.best_metric_name, cfg.best_greater_is_better)
            self.reporter.print(f"[bold]Resuming[/] from {self.resume_dir} at step {start_step}")
        self.evaluation.best = best
        metrics = MetricsLog(self.output_dir, self.is_main, cfg.report_to, resume_step=start_step,
                             config=cfg.to_dict(), run_name=cfg.run_name)
        result.global_step = start_step
        if start_step >= self.total_steps:
            self.reporter.print(f"Checkpoint step {start_step} already reaches the {self.total_steps} planned steps.")

        plan = self.plan.steps()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        eval_every = cfg.eval_steps or cfg.save_steps
        do_eval = bool(self.eval_idx) and cfg.evaluation_strategy != "no"
        track_best = best.metric_for_best_model is not None

        def save(step: int, epoch: float) -> Path:
            state = {**trainer_state(cfg, best, step, metrics.records, steps_per_epoch=self.steps_per_epoch,
                                     total_steps=self.total_steps, world=self.world),
                     "global_batch": self.world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                     "config": cfg.to_dict(), "paths": resolved_paths(cfg), "data_sha256": self.data_sha256,
                     "epoch": epoch, "tokens": tokens_total}
            return self.checkpoints.save(step, self.model, self.optimizer, self.scheduler, state,
                                         best=best.best_model_checkpoint)

        window = {"total": 0.0, "text": 0.0, "audio": 0.0, "n": 0.0, "tokens": 0.0}
        window_start = time.perf_counter()
        run_start = time.perf_counter()
        last_saved = None
        self.model.train()
        self.reporter.start(self.total_steps, start_step)
        step = start_step
        try:
            with StopFlag() as stop:
                for k, planned in enumerate(plan):
                    if step >= self.total_steps:
                        break
                    if k < start_step:
                        continue  # already trained before the checkpoint
                    lr = self.scheduler.get_last_lr()[0]
                    n_micro = len(planned.micro)
                    for i, micro in enumerate(planned.micro):
                        last = i == n_micro - 1
                        acc.sync_gradients = last
                        parts = self._micro_step(self._batch(micro), last, self.world / planned.total_samples)
                        window["total"] += float(parts.total.detach().sum())
                        window["text"] += float(parts.text.sum())
                        window["audio"] += float(parts.audio.sum())
                        window["n"] += len(micro)
                        window["tokens"] += parts.tokens
                    grad_norm = self._optimizer_step(trainable)
                    step += 1
                    result.global_step = step
                    epoch = step / self.steps_per_epoch

                    stop_now = stop.requested or (self.stop_after is not None and step >= self.stop_after)
                    if self.world > 1:
                        stop_now = bool(self._reduce([1.0 if stop.requested else 0.0])[0])
                    logged = step % cfg.logging_steps == 0 or step == self.total_steps or stop_now
                    record = None
                    if logged:
                        total, text, audio, n, toks = self._reduce(
                            [window["total"], window["text"], window["audio"], window["n"], window["tokens"]])
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        tokens_total += int(toks)
                        n = max(n, 1.0)
                        record = {"step": step, "epoch": round(epoch, 4), "loss": total / n, "text_loss": text / n,
                                  "audio_loss": audio / n, "learning_rate": lr, "tokens": tokens_total,
                                  "tokens_per_second": toks / elapsed,
                                  "elapsed_seconds": round(time.perf_counter() - run_start, 3)}
                        if grad_norm is not None:
                            record["grad_norm"] = float(as_plain(grad_norm))
                        metrics.write(record)
                        if result.first_loss is None:
                            result.first_loss = record["loss"]
                        result.last_loss = record["loss"]
                        window = dict.fromkeys(window, 0.0)
                        window_start = time.perf_counter()
                    self.reporter.step(step, self.total_steps, record)
                    at_epoch_end = planned.step_in_epoch == self.steps_per_epoch - 1
                    evaluated = do_eval and ((cfg.evaluation_strategy == "steps" and step % eval_every == 0)
                                             or (cfg.evaluation_strategy == "epoch" and at_epoch_end))
                    if evaluated:
                        self.evaluation.track(step, epoch, self.model, self._unwrapped(), metrics, result)
                    # With a watched metric every evaluation saves, so the best one can be restored.
                    if stop_now or step % cfg.save_steps == 0 or (evaluated and track_best):
                        last_saved = save(step, epoch)
                        result.checkpoint = last_saved
                    if stop_now:
                        result.interrupted = True
                        result.signal = stop.signal
                        break
                    if evaluated and self.evaluation.should_stop():
                        result.stopped_early = True
                        break
        finally:
            self.reporter.stop()
        result.tokens = tokens_total
        result.seconds = time.perf_counter() - run_start
        if not result.interrupted:
            already = result.stopped_early or (cfg.evaluation_strategy == "steps" and step % eval_every == 0)
            if do_eval and not already and step > start_step:
                self.evaluation.track(step, step / self.steps_per_epoch, self.model, self._unwrapped(), metrics, result)
                if track_best:  # the end-of-training evaluation competes for best too
                    result.checkpoint = save(step, step / self.steps_per_epoch)
            if cfg.load_best_model_at_end:
                self._load_best(best)
            result.best_metric = best.best_metric
            result.best_checkpoint = best.best_model_checkpoint
            try:
                result.saved = self.checkpoints.save_final(self.model)
            except OSError as e:
                raise self._final_save_failed(e, step, saved=False) from e
            if self.is_main:
                try:
                    result.plot = plot_losses(metrics.records, self.output_dir / "loss_curve.png", tag=self.out.run_id,
                                              note=lambda m: self.reporter.print(f"[yellow]Note:[/] {escape(m)}"))
                    state = trainer_state(cfg, best, step, metrics.records, steps_per_epoch=self.steps_per_epoch,
                                          total_steps=self.total_steps, world=self.world)
                    result.card = write_run_files(self.output_dir, cfg, state, best, run_id=self.out.run_id,
                                                  last_eval=result.last_eval, lora=self.selection is not None,
                                                  samples=len(self.train_idx), eval_samples=len(self.eval_idx),
                                                  command=self.command, plot=result.plot)
                    if result.card is None:
                        self.reporter.print(f"[yellow]Note:[/] {self.output_dir / 'README.md'} is not a kimi-lora "
                                            "model card; left as it is (no card written)")
                except OSError as e:
                    raise self._final_save_failed(e, step, saved=True) from e
        metrics.close()
        return result

    def _final_save_failed(self, e: OSError, step: int, saved: bool) -> Any:
        return final_save_error(e, step, saved=saved, lora=self.selection is not None, output_dir=self.output_dir,
                                series=self.out.series)

    def _load_best(self, best: TrainerState) -> None:
        """Put the best checkpoint's trainable weights back, so the final save is the best model."""
        if best.best_model_checkpoint is None:
            return
        folder = Path(best.best_model_checkpoint)
        self.checkpoints.restore_trainable(folder, self.model)
        self.reporter.print(f"Loaded the best checkpoint {folder.name} ({best.metric_for_best_model} "
                            f"{best.best_metric:.4f}) as the final {'adapter' if self.selection else 'model'}.")


def train(cfg: TrainConfig, reporter: Reporter | None = None, command: list[str] | None = None) -> TrainResult:
    """Run one training job (in this process; call it in every process of a distributed launch).
    `command` (the command line) goes into the model card."""
    trainer = Trainer(cfg, reporter)
    trainer.command = command
    trainer.setup()
    return trainer.run()
