"""The training run: load -> pre-flight -> wrap -> accelerate -> loop -> atomic saves.

`train(cfg)` is what `kimi-lora train` calls; the same function runs in every process under
`torchrun` / `accelerate launch` (DDP) and with `--deepspeed` (ZeRO-2/3). One optimizer step takes
`world * per_device * accumulation` samples of the deterministic batch plan; each rank's loss is scaled
so the step's gradient is that of the mean per-sample loss over the whole global batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import link_or_copy
from kimi_lora_cli.training import checkpoint as ckpt
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import (
    deepspeed_config,
    env_rank,
    env_world,
    gathered_named_parameters,
)
from kimi_lora_cli.training.reporting import MetricsLog, Reporter, plot_losses

CONFIG_FILE = "train_config.yaml"
MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    total_steps: int
    interrupted: bool = False
    first_loss: float | None = None
    last_loss: float | None = None
    last_eval_loss: float | None = None
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


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary (second Ctrl-C: immediately)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def make_scheduler(optimizer: Any, cfg: TrainConfig, total: int):
    import torch

    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total))
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if warmup and step < warmup and kind != "constant":
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: Any, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("nothing to train: the selection leaves no trainable parameter")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def _atomic_files(tmp: Path, dest: Path) -> list[Path]:
    """Move every file of `tmp` into `dest` (each rename atomic), then remove `tmp`."""
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            target = dest / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            moved.append(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return moved


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
        # Behave as if Ctrl-C came during this step (tests and drills of the interruption path).
        self.stop_after: int | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from kimi_lora_cli.data.dataset import KimiDataset
        from kimi_lora_cli.data.features import FeatureStore
        from kimi_lora_cli.loading import load_model
        from kimi_lora_cli.training.plan import split_eval

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.resume_dir = None
        if cfg.resume_from_checkpoint:
            self.resume_dir = ckpt.find_checkpoint(cfg.resume_from_checkpoint, self.output_dir)

        weights, base = model_locations(cfg)
        say = self.reporter.print
        # Data and targets are checked against config + tokenizer (no tensor read) before the
        # weights load, so a typo costs seconds, not a 20 GB load.
        skeleton = model_skeleton(cfg)
        config = skeleton.config
        if cfg.lora_enabled:
            from kimi_lora_cli.targets import linear_entries, resolve_targets

            resolve_targets(linear_entries(skeleton.model), cfg.lora_target)
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
        self.train_idx, self.eval_idx = split_eval(len(data.samples), cfg.eval_ratio, cfg.seed)
        if len(self.train_idx) < self.world:
            raise ConfigError(f"{data.path}: {len(self.train_idx)} training samples for {self.world} processes; "
                              "add data or use fewer processes")
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
        self.device = acc.device
        encoder = self.loaded.feature_encoder
        encoder.encoder.to(self.device)
        store = FeatureStore(encoder, cache_dir=cfg.feature_cache_dir)
        self.store = store
        self.dataset = KimiDataset(data.samples, skeleton.tokenizer.pad, config.kimia_adaptor_input_dim, store)

        from kimi_lora_cli.training.plan import BatchPlan

        self.fixed_micro = bool(cfg.deepspeed)
        self.plan = BatchPlan(self.train_idx, self.dataset.lengths(), cfg.seed, self.world, self.rank,
                              cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.group_by_length,
                              self.fixed_micro, cfg.row_length(config.max_position_embeddings))
        self.total_steps = self.plan.total_steps(cfg.num_train_epochs, cfg.max_steps)
        if cfg.packing:
            say(f"[bold]Packing[/] {self.plan.packing_summary()}")
        self.steps_per_epoch = max(1, self.plan.steps_per_epoch())
        optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.deepspeed = cfg.deepspeed is not None

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
        import torch

        from kimi_lora_cli.training.loss import compute_loss

        model = self.model
        model.eval()
        # Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
        # a rank that ran out of samples repeats one and does not count it.
        sums = [0.0, 0.0, 0.0, 0.0]
        with torch.no_grad():
            for chunk in self.plan.eval_batches(self.eval_idx, self.cfg.eval_batch_size):
                parts = compute_loss(model, self._batch(chunk or self.eval_idx[:1]), self.cfg.text_loss_weight,
                                     self.cfg.audio_loss_weight)
                if not chunk:
                    continue
                sums[0] += float(parts.total.sum())
                sums[1] += float(parts.text.sum())
                sums[2] += float(parts.audio.sum())
                sums[3] += parts.total.shape[0]
        model.train()
        total, text, audio, n = self._reduce(sums)
        n = max(n, 1.0)
        return {"eval_loss": total / n, "eval_text_loss": text / n, "eval_audio_loss": audio / n}

    def save_checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        import torch

        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = ckpt.tmp_dir_for(self.output_dir, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        unwrapped = self._unwrapped()
        if self.deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
        trainable = gathered_named_parameters(unwrapped, acc)
        if self.is_main:
            if not self.deepspeed:
                ckpt.save_tensors(trainable, tmp / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.selection is not None:
                self._save_adapter(unwrapped, trainable, tmp)
        torch.save(ckpt.rng_state(), tmp / f"rng_state_{self.rank}.pt")
        acc.wait_for_everyone()
        if self.is_main:
            state = {"global_step": step, "world_size": self.world,
                     "global_batch": self.world * self.cfg.per_device_train_batch_size
                     * self.cfg.gradient_accumulation_steps, "config": self.cfg.to_dict(), **extra}
            ckpt.finish(tmp, final, state)
            ckpt.rotate(self.output_dir, self.cfg.save_total_limit, keep=final)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        import torch

        state = ckpt.read_state(folder)
        batch = self.world * self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps
        if state.get("global_batch", batch) != batch:
            raise ConfigError(
                f"{folder}: trained with a global batch of {state['global_batch']} samples per step, this run "
                f"has {batch} (processes x per-device batch x accumulation); resume with the same global batch"
            )
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / "deepspeed"), load_module_strict=False)
        else:
            tensors = ckpt.load_tensors(folder / "trainable.safetensors")
            params = dict(self._unwrapped().named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
            if missing:
                raise ConfigError(f"{folder}: checkpoint lacks {len(missing)} trainable tensors ({missing[0]}, ...); "
                                  "it comes from a run with other targets")
            with torch.no_grad():
                for n, t in tensors.items():
                    if n in params:
                        params[n].copy_(t.to(params[n].device, params[n].dtype))
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu",
                                                      weights_only=False))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        rng = folder / f"rng_state_{self.rank}.pt"
        if rng.is_file():
            ckpt.set_rng_state(torch.load(rng, weights_only=False))
        return state

    def _save_adapter(self, unwrapped: Any, trainable: dict[str, Any], folder: Path) -> None:
        unwrapped.save_pretrained(str(folder), state_dict=trainable, is_main_process=True, save_embedding_layers=False)
        readme = folder / "README.md"
        if readme.exists():
            readme.unlink()

    def save_final(self) -> list[Path]:
        acc = self.accelerator
        tmp = self.output_dir / ".tmp-final"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        unwrapped = self._unwrapped()
        files: list[Path] = []
        if self.selection is not None:
            trainable = gathered_named_parameters(unwrapped, acc)
            if self.is_main:
                self._save_adapter(unwrapped, trainable, tmp)
        else:
            state = acc.get_state_dict(self.model)
            if self.is_main:
                self._save_full(state, tmp)
        acc.wait_for_everyone()
        if self.is_main:
            files = _atomic_files(tmp, self.output_dir)
        acc.wait_for_everyone()
        return files

    def _save_full(self, state: dict[str, Any], folder: Path) -> None:
        """Full fine-tuning: release tensor names, release-style shards + index, config, tokenizer and
        Whisper next to it, so the folder loads like the release."""
        import json

        import torch

        from kimi_lora_cli.training.checkpoint import save_tensors

        dtype = torch.bfloat16 if self.cfg.bf16 else torch.float16 if self.cfg.fp16 else None
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
        groups, size = [[]], 0
        for k in state:
            nbytes = state[k].numel() * state[k].element_size()
            if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += nbytes
        n = len(groups)
        weight_map, total = {}, 0
        for i, names in enumerate(groups, 1):
            shard = f"model-{i}-of-{n}.safetensors"
            save_tensors({k: state[k] for k in names}, folder / shard)
            for k in names:
                weight_map[k] = shard
                total += state[k].numel() * state[k].element_size()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        cfg_dict = self.loaded.config.to_dict()
        cfg_dict["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        info = self.loaded.info
        if info.tokenizer_source:
            for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                src = Path(info.tokenizer_source) / name
                if src.is_file():
                    link_or_copy(src, folder / name)
        wsrc = Path(info.whisper_source) if info.whisper_source else None
        wdir = folder / "whisper-large-v3"
        wdir.mkdir()
        if wsrc is not None and wsrc.is_dir() and (wsrc / "model.safetensors").is_file():
            for f in wsrc.iterdir():
                if f.is_file():
                    link_or_copy(f, wdir / f.name)
        else:
            enc = self.loaded.feature_encoder.encoder
            save_tensors({f"model.encoder.{k}": v for k, v in enc.state_dict().items()}, wdir / "model.safetensors")
            enc.config.to_json_file(str(wdir / "config.json"))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:

        from kimi_lora_cli.training.loss import compute_loss

        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(output_dir=self.output_dir, global_step=0, total_steps=self.total_steps,
                             samples=len(self.train_idx), eval_samples=len(self.eval_idx),
                             skipped_too_long=self.data.skipped_too_long, truncated=self.data.truncated,
                             is_main=self.is_main)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale_tmp(self.output_dir)
            tmp = self.output_dir / f".{CONFIG_FILE}.tmp"
            tmp.write_text(cfg.to_yaml(), encoding="utf-8")
            os.replace(tmp, self.output_dir / CONFIG_FILE)
        acc.wait_for_everyone()

        start_step, tokens_total = 0, 0
        if self.resume_dir is not None:
            state = self.load_checkpoint(self.resume_dir)
            start_step = int(state["global_step"])
            tokens_total = int(state.get("tokens", 0))
            self.reporter.print(f"[bold]Resuming[/] from {self.resume_dir} at step {start_step}")
        metrics = MetricsLog(self.output_dir, self.is_main, cfg.report_to, resume_step=start_step,
                             config=cfg.to_dict())
        result.global_step = start_step
        if start_step >= self.total_steps:
            self.reporter.print(f"Checkpoint step {start_step} already reaches the {self.total_steps} planned steps.")

        plan = self.plan.steps()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        eval_every = cfg.eval_steps or cfg.save_steps
        do_eval = bool(self.eval_idx) and cfg.evaluation_strategy != "no"
        window = {"total": 0.0, "text": 0.0, "audio": 0.0, "n": 0.0, "tokens": 0.0}
        window_start = time.perf_counter()
        run_start = time.perf_counter()
        last_saved = None
        ds_gas = cfg.gradient_accumulation_steps if self.deepspeed else 1
        self.model.train()
        self.reporter.start(self.total_steps, start_step)
        step = start_step
        try:
            with _StopFlag() as stop:
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
                    self.reporter.step(step, {**(record or {"epoch": epoch, "loss": result.last_loss or 0.0,
                                                             "text_loss": 0.0, "audio_loss": 0.0,
                                                             "learning_rate": lr}),
                                              "total_steps": self.total_steps}, logged)
                    at_epoch_end = planned.step_in_epoch == self.steps_per_epoch - 1
                    if do_eval and ((cfg.evaluation_strategy == "steps" and step % eval_every == 0)
                                    or (cfg.evaluation_strategy == "epoch" and at_epoch_end)):
                        ev = self.evaluate()
                        metrics.write({"step": step, "epoch": round(epoch, 4), **ev})
                        result.last_eval_loss = ev["eval_loss"]
                        self.reporter.print(f"eval at step {step}: loss {ev['eval_loss']:.4f} (text "
                                            f"{ev['eval_text_loss']:.4f} audio {ev['eval_audio_loss']:.4f})")
                    if stop_now or step % cfg.save_steps == 0:
                        last_saved = self.save_checkpoint(step, {"epoch": epoch, "tokens": tokens_total})
                        result.checkpoint = last_saved
                    if stop_now:
                        result.interrupted = True
                        break
        finally:
            self.reporter.stop()
        result.tokens = tokens_total
        result.seconds = time.perf_counter() - run_start
        if not result.interrupted:
            if do_eval and (cfg.evaluation_strategy != "steps" or step % eval_every != 0):
                ev = self.evaluate()
                metrics.write({"step": step, "epoch": round(step / self.steps_per_epoch, 4), **ev})
                result.last_eval_loss = ev["eval_loss"]
            result.saved = self.save_final()
            if self.is_main:
                result.plot = plot_losses(metrics.records, self.output_dir / "loss_curve.png")
        metrics.close()
        return result


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

        device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        tokenizer = load_speech_tokenizer(cfg.speech_tokenizer, device=device)
        return CodeStore(tokenizer, config.kimia_token_offset, config.vocab_size, cache_dir=cfg.feature_cache_dir)

    return load


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run one training job (in this process; call it in every process of a distributed launch)."""
    trainer = Trainer(cfg, reporter)
    trainer.setup()
    return trainer.run()
