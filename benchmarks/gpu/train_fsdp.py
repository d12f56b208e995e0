"""FSDP2 LoRA training of the full-size Kimi-Audio on every GPU present: peak memory per GPU, host
memory per process and tokens/s; then `kimi-lora train --fsdp` end to end (saved adapter checked).

Part 1 builds the release-shape model (28 + 6 layers, hidden 3584, vocab 168448, ~9.8 B parameters)
on the meta device, wraps LoRA r=8 `all`, shards it with the trainer's own FSDP code (each decoder
layer, each head, then the rest; bf16 compute, float32 gradient reduction, gradient checkpointing)
and gives every process random bf16 weights for its shard only, straight on its GPU. It trains on
ASR-shaped micro-batches of 2048 tokens with the trainer's loss, once with the shards on the GPUs
and once with `--fsdp-cpu-offload` (shards, gradients and optimizer state in host memory).

Part 2 runs `kimi-lora train --fsdp --bf16 --gradient-checkpointing` (with and without CPU offload)
through the real Trainer on a small release-layout checkpoint, and checks that the adapter saved
under sharding is complete: no empty tensor, trained lora_B, loadable with plain peft.

    python benchmarks/gpu/train_fsdp.py                    # all GPUs here (starts torchrun itself)
    python benchmarks/gpu/train_fsdp.py --preset small --device cpu --processes 2 --steps 2   # CPU smoke (gloo)

Budget: under 3 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_full_size import FULL, SMALL, synthetic_batch  # noqa: E402


def say(*parts: object) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, flush=True)


def random_shards(model, device, seed: int) -> None:
    """Random bf16 weights for this process's rows of every base parameter (norms at 1)."""
    import torch

    from kimi_lora_cli.sharded import checkpoint_key, local

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = checkpoint_key(name)
            if key is None:
                continue
            dest = local(p)
            if key.endswith("norm.weight") or key.endswith("layers.4.weight"):
                dest.fill_(1.0)
            elif dest.numel():
                dest.copy_(torch.randn(dest.shape, generator=g, device=device, dtype=torch.float32) * 0.02)


def part1(args, offload: bool) -> dict:
    import torch
    import torch.distributed as dist

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.fsdp import FsdpSettings, shard_model
    from kimi_lora_cli.training.lora import init_adapter_weights, wrap_lora
    from kimi_lora_cli.training.loss import compute_loss
    from kimi_lora_cli.training.optim import make_optimizer

    device = torch.device(args.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = KimiAudioConfig.from_dict(FULL if args.preset == "full" else SMALL)
    tcfg = TrainConfig.build(flag_values=dict(data_path="-", model_path="-", use_lora=True, lora_rank=8,
                                              lora_alpha=16, lora_target="all", lora_dropout=0.0, bf16=True))
    t0 = time.perf_counter()
    inner = build_kimi_model(cfg).to(torch.bfloat16)  # meta: no memory yet
    n_params = sum(p.numel() for p in inner.parameters())
    inner.gradient_checkpointing_enable()
    model, selection = wrap_lora(inner, tcfg)
    shard_model(inner, FsdpSettings(cpu_offload=offload, bf16=True), device)
    random_shards(model, device, seed=rank)
    init_adapter_weights(model, 0)
    built = time.perf_counter() - t0
    model.train()
    optimizer = make_optimizer(model, tcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = synthetic_batch(cfg, args.batch, args.seq, args.text_tokens, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    steps = args.steps if not offload else max(1, args.steps // 2)
    for step in range(args.warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        parts = compute_loss(model, batch)
        parts.total.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        say(f"  step {step + 1}: loss {parts.total.mean().item():.4f} {time.perf_counter() - start:.3f} s"
            + (" (warm-up)" if step < args.warmup else ""))
    step_s = sum(times) / len(times)
    mine = {"gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    result = {"offload": offload, "world": world, "params_b": n_params / 1e9, "lora_modules": len(selection.names),
              "built_s": built, "step_s": step_s, "tokens_per_s": world * args.batch * args.seq / step_s,
              "per_process": everyone, "full_bf16_gib": 2 * n_params / 2**30}
    del model, inner, optimizer, params, batch, parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def part2(args, work: Path, offload: bool) -> str:
    import torch.distributed as dist

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    out = work / ("out-offload" if offload else "out")
    cfg = TrainConfig.build(flag_values=dict(
        data_path=str(work / "data" / "train.jsonl"), model_name_or_path=str(work / "tiny"), output_dir=str(out),
        use_lora=True, lora_target="all", learning_rate=1e-2, max_steps=4, per_device_train_batch_size=2, bf16=True,
        gradient_checkpointing=True, fsdp=True, fsdp_cpu_offload=offload, save_steps=2, logging_steps=1,
        device=args.device if args.device == "cpu" else None))
    trainer = Trainer(cfg, Reporter(enabled=False))
    trainer.setup()
    trainer.run()
    dist.barrier()
    if dist.get_rank() != 0:
        return ""
    from peft import PeftModel
    from safetensors.torch import load_file

    from kimi_lora_cli.loading import load_model

    tensors = load_file(str(out / "adapter_model.safetensors"))
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    b_norm = sum(float(v.float().abs().sum()) for k, v in tensors.items() if "lora_B" in k)
    base = load_model(work / "tiny", load_whisper=False).model
    loaded = sum(1 for n, _ in PeftModel.from_pretrained(base, str(out)).named_parameters() if "lora_" in n)
    ok = bool(tensors) and not empty and b_norm > 0 and loaded == len(tensors) \
        and (out / "checkpoint-4" / "trainable.safetensors").is_file()
    return (f"{len(tensors)} tensors, empty {len(empty)}, |lora_B| sum {b_norm:.4f}, peft loads {loaded} "
            f"-> {'OK' if ok else 'FAILED'}")


def worker(args) -> None:
    import torch

    from kimi_lora_cli.training.fsdp import init_process_group

    if args.device != "cpu":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    init_process_group("cpu" if args.device == "cpu" else "cuda")
    import torch.distributed as dist

    torch.manual_seed(0)
    for offload in (False, True):
        if offload and args.skip_offload:
            continue
        say(f"Part 1: full-size LoRA, FSDP over {dist.get_world_size()} process(es)"
            + (", CPU offload" if offload else "") + f" ({args.preset})")
        r = part1(args, offload)
        say(f"  {r['params_b']:.2f} B parameters ({r['full_bf16_gib']:.1f} GiB in bf16), LoRA on {r['lora_modules']} "
            f"modules, sharded and initialised in {r['built_s']:.1f} s")
        say(f"  seq {args.seq} x micro-batch {args.batch} per process: {r['step_s']:.3f} s/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s in all")
        for i, p in enumerate(r["per_process"]):
            gpu = f"GPU peak {p['gpu_peak_gib']:.1f} GiB allocated, " if p["gpu_peak_gib"] is not None else ""
            say(f"  process {i}: {gpu}host peak RSS {p['host_peak_gib']:.1f} GiB")
        say("  " + json.dumps(r))
    if not args.skip_trainer:
        work = Path(args.work)
        for offload in (False, True):
            if offload and args.skip_offload:
                continue
            say("Part 2: kimi-lora train --fsdp --bf16 --gradient-checkpointing"
                + (" --fsdp-cpu-offload" if offload else "") + ": " + part2(args, work, offload))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--processes", type=int, default=None, help="processes (default: every GPU)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-offload", action="store_true")
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset == "small" and args.seq == 2048:
        args.seq = 256
    if "WORLD_SIZE" in os.environ:
        worker(args)
        return
    import torch

    n = args.processes or (torch.cuda.device_count() if args.device != "cpu" else 2) or 1
    work = Path(tempfile.mkdtemp(prefix="kimi-lora-fsdp-"))
    try:
        from kimi_lora_cli.data.synthetic import write_synthetic_dataset
        from kimi_lora_cli.loading import inspect_folder
        from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

        model = build_tiny_checkpoint(work / "tiny", TinySpec(hidden_size=128, intermediate_size=256,
                                                              num_attention_heads=4, num_key_value_heads=2))
        write_synthetic_dataset(work / "data", inspect_folder(model).config, n=8, task="mixed")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
               *sys.argv[1:], "--work", str(work)]
        raise SystemExit(subprocess.call(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
