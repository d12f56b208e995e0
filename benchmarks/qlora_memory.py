"""QLoRA memory: weights per mode at the release size (computed), and `train` peak RSS on the CPU (measured).

    python benchmarks/qlora_memory.py [--size-gb 1.0] [--steps 3] [--skip-train] [--workdir DIR]

Part 1 builds Kimi-Audio at the release size on the meta device (config only, no weights) plus the
whisper-large-v3 encoder, and counts the bytes of the weights in bf16 and with the decoder linears of
both stacks in nf4 (with and without double quantization) and int8 - bitsandbytes' storage: 4-bit
codes + one float32 scale per 64 weights (double quant: one uint8 scale per 64 + one float32 per 256
blocks), int8 codes + one float32 scale per row. What stays in bf16 (embeddings, heads, adaptor, norms,
biases, Whisper) is listed. The formula is checked against bitsandbytes on one real 3584 x 3584 layer.

Part 2 writes a ~--size-gb float32 Kimi-shaped checkpoint (benchmarks/train_fsdp_memory.py's builder)
and runs `kimi-lora train --use-lora --bf16 --gradient-checkpointing` on the CPU twice, each in a fresh
process: plain bf16 LoRA and `--quantization nf4`. Reports peak RSS and steps/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _adapter_bench import measure, warm_page_cache  # noqa: E402
from train_fsdp_memory import build_base, steps_per_second  # noqa: E402

RELEASE = dict(vocab_size=168448, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, kimia_mimo_layers=6,
               kimia_mimo_transformer_from_layer_index=21, kimia_adaptor_input_dim=5120)
BLOCK = 64


def quantized_bytes(numel: int, rows: int, mode: str) -> int:
    if mode == "int8":
        return numel + 4 * rows
    if mode == "nf4":
        return numel // 2 + 4 * (numel // BLOCK)
    blocks = numel // BLOCK  # nf4 + double quant
    return numel // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256


def part1() -> dict:
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from kimi_lora_cli.loading import build_kimi_model
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.quantization import is_decoder_linear

    model = build_kimi_model(KimiAudioConfig.from_dict(RELEASE))
    wcfg = WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                         num_mel_bins=128, max_source_positions=1500)
    with torch.device("meta"):
        whisper = sum(p.numel() for p in WhisperEncoder(wcfg).parameters())
    kept: dict[str, int] = {"whisper-large-v3 encoder": whisper}
    linears = []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and p.ndim == 2 and is_decoder_linear(module):
            linears.append((p.numel(), p.shape[0]))
            continue
        part = ("embeddings" if "embed_tokens" in name else "heads" if name.startswith(("lm_head", "mimo_output"))
                else "adaptor" if "vq_adaptor" in name else "norms" if "norm" in name else "decoder biases")
        kept[part] = kept.get(part, 0) + p.numel()
    n_quant = sum(n for n, _ in linears)
    kept_bytes = 2 * sum(kept.values())
    print(f"Kimi-Audio at the release size: {(n_quant + sum(kept.values())) / 1e9:.2f} B parameters "
          f"({len(linears)} decoder linears = {n_quant / 1e9:.2f} B quantizable)")
    print("stays in bf16: " + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in kept.items())
          + f" = {kept_bytes / 2**30:.2f} GiB")
    table = {}
    print(f"\n{'mode':12s} {'decoder linears':>16s} {'rest (bf16)':>12s} {'all weights':>12s}")
    for mode in ("bf16", "int8", "nf4", "nf4+dq"):
        q = 2 * n_quant if mode == "bf16" else sum(quantized_bytes(n, rows, mode) for n, rows in linears)
        table[mode] = {"decoder_linears_gib": q / 2**30, "rest_gib": kept_bytes / 2**30,
                       "total_gib": (q + kept_bytes) / 2**30}
        print(f"{mode:12s} {q / 2**30:13.2f} GiB {kept_bytes / 2**30:8.2f} GiB {(q + kept_bytes) / 2**30:8.2f} GiB")
    return {"parameters": n_quant + sum(kept.values()), "quantizable": n_quant, "kept": kept, "modes": table}


def check_formula() -> None:
    """The storage formula against bitsandbytes on one real release-size layer (3584 x 3584)."""
    import torch

    from kimi_lora_cli.quantization import QuantSpec, new_layer, quantize_into
    from kimi_lora_cli.quantization import quantized_bytes as held

    w = torch.randn(3584, 3584, dtype=torch.bfloat16) * 0.02
    for mode, spec in (("int8", QuantSpec("int8")), ("nf4", QuantSpec("nf4")), ("nf4+dq", QuantSpec("nf4", True))):
        layer = new_layer(3584, 3584, False, spec, torch.bfloat16)
        quantize_into(layer, w, spec, torch.bfloat16, "cpu")
        real, _ = held(torch.nn.Sequential(layer))
        want = quantized_bytes(w.numel(), 3584, mode)
        print(f"  {mode}: bitsandbytes holds {real} bytes, formula {want}")
        assert abs(real - want) <= 8, (mode, real, want)


def part2(size_gb: float, steps: int, workdir: Path | None) -> dict:
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig

    work = Path(tempfile.mkdtemp(prefix="qlora-bench-", dir=workdir))
    results = {}
    try:
        print(f"\nbuilding a {size_gb:g} GB float32 checkpoint in {work} ...", flush=True)
        base = build_base(work / "base", size_gb)
        cfg = KimiAudioConfig.from_json_file(base / "config.json")
        data = write_synthetic_dataset(work / "data", cfg.to_dict(), n=8, seed=0, task="mixed")
        size = sum(f.stat().st_size for f in base.glob("model-*.safetensors"))
        print(f"base: {size / 2**30:.2f} GiB float32 ({size / 2**31:.2f} GiB in bf16), {cfg.num_hidden_layers}+"
              f"{cfg.kimia_mimo_layers} layers, hidden {cfg.hidden_size}", flush=True)
        train = [sys.executable, "-m", "kimi_lora_cli", "train", "--model-name-or-path", str(base), "--data-path",
                 str(data), "--use-lora", "--bf16", "--gradient-checkpointing", "--lora-dropout", "0", "--max-steps",
                 str(steps), "--logging-steps", "1", "--save-steps", "100000", "--device", "cpu",
                 "--per-device-train-batch-size", "2"]
        for name, extra in (("bf16 LoRA", []), ("nf4 QLoRA", ["--quantization", "nf4"]),
                            ("nf4+dq QLoRA", ["--quantization", "nf4", "--double-quant"])):
            out = work / name.replace(" ", "-")
            seconds, rss = measure([*train, *extra, "--output-dir", str(out)], before=lambda: warm_page_cache([base]))
            results[name] = {"peak_rss_mb": rss, "steps_per_s": steps_per_second(out), "wall_s": seconds}
            print(f"  {name:13s}: peak RSS {rss:7.0f} MB, {results[name]['steps_per_s']:.3f} steps/s, "
                  f"{seconds:.1f} s in all", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        _, imports = measure([sys.executable, "-c", "import torch, transformers, peft, accelerate, bitsandbytes"])
        results["imports_rss_mb"] = imports
        results["checkpoint_gib"] = size / 2**30
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, q = results["bf16 LoRA"]["peak_rss_mb"], results["nf4 QLoRA"]["peak_rss_mb"]
    print(f"(imports alone: {imports:.0f} MB) nf4 / bf16 peak RSS = {q / b:.2f}x; above the imports "
          f"{(q - imports) / (b - imports):.2f}x; steps/s nf4 / bf16 = "
          f"{results['nf4 QLoRA']['steps_per_s'] / results['bf16 LoRA']['steps_per_s']:.2f}x")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true", help="only the computed table")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    out = {"release": part1()}
    check_formula()
    if not args.skip_train:
        out["cpu_train"] = part2(args.size_gb, args.steps, args.workdir)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
