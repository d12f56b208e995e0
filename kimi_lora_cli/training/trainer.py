"""The training run: pre-flight -> accelerate -> load (meta build, wrap, shard, fill) -> loop -> saves.

`train(cfg)` is what `kimi-lora train` calls; the same function runs in every process under
`torchrun` / `accelerate launch` (DDP), with `--fsdp` (FSDP2) and with `--deepspeed` (ZeRO-2/3). The
model is built on the meta device and each process reads its weights straight onto its device (with
FSDP only its own shard), so no process holds a full CPU copy first. One optimizer step takes
`world * per_device * accumulation` samples of the deterministic batch plan; each rank's loss is scaled
so the step's gradient is that of the mean per-sample loss over the whole global batch.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import write_atomic
from kimi_lora_cli.sharded import as_plain
from kimi_lora_cli.training import checkpoint as ckpt
from kimi_lora_cli.training.checkpointing import CheckpointMixin
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import (
    deepspeed_config,
    env_rank,
    env_world,
)
from kimi_lora_cli.training.optim import check_scheduler, make_optimizer, make_scheduler
from kimi_lora_cli.training.output import OutputDir, check_resume, data_digest
from kimi_lora_cli.training.reporting import MetricsLog, Reporter, parse_report_to, plot_losses
from kimi_lora_cli.training.result import TrainResult
from kimi_lora_cli.training.run_evaluation import EvaluationMixin
from kimi_lora_cli.training.setup import load_dtype, model_locations, model_skeleton, preflight
from kimi_lora_cli.training.signals import StopFlag
from kimi_lora_cli.training.state import TrainerState

CONFIG_FILE = "train_config.yaml"


class Trainer(CheckpointMixin, EvaluationMixin):
    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None) -> None:
        from kimi_lora_cli.training.fsdp import from_launcher

        cfg, self.launcher_notes = from_launcher(cfg)  # `accelerate launch --use_fsdp` -> --fsdp
        self.cfg = cfg
        self.fsdp = None  # FsdpRun when the model is sharded
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
            self._release()
            raise

    def _check_inputs(self) -> None:
        import torch

        from kimi_lora_cli.training.plan import split_eval

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        say = self.reporter.print
        parse_report_to(cfg.report_to)  # a missing tracker package fails here, before any weight is read
        check_scheduler(cfg, max(cfg.max_steps, 1))  # and --lr-scheduler-kwargs the schedule does not take
        for note in self.launcher_notes:
            say(f"[yellow]Note:[/] {note}")
        self.resume_dir, self.resume_state = None, None
        if cfg.resume_from_checkpoint:
            self.resume_dir = ckpt.find_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        self.out.check(resuming=self.resume_dir is not None)
        self.data_sha256 = data_digest(cfg)  # every rank: they must agree on refusing a resume
        if self.resume_dir is not None:
            self.resume_state = ckpt.read_state(self.resume_dir)
            for change in check_resume(cfg, self.resume_state, self.resume_dir, self.world, self.data_sha256):
                say(f"[bold]Resuming[/] with {change}")

        weights, base = model_locations(cfg)
        # Data and targets are checked against config + tokenizer (no tensor read) before the
        # weights load, so a typo costs seconds, not a 20 GB load.
        skeleton = model_skeleton(cfg)
        config = skeleton.config
        if cfg.lora_enabled:
            from kimi_lora_cli.targets import linear_entries, resolve_targets
            from kimi_lora_cli.training.lora import check_modules_to_save, check_quantized_training

            resolve_targets(linear_entries(skeleton.model), cfg.lora_target)
            check_modules_to_save(skeleton.model, cfg.modules_to_save)
            check_quantized_training(skeleton.model, cfg, self.world)
        max_len, _ = cfg.sample_limit(config.max_position_embeddings)
        data = preflight(cfg, skeleton)
        self.data = data
        if data.audio_tokenized:
            say(f"[bold]Speech tokenizer[/] {cfg.speech_tokenizer}: audio_tokens for {data.audio_tokenized} files")
        msg = f"[bold]Data[/] {data.path}: {len(data.samples)} samples, {data.tokens} tokens"
        if data.skipped_too_long:
            msg += f"; skipped {data.skipped_too_long} longer than {max_len}"
        if data.truncated:
            msg += f"; truncated {data.truncated} to {max_len}"
        say(msg)
        self.samples = list(data.samples)
        if cfg.eval_data_path:
            eval_data = preflight(cfg.with_(data_path=cfg.eval_data_path), skeleton)
            say(f"[bold]Eval data[/] {eval_data.path}: {len(eval_data.samples)} samples")
            self.train_idx = list(range(len(self.samples)))
            self.eval_idx = list(range(len(self.samples), len(self.samples) + len(eval_data.samples)))
            self.samples += eval_data.samples
        else:
            self.train_idx, self.eval_idx = split_eval(len(self.samples), cfg.eval_ratio, cfg.seed)
        if len(self.train_idx) < self.world:
            raise ConfigError(f"{data.path}: {len(self.train_idx)} training samples for {self.world} processes; "
                              "add data or use fewer processes")
        if data.cwd_paths:
            say(f"[yellow]Note:[/] {data.cwd_paths} audio paths are not next to {data.path} and were found "
                f"relative to the current folder {Path.cwd()}; `kimi-lora prepare` writes them resolved")
        if self.is_main:
            self.out.claim(self.resume_state)  # created and locked only now, before the weights load
            for note in self.out.notes:
                say(f"[yellow]Note:[/] {note}")
        self.skeleton = skeleton

    def _build(self) -> None:
        from kimi_lora_cli.data.dataset import KimiDataset
        from kimi_lora_cli.data.features import FeatureStore

        cfg, skeleton, say = self.cfg, self.skeleton, self.reporter.print
        config = skeleton.config
        acc = self._make_accelerator()
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            ids = broadcast_object_list([self.out.run_id, self.out.series])
            self.out.run_id, self.out.series = ids
        self.device = acc.device
        weights, base = model_locations(cfg)
        say(f"[bold]Loading[/] {weights}" + (f" (tokenizer and Whisper from {base})" if base else ""))
        model = self._load_model(weights, base)
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
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.deepspeed = cfg.deepspeed is not None
        self.evaluator = self._make_evaluator(skeleton.tokenizer, config)
        self._banner()

    def _make_accelerator(self) -> Any:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        has_audio_free = any(not s.seq.media for s in self.data.samples)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=has_audio_free)]
        kwargs: dict[str, Any] = {}
        if cfg.deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, self.world))
        cpu = (cfg.device or "").startswith("cpu")
        self.owns_group = False
        if cfg.fsdp:
            from kimi_lora_cli.training.fsdp import init_process_group

            device_type = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
            self.owns_group = init_process_group(device_type)
        precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps
                                       if cfg.deepspeed else 1, **kwargs)
        if str(self.accelerator.distributed_type).endswith("FSDP"):
            raise ConfigError("accelerate is set up for FSDP but kimi-lora was not: run `kimi-lora train --fsdp` "
                              "or `accelerate launch --use_fsdp --fsdp_version 2`")
        return self.accelerator

    def _load_model(self, weights: Path, base: Path | None) -> Any:
        """Build on the meta device, wrap LoRA (or unfreeze everything), shard with --fsdp, then read
        each parameter's own rows straight onto the device; adapters get their seeded start."""
        from kimi_lora_cli.loading import load_model
        from kimi_lora_cli.training import fsdp

        cfg, wrapped = self.cfg, {}
        settings = fsdp.settings(cfg) if cfg.fsdp else None

        def prepare(inner: Any) -> Any:
            if cfg.gradient_checkpointing:
                inner.gradient_checkpointing_enable()
            model = inner
            if cfg.lora_enabled:
                from kimi_lora_cli.training.lora import wrap_lora

                model, wrapped["selection"] = wrap_lora(inner, cfg, base_path=str(weights))
                if cfg.quantization:
                    from kimi_lora_cli.training.lora import prepare_quantized

                    prepare_quantized(inner, cfg.gradient_checkpointing)
            else:
                inner.requires_grad_(True)
            if settings is not None:
                fsdp.shard_model(inner, settings, self.device)
                self.fsdp = fsdp.FsdpRun(inner, settings)
            return model

        self.loaded = load_model(weights, dtype=load_dtype(cfg), device=self.device, base_path=base, prepare=prepare,
                                 quantization=cfg.quantization, double_quant=cfg.double_quant)
        self.selection = wrapped.get("selection")
        if self.selection is not None:
            from kimi_lora_cli.sharded import checkpoint_key
            from kimi_lora_cli.training.lora import init_adapter_weights

            done = init_adapter_weights(self.loaded.model, cfg.seed)
            unset = [n for n, p in self.loaded.model.named_parameters() if checkpoint_key(n) is None
                     and id(p) not in done]
            if unset:  # a peft adapter kind this trainer does not know how to start
                raise ConfigError(f"no starting values for adapter weights {', '.join(unset[:3])}; "
                                  "train plain LoRA / DoRA targets")
        self.model = self.loaded.model
        return self.model

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
        return self.accelerator.unwrap_model(self.model)

    def _no_sync(self) -> Any:
        """Skip the gradient reduction (all but the last micro-batch of a step)."""
        return self.fsdp.no_sync() if self.fsdp is not None else self.accelerator.no_sync(self.model)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            result = self._run()
        except BaseException:
            self._release()
            raise
        self._release(together=True)
        return result

    def _release(self, together: bool = False) -> None:
        """Unlock the output folder; destroy the process group this run created (FSDP). `together`:
        the run ended normally, so every process first waits for the others (a process that tears its
        connections down while another still uses them aborts)."""
        self.out.release()
        if getattr(self, "owns_group", False):
            import torch.distributed as dist

            if dist.is_initialized():
                if together and dist.get_world_size() > 1:
                    dist.barrier()
                dist.destroy_process_group()
            self.owns_group = False

    def _run(self) -> TrainResult:

        from kimi_lora_cli.training.loss import compute_loss

        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(output_dir=self.output_dir, global_step=0, total_steps=self.total_steps,
                             samples=len(self.train_idx), eval_samples=len(self.eval_idx),
                             skipped_too_long=self.data.skipped_too_long, truncated=self.data.truncated,
                             is_main=self.is_main)
        if self.is_main:
            write_atomic(self.output_dir / CONFIG_FILE, cfg.to_yaml(), tag=self.out.run_id)
        acc.wait_for_everyone()

        start_step, tokens_total = 0, 0
        self.state = TrainerState(cfg.best_metric_name, cfg.best_greater_is_better)
        if self.resume_dir is not None:
            state = self.load_checkpoint(self.resume_dir)
            start_step = int(state["global_step"])
            tokens_total = int(state.get("tokens", 0))
            self.state = TrainerState.from_dict(state, cfg.best_metric_name, cfg.best_greater_is_better)
            self.reporter.print(f"[bold]Resuming[/] from {self.resume_dir} at step {start_step}")
        metrics = MetricsLog(self.output_dir, self.is_main, cfg.report_to, resume_step=start_step,
                             config=cfg.to_dict(), run_name=cfg.run_name)
        self.metrics = metrics
        result.global_step = start_step
        if start_step >= self.total_steps:
            self.reporter.print(f"Checkpoint step {start_step} already reaches the {self.total_steps} planned steps.")

        plan = self.plan.steps()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        eval_every = cfg.eval_steps or cfg.save_steps
        do_eval = bool(self.eval_idx) and cfg.evaluation_strategy != "no"
        track_best = self.state.metric_for_best_model is not None
        window = {"total": 0.0, "text": 0.0, "audio": 0.0, "n": 0.0, "tokens": 0.0}
        window_start = time.perf_counter()
        run_start = time.perf_counter()
        last_saved = None
        ds_gas = cfg.gradient_accumulation_steps if self.deepspeed else 1
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
                        batch = self._batch(micro)
                        sync = contextlib.nullcontext() if last else self._no_sync()
                        with sync:
                            parts = compute_loss(self.model, batch, cfg.text_loss_weight, cfg.audio_loss_weight)
                            loss = parts.total.sum() * (self.world / planned.total_samples)
                            acc.backward(loss * ds_gas)
                        window["total"] += float(parts.total.detach().sum())
                        window["text"] += float(parts.text.sum())
                        window["audio"] += float(parts.audio.sum())
                        window["n"] += len(micro)
                        window["tokens"] += parts.tokens
                    grad_norm = None
                    if cfg.max_grad_norm > 0 and not self.deepspeed:
                        grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
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
                        self._evaluate_and_track(step, epoch, metrics, result)
                    # With a watched metric every evaluation saves, so the best one can be restored.
                    if stop_now or step % cfg.save_steps == 0 or (evaluated and track_best):
                        last_saved = self.save_checkpoint(step, {"epoch": epoch, "tokens": tokens_total})
                        result.checkpoint = last_saved
                    if stop_now:
                        result.interrupted = True
                        result.signal = stop.signal
                        break
                    if evaluated and self._should_stop_early():
                        result.stopped_early = True
                        break
        finally:
            self.reporter.stop()
        result.tokens = tokens_total
        result.seconds = time.perf_counter() - run_start
        if not result.interrupted:
            already = result.stopped_early or (cfg.evaluation_strategy == "steps" and step % eval_every == 0)
            if do_eval and not already and step > start_step:
                self._evaluate_and_track(step, step / self.steps_per_epoch, metrics, result)
                if track_best:  # the end-of-training evaluation competes for best too
                    result.checkpoint = self.save_checkpoint(step, {"epoch": step / self.steps_per_epoch,
                                                                    "tokens": tokens_total})
            if cfg.load_best_model_at_end:
                self._load_best()
            result.best_metric = self.state.best_metric
            result.best_checkpoint = self.state.best_model_checkpoint
            result.saved = self.save_final()
            if self.is_main:
                result.plot = plot_losses(metrics.records, self.output_dir / "loss_curve.png")
                self._write_run_files(result, metrics.records, step)
        metrics.close()
        return result

def train(cfg: TrainConfig, reporter: Reporter | None = None, command: list[str] | None = None) -> TrainResult:
    """Run one training job (in this process; call it in every process of a distributed launch).
    `command` (the command line) goes into the model card."""
    trainer = Trainer(cfg, reporter)
    trainer.command = command
    trainer.setup()
    return trainer.run()
