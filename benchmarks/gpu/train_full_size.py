"""Full-size Kimi-Audio LoRA training on one H100/H200: peak memory, tokens/s, MFU; then a ZeRO-3 save.

Part 1 builds the release-shape model (28 + 6 layers, hidden 3584, vocab 168448, ~9.8 B parameters)
with random bf16 weights directly on the GPU (no 19 GB checkpoint to write), wraps it with LoRA r=8
`all` through the same code as `kimi-lora train`, enables gradient checkpointing and trains on
ASR-shaped micro-batches of 2048 tokens (mostly audio codes with Whisper rows, a short text answer),
using the trainer's loss (per-sample CE, heads only on masked rows). Whisper features are cached by the
trainer after epoch 1, so they are given here as ready rows. Reports peak memory, tokens/s and MFU.

Part 2 runs `kimi-lora train`'s Trainer with a DeepSpeed ZeRO-3 config on a small release-layout
checkpoint and checks that the saved adapter holds real (gathered, non-empty, trained) LoRA weights.

    python benchmarks/gpu/train_full_size.py                 # both parts, on the GPU
    python benchmarks/gpu/train_full_size.py --preset small --device cpu --steps 2   # smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

FULL = dict(vocab_size=168448, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, kimia_mimo_layers=6,
            kimia_mimo_transformer_from_layer_index=21, kimia_adaptor_input_dim=5120)
SMALL = dict(vocab_size=1200, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=2,
             kimia_adaptor_input_dim=64, kimia_token_offset=1000, kimia_text_output_vocab=1000, pad_token_id=999,
             kimia_media_begin=900, kimia_media_end=901)


def synthetic_batch(cfg, batch: int, seq: int, text_tokens: int, device):
    """ASR-shaped micro-batch: user start, media_begin, codes (continuous), media_end, ct, msg_end,
    assistant start, `text_tokens` answer tokens with text loss, eos."""
    import torch

    g = torch.Generator().manual_seed(0)
    n_codes = seq - text_tokens - 7
    blank = cfg.kimia_text_output_vocab - 10
    audio = torch.full((batch, seq), blank, dtype=torch.long)
    text = torch.full((batch, seq), blank, dtype=torch.long)
    audio[:, 1] = cfg.kimia_media_begin
    audio[:, 2 : 2 + n_codes] = torch.randint(cfg.kimia_token_offset, cfg.vocab_size, (batch, n_codes), generator=g)
    audio[:, 2 + n_codes] = cfg.kimia_media_end
    start = seq - text_tokens - 1
    text[:, start : start + text_tokens] = torch.randint(0, cfg.kimia_media_begin, (batch, text_tokens),
                                                         generator=g)
    cont = torch.zeros((batch, seq), dtype=torch.bool)
    cont[:, 2 : 2 + n_codes] = True
    feats = torch.randn((batch, seq, cfg.kimia_adaptor_input_dim), generator=g) * cont[..., None]
    text_mask = torch.zeros((batch, seq), dtype=torch.bool)
    text_mask[:, start - 1 : start + text_tokens] = True  # positions that predict the answer and its eos
    out = {
        "input_ids": audio, "text_input_ids": text, "attention_mask": torch.ones((batch, seq), dtype=torch.long),
        "is_continuous_mask": cont, "continuous_features": feats.to(torch.bfloat16),
        "text_labels": torch.roll(text, -1, 1), "audio_labels": torch.roll(audio, -1, 1),
        "text_loss_mask": text_mask, "audio_loss_mask": torch.zeros((batch, seq), dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in out.items()}


def build_lora_model(shape: dict, device, lora_dropout: float):
    """(config, LoRA r=8 `all` model in train mode, selection): the release-shape (or small) model with
    random bf16 weights made directly on `device`, gradient checkpointing on."""
    import torch

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.lora import wrap_lora

    cfg = KimiAudioConfig.from_dict(shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    model = build_kimi_model(cfg, device=device)  # parameters allocated, not initialised
    torch.set_default_dtype(default)
    random_init(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.2f} B parameters, bf16, built in {time.perf_counter() - t0:.1f} s on {device}")
    model.gradient_checkpointing_enable()
    tcfg = TrainConfig.build(flag_values=dict(data_path="-", model_path="-", use_lora=True, lora_rank=8,
                                              lora_alpha=16, lora_target="all", lora_dropout=lora_dropout))
    model, selection = wrap_lora(model, tcfg)
    return cfg, model.train(), selection


def random_init(model) -> None:
    """A release-like scale, so the loss is a number (build_kimi_model leaves memory uninitialised)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def timed_steps(model, batch, params, opt, device, warmup: int, steps: int, indent: str = "",
                flush: bool = False) -> list[float]:
    """`warmup + steps` bf16-autocast training steps (loss, backward, clip, AdamW); the seconds of the
    steps after the warm-up, each step printed."""
    import torch

    from kimi_lora_cli.training.loss import compute_loss

    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            parts = compute_loss(model, batch)
        parts.total.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        print(f"{indent}step {step + 1}: loss {parts.total.mean().item():.4f} {time.perf_counter() - start:.3f} s"
              + (" (warm-up)" if step < warmup else ""), flush=flush)
    return times


def forward_flops_per_token(cfg, seq: int, text_rows_per_token: float) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one forward pass per token (causal attention halved)."""
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * (h * h * 2 + h * kv * 2 + 3 * h * inter)
    layers = cfg.num_hidden_layers + cfg.kimia_mimo_layers
    linear = layers * per_layer + 2 * h * cfg.vocab_size * text_rows_per_token
    attention = layers * 2 * 2 * h * seq / 2
    return linear, attention


def part1(args) -> None:
    import torch

    from kimi_lora_cli.training.lora import parameter_rows

    device = torch.device(args.device)
    cfg, model, selection = build_lora_model(FULL if args.preset == "full" else SMALL, device, lora_dropout=0.05)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    rows = parameter_rows(model, cfg.kimia_mimo_transformer_from_layer_index)
    trainable = sum(r.trainable for r in rows)
    print(f"LoRA r=8 all: {len(selection.names)} modules, {trainable / 1e6:.2f} M trainable "
          f"({100 * trainable / n_params:.3f}%)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = synthetic_batch(cfg, args.batch, args.seq, args.text_tokens, device)
    tokens_per_step = args.batch * args.seq
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(model, batch, params, opt, device, args.warmup, args.steps)
    step_s = sum(times) / len(times)
    tps = tokens_per_step / step_s
    linear, attention = forward_flops_per_token(cfg, args.seq, (args.text_tokens + 1) / args.seq)
    # LoRA on frozen weights: forward + input gradients (no weight gradients) for the linears, ~3x
    # forward for attention; gradient checkpointing adds one more forward (hardware, not model FLOPs).
    model_flops = tps * (2 * linear + 3 * attention)
    hw_flops = tps * (3 * linear + 4 * attention)
    six_n = tps * 6 * n_params
    print(f"seq {args.seq} x micro-batch {args.batch}: {step_s:.3f} s/step, {tps:,.0f} tokens/s")
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        print(f"peak memory: {peak_mem:.1f} GiB allocated, {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB "
              f"reserved ({name})")
        if peak:
            print(f"MFU (LoRA model FLOPs, no weight grads): {100 * model_flops / (peak * 1e12):.1f}%  "
                  f"HFU (with recompute): {100 * hw_flops / (peak * 1e12):.1f}%  "
                  f"[6N convention: {100 * six_n / (peak * 1e12):.1f}%] of {peak} TFLOP/s bf16")
    else:
        print(f"model FLOP/s: {model_flops / 1e9:.2f} G (no GPU: no peak memory or MFU)")
    del model, opt, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part2(args) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("ZeRO-3 save: SKIPPED (deepspeed is not installed: pip install 'kimi-lora[deepspeed]')")
        return
    from safetensors.torch import load_file

    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.loading import inspect_folder
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)
    root = Path(tempfile.mkdtemp(prefix="kimi-lora-zero3-"))
    try:
        model = build_tiny_checkpoint(root / "tiny", TinySpec(hidden_size=128, intermediate_size=256,
                                                              num_attention_heads=4, num_key_value_heads=2))
        data = write_synthetic_dataset(root / "data", inspect_folder(model).config, n=8)
        ds = root / "zero3.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"},
                                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
        cfg = TrainConfig.build(flag_values=dict(
            data_path=str(data), model_name_or_path=str(model), output_dir=str(root / "out"), use_lora=True,
            lora_target="all", learning_rate=1e-2, max_steps=4, per_device_train_batch_size=2, bf16=True,
            deepspeed=str(ds), save_steps=2, logging_steps=1, device=args.device if args.device != "cpu" else None))
        trainer = Trainer(cfg, Reporter())
        trainer.setup()
        result = trainer.run()
        tensors = load_file(str(root / "out" / "adapter_model.safetensors"))
        empty = [k for k, v in tensors.items() if v.numel() == 0]
        b_norm = sum(float(v.float().abs().sum()) for k, v in tensors.items() if "lora_B" in k)
        shapes_ok = all(v.ndim == 2 and min(v.shape) == 8 for v in tensors.values())
        ok = tensors and not empty and b_norm > 0 and shapes_ok
        print(f"ZeRO-3 save: {len(tensors)} tensors, {sum(v.numel() for v in tensors.values())} values, "
              f"empty: {len(empty)}, |lora_B| sum {b_norm:.4f}, rank-8 shapes: {shapes_ok}, "
              f"checkpoint {result.checkpoint.name if result.checkpoint else None} -> {'OK' if ok else 'FAILED'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-zero3", action="store_true")
    args = ap.parse_args()
    if args.preset == "small" and args.seq == 2048:
        args.seq = 256
    part1(args)
    if not args.skip_zero3:
        part2(args)


if __name__ == "__main__":
    main()
