"""DeepSpeed ZeRO-3 LoRA training of the full-size Kimi-Audio on one GPU, with and without CPU offload,
next to FSDP and plain (DDP-style, unwrapped) training in the same call: peak GPU memory and tokens/s;
then `kimi-lora train --deepspeed zero3[_offload]` end to end (saved adapter checked, resume).

Part 1 builds the release-shape model (28 + 6 layers, hidden 3584, vocab 168448, ~9.8 B parameters)
on the meta device, wraps LoRA r=8 `all`, gradient checkpointing on, bf16, and trains it on ASR-shaped
micro-batches of 2048 tokens with the trainer's loss, four ways, one after the other in this process:
  plain      every weight materialised on the GPU (what DDP holds per GPU),
  fsdp       the trainer's FSDP2 sharding (one process: the same memory as plain, its own overheads),
  zero3      the trainer's ZeRO-3 build (each layer materialised, partitioned) + deepspeed.initialize,
  zero3_off  the same with the shipped zero3_offload config (optimizer state and weights in host memory).
Random weights are written straight into each layer's tensors (no 19 GB checkpoint on disk).

Part 2 runs the real Trainer (`--deepspeed zero3` and `zero3_offload`, `--bf16 --gradient-checkpointing`)
on a small release-layout checkpoint for 4 steps (checkpoint at 2), resumes a copy from step 2 and
checks: no empty tensor in the adapter, trained lora_B, plain peft loads it, the resumed curve equals
the straight one.

    python benchmarks/gpu/train_deepspeed.py                       # one GPU
    python benchmarks/gpu/train_deepspeed.py --preset small --device cpu --steps 2   # CPU smoke (gloo)

Budget: about 4 minutes on one H100 (the offload run steps on the CPU: fewer steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_full_size import FULL, SMALL, synthetic_batch  # noqa: E402

RUNS = ("plain", "fsdp", "zero3", "zero3_off")


def random_fill(params: list, device) -> None:
    """Release-like random values (norms at 1) for base weights given as (checkpoint key, tensor), on
    `device`, drawn from the key: every run trains the same model, whatever order it fills it in."""
    import zlib

    import torch

    g = torch.Generator(device=device)
    with torch.no_grad():
        for key, p in params:
            if p.ndim == 1 and "norm" in key:
                p.fill_(1.0)
            elif p.numel():
                g.manual_seed(zlib.crc32(key.encode()))
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)


def build(kind: str, args, device):
    """(config, model to step, optimizer or None, step function, number of base parameters)."""
    import torch

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.sharded import checkpoint_key, local
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.lora import init_adapter_weights, wrap_lora
    from kimi_lora_cli.training.loss import compute_loss
    from kimi_lora_cli.training.optim import make_optimizer

    cfg = KimiAudioConfig.from_dict(FULL if args.preset == "full" else SMALL)
    ds_name = {"zero3": "zero3", "zero3_off": "zero3_offload"}.get(kind)
    tcfg = TrainConfig.build(flag_values=dict(data_path="-", model_path="-", use_lora=True, lora_rank=8, lora_alpha=16,
                                              lora_target="all", lora_dropout=0.0, bf16=True, deepspeed=ds_name,
                                              per_device_train_batch_size=args.batch))
    inner = build_kimi_model(cfg).to(torch.bfloat16)  # meta: no memory yet
    n_params = sum(p.numel() for p in inner.parameters())
    inner.gradient_checkpointing_enable()
    model, _ = wrap_lora(inner, tcfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if kind in ("plain", "fsdp"):
        if kind == "fsdp":
            from kimi_lora_cli.training.fsdp import FsdpSettings, shard_model

            shard_model(inner, FsdpSettings(bf16=True), device)
        else:
            model.to_empty(device=device)
        random_fill([(checkpoint_key(n), local(p)) for n, p in model.named_parameters()
                     if checkpoint_key(n) is not None], device)
        init_adapter_weights(model, 0)
        optimizer = make_optimizer(model, tcfg)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(batch):
            with autocast:
                parts = compute_loss(model, batch)
            parts.total.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return parts

        return cfg, model, step, n_params
    from kimi_lora_cli.training import zero
    from kimi_lora_cli.training.distributed import deepspeed_config, fill_model_sizes

    ds_config = fill_model_sizes(deepspeed_config(tcfg, world=1), cfg)
    def fill(wanted):
        random_fill([(key, p) for key, ps in wanted.items() for p in ps], device)

    zero.partition_in_units(inner, model, ds_config, device, fill, seed=0)
    engine = zero.initialize(model, make_optimizer(model, tcfg), ds_config)

    def step(batch):
        engine.set_gradient_accumulation_boundary(True)
        with autocast:
            parts = compute_loss(engine, batch)
        engine.backward(parts.total.mean(), scale_wrt_gas=False)
        engine.step()
        return parts

    return cfg, engine, step, n_params


def part1(args, kind: str) -> dict:
    import torch
    import torch.distributed as dist

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    cfg, model, step, n_params = build(kind, args, device)
    built = time.perf_counter() - t0
    model.train()
    batch = synthetic_batch(cfg, args.batch, args.seq, args.text_tokens, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    steps = args.steps if kind != "zero3_off" else max(1, args.steps // 2)
    for i in range(args.warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        parts = step(batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        print(f"  step {i + 1}: loss {parts.total.mean().item():.4f} {time.perf_counter() - start:.3f} s"
              + (" (warm-up)" if i < args.warmup else ""), flush=True)
    step_s = sum(times) / len(times)
    result = {"run": kind, "params_b": n_params / 1e9, "built_s": built, "step_s": step_s,
              "tokens_per_s": args.batch * args.seq / step_s,
              "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if hasattr(model, "destroy"):  # the DeepSpeed engine: its hooks and buffers go too
        model.destroy()
    del model, step, batch, parts
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def part2(args, work: Path, name: str) -> str:
    """`kimi-lora train --deepspeed NAME --bf16 --gradient-checkpointing` for 4 steps, and a copy stopped
    at step 2 and resumed; in fresh processes (DeepSpeed keeps process-wide state)."""
    import subprocess

    def train(out: Path, steps: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "kimi_lora_cli", "train", "--model-name-or-path", str(work / "tiny"),
               "--data-path", str(work / "data" / "train.jsonl"), "--use-lora", "--lora-target", "all",
               "--lora-dropout", "0", "--learning-rate", "1e-2", "--lr-scheduler-type", "constant", "--max-steps",
               str(steps), "--save-steps", "2",
               "--logging-steps", "1", "--per-device-train-batch-size", "2", "--bf16", "--gradient-checkpointing",
               "--deepspeed", name, "--output-dir", str(out), *extra]
        if args.device == "cpu":
            cmd += ["--device", "cpu"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")

    straight, resumed = work / f"{name}-straight", work / f"{name}-resumed"
    train(straight, 4)
    train(resumed, 2)
    train(resumed, 4, "--resume-from-checkpoint", "latest")
    from peft import PeftModel
    from safetensors.torch import load_file

    from kimi_lora_cli.loading import load_model

    def losses(folder: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (folder / "logs" / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    tensors = load_file(str(straight / "adapter_model.safetensors"))
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    b_norm = sum(float(v.float().abs().sum()) for k, v in tensors.items() if "lora_B" in k)
    base = load_model(work / "tiny", load_whisper=False).model
    loaded = sum(1 for n, _ in PeftModel.from_pretrained(base, str(straight)).named_parameters() if "lora_" in n)
    a, b = losses(straight), losses(resumed)
    same = len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-2  # bf16
    ok = bool(tensors) and not empty and b_norm > 0 and loaded == len(tensors) and same
    return (f"{len(tensors)} tensors, empty {len(empty)}, |lora_B| sum {b_norm:.4f}, peft loads {loaded}, "
            f"losses {[round(x, 4) for x in a]} resumed {[round(x, 4) for x in b]} -> {'OK' if ok else 'FAILED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)  # ZeRO-3 traces its gather order in the first steps
    ap.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(RUNS))
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args()
    if args.preset == "small" and args.seq == 2048:
        args.seq = 256
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise SystemExit("deepspeed is not installed: pip install 'kimi-lora[deepspeed]'") from None
    import torch

    from kimi_lora_cli.training.distributed import init_process_group
    from kimi_lora_cli.training.zero import attach_process_group, prepare_environment

    device_type = "cpu" if args.device == "cpu" else "cuda"
    prepare_environment(device_type)
    init_process_group(device_type)
    attach_process_group()
    if device_type == "cuda":
        print(torch.cuda.get_device_name(0), flush=True)
    results = []
    for kind in args.runs.split(","):
        print(f"Part 1: full-size LoRA, one process, {kind} ({args.preset}, seq {args.seq} x batch {args.batch})",
              flush=True)
        r = part1(args, kind)
        gpu = f"GPU peak {r['gpu_peak_gib']:.1f} GiB allocated, " if r["gpu_peak_gib"] is not None else ""
        print(f"  {r['params_b']:.2f} B parameters, built in {r['built_s']:.1f} s; {r['step_s']:.3f} s/step, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {gpu}host peak RSS {r['host_peak_gib']:.1f} GiB", flush=True)
        results.append(r)
    print()
    print(f"{'run':10s} {'GPU peak GiB':>12s} {'tokens/s':>10s} {'host peak GiB':>14s}")
    for r in results:
        gpu = f"{r['gpu_peak_gib']:.1f}" if r["gpu_peak_gib"] is not None else "-"
        print(f"{r['run']:10s} {gpu:>12s} {r['tokens_per_s']:>10,.0f} {r['host_peak_gib']:>14.1f}")
    print(json.dumps(results))
    torch.distributed.destroy_process_group()
    if args.skip_trainer:
        return
    work = Path(tempfile.mkdtemp(prefix="kimi-lora-deepspeed-"))
    try:
        from kimi_lora_cli.data.synthetic import write_synthetic_dataset
        from kimi_lora_cli.loading import inspect_folder
        from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

        model = build_tiny_checkpoint(work / "tiny", TinySpec(hidden_size=128, intermediate_size=256,
                                                              num_attention_heads=4, num_key_value_heads=2))
        write_synthetic_dataset(work / "data", inspect_folder(model).config, n=8, task="mixed")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                 os.environ.get("PYTHONPATH")]))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        for name in ("zero3", "zero3_offload"):
            print(f"Part 2: kimi-lora train --deepspeed {name} --bf16 --gradient-checkpointing: "
                  + part2(args, work, name), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
