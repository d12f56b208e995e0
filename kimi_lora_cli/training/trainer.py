"""The training run: load -> pre-flight -> wrap -> accelerate -> loop -> atomic saves.

`train(cfg)` is what `kimi-lora train` calls; the same function runs in every process under
`torchrun` / `accelerate launch` (DDP) and with `--deepspeed` (ZeRO-2/3). One optimizer step takes
`world * per_device * accumulation` samples of the deterministic batch plan; each rank's loss is scaled
so the step's gradient is that of the mean per-sample loss over the whole global batch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, remove_tree, save_torch, write_atomic
from kimi_lora_cli.outputs import write_marker
from kimi_lora_cli.training import checkpoint as ckpt
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import (
    deepspeed_config,
    env_rank,
    env_world,
    gathered_named_parameters,
)
from kimi_lora_cli.training.optim import make_optimizer, make_scheduler, resync_learning_rate
from kimi_lora_cli.training.output import OutputDir, check_resume, data_digest, resolved_paths
from kimi_lora_cli.training.reporting import MetricsLog, Reporter, parse_report_to, plot_losses
from kimi_lora_cli.training.saving import atomic_files, save_adapter, save_full_model
from kimi_lora_cli.training.signals import StopFlag
from kimi_lora_cli.training.state import TrainerState

CONFIG_FILE = "train_config.yaml"


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


# -------------------------------------------------------------------------------------------
# Set-up helpers
# -------------------------------------------------------------------------------------------


def model_locations(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(weights folder, release folder for tokenizer + Whisper when it differs)."""
    weights = Path(cfg.model_path or cfg.model_name_or_path).expanduser()
    base = Path(cfg.model_name_or_path).expanduser() if cfg.model_path and cfg.model_name_or_path else None
    if base is not None and base.resolve() == weights.resolve():
        base = None
    return weights, base


def load_dtype(cfg: TrainConfig) -> str:
    if cfg.lora_enabled:
        return "bfloat16" if cfg.bf16 else "float16" if cfg.fp16 else "auto"
    # Full fine-tuning keeps float32 master weights (autocast does bf16 compute) unless DeepSpeed,
    # which keeps its own float32 copy.
    if cfg.deepspeed and (cfg.bf16 or cfg.fp16):
        return "bfloat16" if cfg.bf16 else "float16"
    return "float32"


# -------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, reporter: Reporter | None = None) -> None:
        self.cfg = cfg
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
            self.out.release()
            raise

    def _check_inputs(self) -> None:
        import torch

        from kimi_lora_cli.training.plan import split_eval

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        say = self.reporter.print
        parse_report_to(cfg.report_to)  # a missing tracker package fails here, before any weight is read
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
            from kimi_lora_cli.training.lora import check_modules_to_save

            resolve_targets(linear_entries(skeleton.model), cfg.lora_target)
            check_modules_to_save(skeleton.model, cfg.modules_to_save)
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
        from kimi_lora_cli.loading import load_model

        cfg, data, skeleton, say = self.cfg, self.data, self.skeleton, self.reporter.print
        config = skeleton.config
        weights, base = model_locations(cfg)
        say(f"[bold]Loading[/] {weights}" + (f" (tokenizer and Whisper from {base})" if base else ""))
        self.loaded = load_model(weights, dtype=load_dtype(cfg), device="cpu", base_path=base)

        # Model: adapters or full fine-tuning; Whisper stays frozen outside the trained module.
        model = self.loaded.model
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.selection = None
        if cfg.lora_enabled:
            from kimi_lora_cli.training.lora import wrap_lora

            model, self.selection = wrap_lora(model, cfg, base_path=str(weights))
        else:
            model.requires_grad_(True)
        self.model = model
        self._report_parameters()

        # Accelerate (DDP / DeepSpeed / single device).
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        has_audio_free = any(not s.seq.media for s in data.samples)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=has_audio_free)]
        kwargs: dict[str, Any] = {}
        if cfg.deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, self.world))
        cpu = (cfg.device or "").startswith("cpu")
        precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
        self.accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers,
                                       gradient_accumulation_steps=cfg.gradient_accumulation_steps
                                       if cfg.deepspeed else 1, **kwargs)
        acc = self.accelerator
        if str(acc.distributed_type).endswith("FSDP"):
            # Saving would need FSDP's full-state gathering, which is not wired (or tested) yet.
            raise ConfigError("FSDP (accelerate --use_fsdp) is not supported by `kimi-lora train` yet; "
                              "shard with --deepspeed zero3 instead")
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            ids = broadcast_object_list([self.out.run_id, self.out.series])
            self.out.run_id, self.out.series = ids
        self.device = acc.device
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
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.deepspeed = cfg.deepspeed is not None
        self.evaluator = self._make_evaluator(skeleton.tokenizer, config)
        self._banner()

    def _make_evaluator(self, tokenizer: Any, config: Any) -> Any:
        from kimi_lora_cli.training.evaluation import Evaluator, default_max_new_tokens, generation_samples

        cfg = self.cfg
        generate = []
        if cfg.eval_generate_count:
            generate = generation_samples(self.dataset.samples, self.eval_idx, cfg.eval_generate_count)
            if not generate:
                raise ConfigError("--eval-generate: no evaluation conversation ends with an assistant text answer "
                                  "to score")
        sharded = bool(self.deepspeed and deepspeed_config(cfg, self.world).get("zero_optimization", {})
                       .get("stage", 0) == 3)
        return Evaluator(dataset=self.dataset, indices=self.eval_idx, batch_size=cfg.eval_batch_size,
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
        trainable = sum(p.numel() for p in self._unwrapped().parameters() if p.requires_grad)
        total = sum(p.numel() for p in self._unwrapped().parameters())
        precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
        engine = f"DeepSpeed {cfg.deepspeed}" if cfg.deepspeed else "DDP" if self.world > 1 else "single process"
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
        if self.eval_idx:
            gen = len(self.evaluator.generate)
            rows.append(("Evaluation", f"{len(self.eval_idx)} samples" + (f", {gen} decoded for WER/CER" if gen else "")))
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
        return self.accelerator.unwrap_model(self.model)

    def evaluate(self) -> dict[str, float]:
        metrics = self.evaluator.evaluate(self.model, self._unwrapped())
        pairs = self.evaluator.last_pairs if "eval_wer" in metrics else []
        if pairs and self.is_main:
            self.reporter.eval_pairs(pairs)
        return metrics

    def save_checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = ckpt.tmp_dir_for(self.output_dir, step, self.out.run_id)
        if self.is_main:
            remove_tree(tmp)
            with naming_errors(tmp):
                tmp.mkdir(parents=True)
            write_marker(tmp, "train", run_id=self.out.run_id)
        acc.wait_for_everyone()
        try:
            return self._write_checkpoint(step, extra, tmp, final)
        except BaseException:
            if self.is_main:
                remove_tree(tmp)  # nothing half-written stays behind
            raise

    def _write_checkpoint(self, step: int, extra: dict[str, Any], tmp: Path, final: Path) -> Path:
        acc = self.accelerator
        unwrapped = self._unwrapped()
        if self.deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
        trainable = gathered_named_parameters(unwrapped, acc)
        if self.is_main:
            if not self.deepspeed:
                ckpt.save_tensors(trainable, tmp / "trainable.safetensors")
                save_torch(self.optimizer.state_dict(), tmp / "optimizer.pt")
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
        import torch

        state = self.resume_state or ckpt.read_state(folder)
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
        else:
            tensors = ckpt.load_tensors(folder / "trainable.safetensors")
            params = dict(self._unwrapped().named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
            if missing:
                raise ConfigError(f"{folder}: checkpoint lacks {len(missing)} trainable tensors ({missing[0]}, ...); "
                                  "it comes from a run with other targets")
            wrong = [n for n, t in tensors.items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
            if wrong:
                raise ConfigError(f"{folder}: tensor {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, this "
                                  f"run's is {tuple(params[wrong[0]].shape)}; it comes from a run with other settings")
            with torch.no_grad():
                for n, t in tensors.items():
                    if n in params:
                        params[n].copy_(t.to(params[n].device, params[n].dtype))
            self.optimizer.load_state_dict(ckpt.load_torch_file(folder / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch_file(folder / "scheduler.pt"))
        resync_learning_rate(self.optimizer, self.scheduler, self.cfg.learning_rate)
        rng = ckpt.load_rng(folder, self.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        return state

    def save_final(self) -> list[Path]:
        acc = self.accelerator
        tmp = self.out.tmp_name("final")
        if self.is_main:
            remove_tree(tmp)
            with naming_errors(tmp):
                tmp.mkdir(parents=True)
            write_marker(tmp, "train", run_id=self.out.run_id)
        acc.wait_for_everyone()
        try:
            return self._write_final(tmp)
        except BaseException:
            if self.is_main:
                remove_tree(tmp)
            raise

    def _write_final(self, tmp: Path) -> list[Path]:
        acc = self.accelerator
        unwrapped = self._unwrapped()
        files: list[Path] = []
        if self.selection is not None:
            trainable = gathered_named_parameters(unwrapped, acc)
            if self.is_main:
                save_adapter(unwrapped, trainable, tmp)
        else:
            state = acc.get_state_dict(self.model)
            if self.is_main:
                save_full_model(state, tmp, self.cfg, self.loaded)
        acc.wait_for_everyone()
        if self.is_main:
            files = atomic_files(tmp, self.output_dir)
        acc.wait_for_everyone()
        return files

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.out.release()

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
                        sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
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
                            record["grad_norm"] = float(grad_norm)
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

    def _load_best(self) -> None:
        """Put the best checkpoint's trainable weights back, so the final save is the best model."""
        import torch

        best = self.state.best_model_checkpoint
        if best is None:
            return
        folder = Path(best)
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
        else:
            tensors = ckpt.load_tensors(folder / "trainable.safetensors")
            params = dict(self._unwrapped().named_parameters())
            with torch.no_grad():
                for n, t in tensors.items():
                    if n in params:
                        params[n].copy_(t.to(params[n].device, params[n].dtype))
        self.reporter.print(f"Loaded the best checkpoint {folder.name} ({self.state.metric_for_best_model} "
                            f"{self.state.best_metric:.4f}) as the final {'adapter' if self.selection else 'model'}.")

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




def model_skeleton(cfg: TrainConfig) -> Any:
    """Config + tokenizer of the model to train, built on the meta device (no tensor read)."""
    from kimi_lora_cli.loading import load_model

    weights, base = model_locations(cfg)
    skeleton = load_model(weights, weights=False, load_whisper=False, base_path=base)
    if not skeleton.info.is_kimi:
        raise ConfigError(f"{weights}: not a Kimi-Audio model ({skeleton.info.kind}); `kimi-lora train` trains "
                          "Kimi-Audio release folders")
    return skeleton


def preflight(cfg: TrainConfig, skeleton: Any = None) -> Any:
    """Check the data against the model's tokenizer and config without loading weights (run before
    the weights load, and once by a launcher before starting N processes, so errors come early and once)."""
    from kimi_lora_cli.data.schema import load_samples

    skeleton = skeleton or model_skeleton(cfg)
    max_len, flag = cfg.sample_limit(skeleton.config.max_position_embeddings)
    return load_samples(cfg.data_path, skeleton.tokenizer, skeleton.config, max_length=max_len,
                        too_long=cfg.too_long, speech_codes=speech_codes(cfg, skeleton.config), limit_flag=flag)


def speech_codes(cfg: TrainConfig, config: Any) -> Callable[[], Any] | None:
    """With --speech-tokenizer: a function that loads it (only when some audio message lacks
    audio_tokens) as a CodeStore sharing --feature-cache-dir, so a launcher's pre-flight pass leaves
    the codes on disk for the N processes."""
    if not cfg.speech_tokenizer:
        return None

    def load() -> Any:
        import torch

        from kimi_lora_cli.data.features import CodeStore
        from kimi_lora_cli.loading import load_speech_tokenizer

        device = (cfg.device if cfg.device not in (None, "auto") else
                  f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        tokenizer = load_speech_tokenizer(cfg.speech_tokenizer, device=device)
        return CodeStore(tokenizer, config.kimia_token_offset, config.vocab_size, cache_dir=cfg.feature_cache_dir)

    return load


def train(cfg: TrainConfig, reporter: Reporter | None = None, command: list[str] | None = None) -> TrainResult:
    """Run one training job (in this process; call it in every process of a distributed launch).
    `command` (the command line) goes into the model card."""
    trainer = Trainer(cfg, reporter)
    trainer.command = command
    trainer.setup()
    return trainer.run()
