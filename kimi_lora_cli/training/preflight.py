"""What `train` checks and decides before any weight is read: where the model is, the load dtype,
the meta-device skeleton (config + tokenizer) and the data pre-flight (also run once by a launcher
before it starts N processes)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig


def model_locations(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(weights folder, release folder for tokenizer + Whisper when it differs)."""
    weights = Path(cfg.model_path or cfg.model_name_or_path).expanduser()
    base = Path(cfg.model_name_or_path).expanduser() if cfg.model_path and cfg.model_name_or_path else None
    if base is not None and base.resolve() == weights.resolve():
        base = None
    return weights, base


def load_dtype(cfg: TrainConfig) -> str:
    if cfg.quantization and not (cfg.bf16 or cfg.fp16):
        return "float32"  # what the 4-bit layers compute in, and the rest of the model is kept in
    if cfg.lora_enabled:
        return "bfloat16" if cfg.bf16 else "float16" if cfg.fp16 else "auto"
    # Full fine-tuning keeps float32 master weights (autocast does bf16 compute) unless DeepSpeed,
    # which keeps its own float32 copy.
    if cfg.deepspeed and (cfg.bf16 or cfg.fp16):
        return "bfloat16" if cfg.bf16 else "float16"
    return "float32"


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
    from kimi_lora_cli.data.samples import load_samples

    skeleton = skeleton or model_skeleton(cfg)
    max_len, flag = cfg.sample_limit(skeleton.config.max_position_embeddings)
    return load_samples(cfg.data_path, skeleton.tokenizer, skeleton.config, max_length=max_len,
                        too_long=cfg.too_long, speech_codes=speech_codes(cfg, skeleton.config), limit_flag=flag,
                        options=cfg.source_options(), skip_bad=cfg.skip_bad)


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


@dataclass
class CheckedRun:
    skeleton: Any  # config + tokenizer on the meta device
    data: Any  # LoadedData of --data-path
    samples: list[Any]  # training samples, then the evaluation samples
    train_idx: list[int]
    eval_idx: list[int]


def check_data_and_targets(cfg: TrainConfig, world: int, say: Callable[[str], None]) -> CheckedRun:
    """Targets, data and evaluation set checked against the model's config and tokenizer, no tensor
    read: every problem is reported before a 20 GB load."""
    from rich.markup import escape

    from kimi_lora_cli.training.plan import split_eval

    skeleton = model_skeleton(cfg)
    config = skeleton.config
    mimo_targets = 0
    if cfg.lora_enabled:
        from kimi_lora_cli.targets import linear_entries, resolve_targets
        from kimi_lora_cli.training.lora import check_modules_to_save, check_quantized_training

        entries = linear_entries(skeleton.model)
        resolve_targets(entries, cfg.lora_target)
        mimo_targets = sum(1 for e in entries if e.targeted and e.component == "mimo")
        check_modules_to_save(skeleton.model, cfg.modules_to_save)
        check_quantized_training(skeleton.model, cfg, world)
    max_len, _ = cfg.sample_limit(config.max_position_embeddings)
    data = preflight(cfg, skeleton)
    if data.audio_tokenized:
        say(f"[bold]Speech tokenizer[/] {cfg.speech_tokenizer}: audio_tokens for {data.audio_tokenized} files")
    msg = f"[bold]Data[/] {data.path}: {len(data.samples)} samples, {data.tokens} tokens"
    if data.skipped_too_long:
        msg += f"; skipped {data.skipped_too_long} longer than {max_len}"
    if data.truncated:
        msg += f"; truncated {data.truncated} to {max_len}"
    say(msg)
    samples = list(data.samples)
    if cfg.eval_data_path:
        eval_data = preflight(cfg.with_(data_path=cfg.eval_data_path), skeleton)
        say(f"[bold]Eval data[/] {eval_data.path}: {len(eval_data.samples)} samples")
        train_idx = list(range(len(samples)))
        eval_idx = list(range(len(samples), len(samples) + len(eval_data.samples)))
        samples += eval_data.samples
    else:
        train_idx, eval_idx = split_eval(len(samples), cfg.eval_ratio, cfg.seed)
    if len(train_idx) < world:
        raise ConfigError(f"{data.path}: {len(train_idx)} training samples for {world} processes; "
                          "add data or use fewer processes")
    if data.cwd_paths:
        say(f"[yellow]Note:[/] {data.cwd_paths} audio paths are not next to {data.path} and were found "
            f"relative to the current folder {Path.cwd()}; `kimi-lora prepare` writes them resolved")
    if mimo_targets and not any(any(s.seq.audio_loss) for s in data.samples):
        say(f"[yellow]Hint:[/] {mimo_targets} targeted modules are mimo (audio output) layers, but no answer in "
            f"{escape(str(data.path))} is spoken (no assistant audio message), so they get no loss and their "
            "update stays zero; leave them out of --lora-target (e.g. backbone,text,adaptor instead of all)",
            soft_wrap=True)
    return CheckedRun(skeleton, data, samples, train_idx, eval_idx)
