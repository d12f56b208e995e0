"""Full-size audio detokenizer on one CUDA GPU (random weights, bfloat16): real-time factor and memory.

    python benchmarks/gpu/detokenizer_full.py [--seconds 30] [--ode-steps 30] [--dtype bfloat16]
    python benchmarks/gpu/detokenizer_full.py --preset tiny --device cpu --seconds 3     # smoke test

Release sizes (`random_detokenizer` defaults: DiT 2304 hidden x 16 blocks x 18 heads, 16384 codes;
BigVGAN 2048 channels, rates 5,2,2,2,2,3,2 - vocoder sizes inferred, see benchmarks/detokenizer_rtf.py),
weights allocated directly in `--dtype` on the device. Runs the real streaming path (official
chunking, 30 ODE time points, look-ahead, cross-fades) on `--seconds` of random codes after a
warm-up utterance, and prints: RTF (compute seconds per audio second), the time to the first audio
piece, the DiT / vocoder split (a second, synchronised run), peak GPU memory and weight memory, and
checks the output length (codes x 4 x 480) and that a fixed seed repeats exactly. About a minute
on an H200 (most of it building the random weights and the warm-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="audio length of the timed utterance")
    ap.add_argument("--ode-steps", type=int, default=30)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import dataclasses

    import torch

    from kimi_lora_cli.models.detokenizer.streaming import StreamingRules, plan_chunks
    from kimi_lora_cli.models.detokenizer.tiny import TinyDetokenizerSpec, random_detokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    rules = dataclasses.replace(StreamingRules(), ode_steps=args.ode_steps)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    if args.preset == "tiny":
        spec = TinyDetokenizerSpec()
        detok = random_detokenizer(spec.dit, spec.vocoder, device=device, dtype=dtype, rules=rules)
    else:
        detok = random_detokenizer(device=device, dtype=dtype, rules=rules)
    sync()
    build = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for m in (detok.dit, detok.vocoder) for p in m.parameters())
    vocab = detok.dit.cfg.semantic_vocab_size
    print(f"{args.preset} detokenizer, {args.dtype} on {torch.cuda.get_device_name(device) if cuda else device}; "
          f"weights {weight_bytes / 2**30:.2f} GiB, built in {build:.1f} s; ODE points {args.ode_steps}")

    g = torch.Generator().manual_seed(0)
    detok.detokenize(torch.randint(0, vocab, (45,), generator=g), generator=torch.Generator().manual_seed(0))
    sync()
    n = int(round(args.seconds * 12.5))
    codes = torch.randint(0, vocab, (n,), generator=g)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # 1) plain timed run, chunk by chunk (time to first audio = the first chunk)
    pieces, first = [], None
    sync()
    t0 = time.perf_counter()
    noise = torch.Generator().manual_seed(1)
    detok.reset()
    for chunk in plan_chunks(n, rules):
        pieces.append(detok.push(codes[chunk.start:chunk.end], chunk.is_final, generator=noise))
        if first is None:
            sync()
            first = time.perf_counter() - t0
    sync()
    total = time.perf_counter() - t0
    wav = torch.cat([p.cpu() for p in pieces])
    audio = wav.numel() / detok.sampling_rate
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    assert wav.numel() == n * 4 * detok.hop, (wav.numel(), n * 4 * detok.hop)
    assert torch.isfinite(wav).all()

    # 2) the same utterance with synchronised timers around the DiT and vocoder calls
    spent = {"dit": 0.0, "vocoder": 0.0}

    def wrap(fn, key):
        def inner(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[key] += time.perf_counter() - t
            return out
        return inner

    detok._forward, detok._vocode = wrap(detok._forward, "dit"), wrap(detok._vocode, "vocoder")
    again = detok.detokenize(codes, generator=torch.Generator().manual_seed(1))
    same = torch.equal(again, wav)

    print(f"audio {audio:.1f} s ({n} codes, {len(plan_chunks(n, rules))} chunks) in {total:.2f} s: "
          f"RTF {total / audio:.4f} ({audio / total:.1f}x real time)")
    print(f"time to first audio (first chunk, 30 codes): {first:.3f} s")
    print(f"split (synchronised run): DiT {spent['dit']:.2f} s, vocoder {spent['vocoder']:.2f} s")
    print(f"peak GPU memory {peak:.2f} GiB (weights {weight_bytes / 2**30:.2f} GiB)")
    print(f"length = codes x 4 x {detok.hop}: ok; fixed seed repeats exactly: {same}")
    if not same:
        raise SystemExit("the same seed gave different audio")


if __name__ == "__main__":
    main()
