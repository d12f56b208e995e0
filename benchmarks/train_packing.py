"""Training throughput on CPU, packing versus padding, LibriSpeech-like lengths (target: >= 1.5x).

For each model config (the tiny test model and a larger CPU one) one epoch of the same samples is
trained three ways, side by side, with the trainer's own pieces (batch plan, collate, per-sample loss,
LoRA r=8 `all`, AdamW):

  padding         micro-batches of B samples in the seeded order, padded to their longest sample
  padding+group   the same with --group-by-length (similar lengths share a micro-batch)
  packing         --packing: B rows of --packing-length = the longest sample, first-fit decreasing

Every mode holds at most B x packing-length tokens in a micro-batch (the same memory); the figure
is real (non-padding) tokens per second, with the share of computed positions that were padding.

    python benchmarks/train_packing.py [--samples 160] [--micro 4,8] [--configs tiny,larger]
        [--lengths train-clean,dev-clean]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, mimo_layers=2, mimo_from_layer=2),
    "larger": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, mimo_layers=2, mimo_from_layer=4),
}


def build(shape: dict):
    import torch

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, tiny_config
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.lora import wrap_lora

    config = KimiAudioConfig.from_dict(tiny_config(TinySpec(**shape), 512))
    model = build_kimi_model(config, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and p.ndim == 1 else torch.randn_like(p) * 0.02)
    tcfg = TrainConfig.build(flag_values=dict(data_path="-", model_path="-", use_lora=True, lora_rank=8,
                                              lora_alpha=16, lora_target="all", lora_dropout=0.0))
    model, _ = wrap_lora(model, tcfg)
    return config, model.train()


def run_epoch(model, dataset, steps) -> dict:
    import torch

    from kimi_lora_cli.training.loss import compute_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    compute_loss(model, dataset.batch(steps[0].micro[0])).total.sum().backward()  # warm-up, not timed
    opt.zero_grad(set_to_none=True)
    real = computed = 0
    micro_shapes = []
    start = time.perf_counter()
    for step in steps:
        for micro in step.micro:
            batch = dataset.batch(micro)
            parts = compute_loss(model, batch)
            (parts.total.sum() / step.total_samples).backward()
            real += parts.tokens
            computed += batch["input_ids"].numel()
            micro_shapes.append(tuple(batch["input_ids"].shape))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "real": real, "computed": computed, "tps": real / seconds,
            "padding": 1 - real / computed, "max_tokens": max(a * b for a, b in micro_shapes)}


def bench(name: str, shape: dict, n: int, micro: int, seed: int, kind: str) -> float:
    import torch
    from _librispeech import asr_samples

    from kimi_lora_cli.data.dataset import KimiDataset
    from kimi_lora_cli.training.plan import BatchPlan

    config, model = build(shape)
    samples, store, longest = asr_samples(n, config, seed, kind=kind)
    dataset = KimiDataset(samples, config.pad_token_id, config.kimia_adaptor_input_dim, store)
    lengths = dataset.lengths()
    row = longest
    print(f"\n[{name}, {kind} lengths] hidden {config.hidden_size}, {config.num_hidden_layers}+{config.kimia_mimo_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; {n} samples, "
          f"{sum(lengths)} tokens, {min(lengths)}-{max(lengths)} per sample (mean {sum(lengths) / n:.0f}); "
          f"micro-batch {micro} samples or {micro} rows of {row}; {torch.get_num_threads()} threads")
    indices = list(range(n))
    modes = {
        "padding": BatchPlan(indices, lengths, seed, 1, 0, micro, 1),
        "padding+group": BatchPlan(indices, lengths, seed, 1, 0, micro, 1, group_by_length=True),
        "packing": BatchPlan(indices, lengths, seed, 1, 0, micro, 1, packing_length=row),
    }
    results = {}
    for mode, plan in modes.items():
        per_epoch = plan.steps_per_epoch()
        stream = plan.steps()
        steps = [next(stream) for _ in range(per_epoch)]
        r = run_epoch(model, dataset, steps)
        results[mode] = r
        print(f"  {mode:14s} {per_epoch:3d} steps  {r['real']:7d} real tokens in {r['seconds']:6.2f} s  "
              f"-> {r['tps']:8.0f} real tokens/s   padding {100 * r['padding']:4.1f}%   "
              f"largest micro-batch {r['max_tokens']} tokens")
    ratio = results["packing"]["tps"] / results["padding"]["tps"]
    group = results["packing"]["tps"] / results["padding+group"]["tps"]
    ceiling = (1 - results["packing"]["padding"]) / (1 - results["padding"]["padding"])
    print(f"  packing / padding: {ratio:.2f}x real tokens/s (target >= 1.5x) {'OK' if ratio >= 1.5 else 'BELOW'}; "
          f"packing / padding+group-by-length: {group:.2f}x; compute-bound ceiling from the padding shares "
          f"{ceiling:.2f}x")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--micro", default="4,8", help="micro-batch sizes to try, comma-separated")
    ap.add_argument("--configs", default="tiny,larger")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="train-clean,dev-clean",
                    help="duration histograms: train-clean (LibriSpeech training, mean ~12.5 s) and/or dev-clean "
                    "(dev/test sets, mean ~8 s)")
    args = ap.parse_args()
    for kind in args.lengths.split(","):
        for name in args.configs.split(","):
            for micro in args.micro.split(","):
                bench(name, CONFIGS[name], args.samples, int(micro), args.seed, kind)


if __name__ == "__main__":
    main()
