"""Packing versus padding on one H100/H200: full-size Kimi-Audio LoRA, LibriSpeech-like lengths.

Builds the release-shape model (28 + 6 layers, hidden 3584, ~9.8 B parameters) with random bf16
weights on the GPU, LoRA r=8 `all`, gradient checkpointing, the trainer's loss. Then:

1. Checks (bf16 tolerances) that packed rows give each sample its own loss, with every packed
   attention backend the device has (auto = flash-attn varlen if installed, else flex_attention;
   split; sdpa block mask), and that auto and split give the same LoRA gradients (flex backward).
2. Trains K micro-batches three ways and reports real (non-padding) tokens/s, the padding share and
   the peak memory of each:
     padding       B samples per micro-batch in the seeded order, padded to their longest
     packing       B rows of the longest sample's length, attention chosen automatically
     packing-sdpa  the same rows through SDPA with a dense block mask
   Every mode holds at most B x longest tokens per micro-batch (the same memory budget).

    python benchmarks/gpu/train_packing.py                              # H100/H200, < 2 minutes
    python benchmarks/gpu/train_packing.py --preset small --device cpu  # smoke run anywhere
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_full_size import FULL, SMALL, build_lora_model  # noqa: E402


def build(preset: str, device):
    cfg, model, _ = build_lora_model(FULL if preset == "full" else SMALL, device, lora_dropout=0.0)
    return cfg, model


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def loss_of(model, dataset, micro, device):
    import torch

    from kimi_lora_cli.data.collate import batch_to
    from kimi_lora_cli.training.loss import compute_loss

    batch = batch_to(dataset.batch(micro), device, torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return compute_loss(model, batch), batch


def check(model, dataset, rows, length, device) -> bool:
    """Packed per-sample losses equal the samples alone, for every backend; auto and split give the same
    LoRA gradients."""
    import torch

    from kimi_lora_cli.models.kimi_audio.packing import choose_backend, flash_available, flex_available
    from kimi_lora_cli.training.plan import PackedMicro

    core = model.base_model.model
    auto = choose_backend("auto", core.config.attn_implementation, device)
    print(f"packed attention on {device.type}: auto -> {auto} (flash-attn installed: {flash_available()}, "
          f"flex_attention importable: {flex_available()})")
    micro = PackedMicro(rows, length)
    order = [i for r in rows for i in r]
    ok = True
    with torch.no_grad():
        alone = torch.stack([loss_of(model, dataset, [i], device)[0].total[0] for i in order]).float()
        backends = ["auto", "split", "sdpa"] + (["flex"] if device.type == "cpu" and flex_available() else [])
        for backend in backends:
            core.packed_attention = backend
            packed = loss_of(model, dataset, micro, device)[0].total.float()
            err = float((packed - alone).abs().max() / alone.abs().max())
            good = err < 2e-2
            ok &= good
            print(f"  {backend:5s}: {len(order)} samples in {len(rows)} rows, per-sample loss max rel. error vs "
                  f"alone {err:.2e} -> {'OK' if good else 'FAILED'}")
    if device.type == "cuda":  # flex / flash backward (torch has no CPU backward for flex)
        # bf16 gradients through 34 layers differ between any two attention kernels; the yardstick is how
        # far two kernels that are right by construction (split: causal SDPA per sample; sdpa: one dense
        # block mask) are apart. auto must be within twice that (or 1e-2).
        params = [p for p in model.parameters() if p.requires_grad]
        grads = {}
        for backend in ("auto", "split", "sdpa"):
            core.packed_attention = backend
            loss_of(model, dataset, micro, device)[0].total.mean().backward()
            grads[backend] = torch.cat([p.grad.float().flatten() for p in params])
            model.zero_grad(set_to_none=True)

        def rel(x, y):
            return float((grads[x] - grads[y]).norm() / grads[y].norm())

        floor = rel("sdpa", "split")
        err = rel("auto", "split")
        good = err <= max(2 * floor, 1e-2)
        ok &= good
        print(f"  LoRA gradients: auto ({auto}) vs split rel. error {err:.2e}, sdpa vs split {floor:.2e}, "
              f"auto vs sdpa {rel('auto', 'sdpa'):.2e} -> {'OK' if good else 'FAILED'}")
    core.packed_attention = "auto"
    return ok


def train_mode(model, dataset, micros, device, warmup: int) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    real = computed = 0
    start = warm_start = time.perf_counter()
    warm_s = 0.0
    for k, micro in enumerate(micros):
        if k == warmup:
            sync(device)
            warm_s = time.perf_counter() - warm_start
            start = time.perf_counter()
            real = computed = 0
        parts, batch = loss_of(model, dataset, micro, device)
        parts.total.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += parts.tokens
        computed += batch["input_ids"].numel()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tps": real / seconds, "padding": 1 - real / computed, "seconds": seconds, "peak": peak,
            "warm": warm_s, "steps": len(micros) - warmup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--micro", type=int, default=8, help="samples (padding) or rows (packing) per micro-batch")
    ap.add_argument("--steps", type=int, default=6, help="timed micro-batches per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--check-only", action="store_true", help="only the packed-row checks")
    ap.add_argument("--lengths", default="train-clean,dev-clean", help="duration histograms (benchmarks/_librispeech.py)")
    args = ap.parse_args()

    import torch
    from _librispeech import asr_samples

    from kimi_lora_cli.data.dataset import KimiDataset
    from kimi_lora_cli.training.plan import BatchPlan, pack_rows

    device = torch.device(args.device)
    cfg, model = build(args.preset, device)
    core = model.base_model.model
    ok = True
    for k, kind in enumerate(args.lengths.split(",")):
        samples, store, longest = asr_samples(args.samples, cfg, seed=0, feature_dtype=torch.bfloat16, kind=kind)
        dataset = KimiDataset(samples, cfg.pad_token_id, cfg.kimia_adaptor_input_dim, store)
        lengths = dataset.lengths()
        print(f"\n{len(samples)} LibriSpeech {kind}-like samples: {min(lengths)}-{max(lengths)} tokens (mean "
              f"{sum(lengths) / len(lengths):.0f}); micro-batch {args.micro} samples or {args.micro} rows of {longest}")
        if k == 0:
            # the check uses micro-batch-sized rows, so flex compiles for the shape the packing run uses
            rows = pack_rows(list(range(min(len(samples), 3 * args.micro))), lengths, longest)[: args.micro]
            ok = check(model, dataset, rows, longest, device)
            if args.check_only:
                break

        n = args.steps + args.warmup
        indices = list(range(len(samples)))

        def micros(plan, n=n):
            stream = plan.steps()
            return [next(stream).micro[0] for _ in range(n)]

        padded = micros(BatchPlan(indices, lengths, 0, 1, 0, args.micro, 1))
        packed = micros(BatchPlan(indices, lengths, 0, 1, 0, args.micro, 1, packing_length=longest))
        results = {}
        for mode, batches, backend in (("padding", padded, "auto"), ("packing", packed, "auto"),
                                       ("packing-sdpa", packed, "sdpa")):
            core.packed_attention = backend
            r = results[mode] = train_mode(model, dataset, batches, device, args.warmup)
            print(f"{mode:13s} {r['steps']} micro-batches in {r['seconds']:.2f} s: {r['tps']:9,.0f} real tokens/s, "
                  f"padding {100 * r['padding']:4.1f}%, peak memory {r['peak']:.1f} GiB (warm-up {r['warm']:.1f} s)")
        core.packed_attention = "auto"
        ratio = results["packing"]["tps"] / results["padding"]["tps"]
        print(f"packing / padding: {ratio:.2f}x real tokens/s (target >= 1.5x) {'OK' if ratio >= 1.5 else 'BELOW'}; "
              f"packing-sdpa / padding: {results['packing-sdpa']['tps'] / results['padding']['tps']:.2f}x")
    print(f"packed-row checks: {'OK' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
