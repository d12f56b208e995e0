"""Full-size Kimi-Audio on one GPU: bf16 LoRA vs nf4 QLoRA side by side, peak memory and tokens/s.

The release-shape model (28 + 6 layers, hidden 3584, vocab 168448, ~9.8 B parameters) is made with
random weights directly on the GPU - for QLoRA each decoder linear is drawn in bf16 and quantized on
the GPU one at a time through the same `quantize_skeleton` / `quantize_into` as `load_model(...,
quantization="nf4")` - then wrapped with LoRA r=8 `all` (and, for QLoRA, `prepare_quantized`: norms in
float32, input gradients) exactly as `kimi-lora train` does, gradient checkpointing on, micro-batch 1,
ASR-shaped rows (train_full_size.synthetic_batch) under bf16 autocast with the trainer's loss. Each
(mode, sequence) runs in a fresh process so every peak is its own.

    python benchmarks/gpu/qlora.py                                   # bf16 vs nf4 at 2048 and 8192
    python benchmarks/gpu/qlora.py --seqs 2048 --modes nf4 --double-quant
    python benchmarks/gpu/qlora.py --preset small --device cpu --seqs 256 --steps 1 --warmup 0   # smoke run

Goals (issue #20): QLoRA trains at 8192 in under 16 GiB, bf16 LoRA at 8192 under 24 GiB, QLoRA tokens/s
at least 0.6x of bf16 LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from train_full_size import FULL, SMALL, random_init, synthetic_batch, timed_steps  # noqa: E402


def build(shape: dict, mode: str, double_quant: bool, device):
    """(config, LoRA model in train mode, weight bytes): `mode` bf16 or nf4 / fp4 / int8."""
    import torch

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.quantization import QuantSpec, is_quantized_layer, quantize_into, quantize_skeleton
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.lora import prepare_quantized, wrap_lora

    cfg = KimiAudioConfig.from_dict(shape)
    torch.manual_seed(0)
    model = build_kimi_model(cfg).to(torch.bfloat16)  # meta
    spec = None if mode == "bf16" else QuantSpec(mode, double_quant)
    if spec is not None:
        quantize_skeleton(model, spec, torch.bfloat16, device)
    model.gradient_checkpointing_enable()
    flags = dict(data_path="-", model_path="-", use_lora=True, lora_rank=8, lora_alpha=16, lora_target="all",
                 lora_dropout=0.05, gradient_checkpointing=True, bf16=True, quantization=spec and spec.mode)
    tcfg = TrainConfig.build(flag_values=flags)
    peft_model, selection = wrap_lora(model, tcfg)
    if spec is not None:
        prepare_quantized(model, gradient_checkpointing=True)
    t0 = time.perf_counter()
    quantized = {id(m.weight) for m in model.modules() if is_quantized_layer(m)}
    for module in peft_model.modules():  # allocate (and draw) every other tensor on the device
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta and id(p) not in quantized:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                               requires_grad=p.requires_grad)
    random_init(peft_model)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):  # LoRA starts as the identity (B = 0), as in training
            for b in module.lora_B.values():
                torch.nn.init.zeros_(b.weight)
    g = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if is_quantized_layer(m):
            w = torch.empty(m.out_features, m.in_features, dtype=torch.bfloat16, device=device).normal_(
                0.0, 0.02, generator=g)
            quantize_into(m, w, spec, torch.bfloat16, device)
            del w
    weight_bytes = sum(p.numel() * p.element_size() for p in peft_model.parameters())
    print(f"{mode}: built in {time.perf_counter() - t0:.1f} s, {len(selection.names)} LoRA modules, "
          f"{weight_bytes / 2**30:.2f} GiB of parameters", flush=True)
    return cfg, peft_model.train()


def one_run(args) -> dict:
    import torch


    device = torch.device(args.device)
    shape = FULL if args.preset == "full" else SMALL
    cfg, model = build(shape, args.mode, args.double_quant, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        after_load = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = synthetic_batch(cfg, 1, args.seq, args.text_tokens, device)
    times = timed_steps(model, batch, params, opt, device, args.warmup, args.steps, indent="  ", flush=True)
    result = {"mode": args.mode + ("+dq" if args.double_quant and args.mode != "bf16" else ""), "seq": args.seq,
              "tokens_per_s": args.seq / (sum(times) / len(times))}
    if device.type == "cuda":
        result.update(weights_gib=after_load, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                      reserved_gib=torch.cuda.max_memory_reserved() / 2**30, device=torch.cuda.get_device_name())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqs", default="2048,8192")
    ap.add_argument("--modes", default="bf16,nf4")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one run, in a child process
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(one_run(args)), flush=True)
        return
    results = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--seq", str(seq), "--preset", args.preset, "--device",
                   args.device, "--text-tokens", str(args.text_tokens), "--steps", str(args.steps), "--warmup",
                   str(args.warmup)] + (["--double-quant"] if args.double_quant else [])
            print(f"== {mode} at sequence {seq}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            sys.stdout.write(proc.stdout)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                tail = proc.stderr.strip().splitlines()[-3:]
                oom = "out of memory" in proc.stderr.lower()
                print(f"   {mode} at {seq}: {'out of memory' if oom else 'failed'}: {' | '.join(tail)}")
                results.append({"mode": mode, "seq": seq, "failed": "oom" if oom else "error"})
                continue
            results.append(json.loads(line[len("RESULT "):]))
    print()
    print(f"{'mode':8s} {'seq':>6s} {'weights GiB':>12s} {'peak GiB':>9s} {'reserved':>9s} {'tokens/s':>9s}")
    for r in results:
        if "failed" in r:
            print(f"{r['mode']:8s} {r['seq']:6d} {r['failed']:>12s}")
            continue
        print(f"{r['mode']:8s} {r['seq']:6d} {r.get('weights_gib', float('nan')):12.2f} "
              f"{r.get('peak_gib', float('nan')):9.2f} {r.get('reserved_gib', float('nan')):9.2f} "
              f"{r['tokens_per_s']:9.0f}")
    by = {(r["mode"].split("+")[0], r["seq"]): r for r in results if "failed" not in r}
    for seq in [int(s) for s in args.seqs.split(",")]:
        q, b = by.get(("nf4", seq)), by.get(("bf16", seq))
        if q and b:
            print(f"seq {seq}: nf4 / bf16 tokens/s = {q['tokens_per_s'] / b['tokens_per_s']:.2f}x (goal >= 0.6x)"
                  + (f"; peaks {q['peak_gib']:.1f} vs {b['peak_gib']:.1f} GiB" if "peak_gib" in q else ""))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
