"""Audio detokenizer on CPU: real-time factor (compute seconds per second of audio), tiny and release size.

    python benchmarks/detokenizer_rtf.py [--seconds 10] [--release-steps 2] [--release-dtype bfloat16]
    python benchmarks/detokenizer_rtf.py --skip-release          # tiny only (seconds)

Tiny: the tiny release-layout folder (tiny.py), float32, the real streaming path end to end for
`--seconds` of codes at the official 30 ODE time points; DiT and vocoder time split.

Release size (random weights, `random_detokenizer`: DiT 2304 hidden x 16 blocks x 18 heads, 16384
codes; BigVGAN 2048 channels, rates 5,2,2,2,2,3,2, resblock kernels 3,5,7,11 - the vocoder sizes are
inferred from vllm-omni's shapes and the 965 MB file, not read from the release): a full chunk is
far too slow on 2 cores, so this times `--release-steps` DiT evaluations of a steady-state chunk
(48 look-ahead + 120 new frames, attending to 72 cached frames) and one vocoder call on that chunk's
156 frames, then extrapolates: one chunk = 29 Euler evaluations + 1 cache refresh (counted as a
full evaluation, a slight over-estimate) + the vocoder call, and emits 120 frames = 2.4 s of audio.
Everything is measured in this one process, side by side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _util


def timed_parts(detok):
    """Wrap the DiT and vocoder calls of `detok` to add up their wall time."""
    spent = {"dit": 0.0, "vocoder": 0.0}

    def wrap(fn, key):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return inner

    detok._forward = wrap(detok._forward, "dit")
    detok._vocode = wrap(detok._vocode, "vocoder")
    return spent


def bench_tiny(seconds: float) -> dict:
    import torch

    from kimi_lora_cli.loading import load_detokenizer
    from kimi_lora_cli.models.detokenizer.tiny import build_tiny_detokenizer

    with tempfile.TemporaryDirectory() as tmp:
        detok = load_detokenizer(build_tiny_detokenizer(Path(tmp) / "tiny"), dtype="float32")
    n = int(round(seconds * 12.5))
    codes = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(0))
    detok.detokenize(codes[:40], generator=torch.Generator().manual_seed(0))  # warm-up
    spent = timed_parts(detok)
    t = time.perf_counter()
    wav = detok.detokenize(codes, generator=torch.Generator().manual_seed(0))
    total = time.perf_counter() - t
    audio = wav.numel() / detok.sampling_rate
    return {"audio_s": audio, "total_s": total, **spent, "rtf": total / audio}


def bench_release(steps: int, dtype_name: str) -> dict:
    import torch

    from kimi_lora_cli.models.detokenizer.streaming import flow_time_ids
    from kimi_lora_cli.models.detokenizer.tiny import random_detokenizer

    dtype = getattr(torch, dtype_name)
    t = time.perf_counter()
    detok = random_detokenizer(dtype=dtype)
    build = time.perf_counter() - t
    dit, params = detok.dit, sum(p.numel() for p in detok.dit.parameters())
    voc_params = sum(p.numel() for p in detok.vocoder.parameters())
    g = torch.Generator().manual_seed(0)
    cache = dit.new_cache()
    with torch.inference_mode():
        prev = torch.randn(1, 72, 80, generator=g).to(dtype)
        dit(prev, torch.randint(0, 16384, (1, 72), generator=g), torch.tensor([999]), torch.arange(72)[None], cache)
        cache.commit(900)
        x = torch.randn(1, 168, 80, generator=g).to(dtype)
        tokens = torch.randint(0, 16384, (1, 168), generator=g)
        positions = torch.arange(72, 240)[None]
        times = []
        for k in range(steps):
            tt = torch.tensor(k / 29)
            t = time.perf_counter()
            dit(x, tokens, flow_time_ids(tt, 1, x.device), positions, cache)
            times.append(time.perf_counter() - t)
        detok.vocoder(torch.randn(1, 80, 8, generator=g).to(dtype))  # warm-up
        mel = (torch.randn(1, 80, 156, generator=g) * 3 - 4).to(dtype)
        t = time.perf_counter()
        detok.vocoder(mel)
        voc = time.perf_counter() - t
    step = min(times)
    chunk = 30 * step + voc
    return {"build_s": build, "dit_params": params, "vocoder_params": voc_params, "step_s": step,
            "steps_timed": steps, "vocoder_156_s": voc, "chunk_s": chunk, "rtf": chunk / 2.4,
            "rtf_dit": 30 * step / 2.4, "rtf_vocoder": voc / 2.4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length for the tiny model")
    ap.add_argument("--release-steps", type=int, default=2, help="DiT evaluations timed at release size")
    ap.add_argument("--release-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-release", action="store_true")
    args = ap.parse_args()

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tiny = bench_tiny(args.seconds)
    print(f"tiny (float32, 30 ODE points): {tiny['audio_s']:.1f} s of audio in {tiny['total_s']:.2f} s "
          f"(DiT {tiny['dit']:.2f} s, vocoder {tiny['vocoder']:.2f} s): RTF {tiny['rtf']:.3f} (measured)")
    if args.skip_release:
        return
    rel = bench_release(args.release_steps, args.release_dtype)
    print(f"release size ({args.release_dtype}, random weights; DiT {rel['dit_params'] / 1e9:.2f} B params, "
          f"vocoder {rel['vocoder_params'] / 1e6:.0f} M; built in {rel['build_s']:.1f} s):")
    print(f"  DiT evaluation, 168 frames + 72 cached: {rel['step_s']:.2f} s (best of {rel['steps_timed']}, measured)")
    print(f"  vocoder, 156 frames (3.1 s of audio): {rel['vocoder_156_s']:.2f} s (measured)")
    print(f"  one chunk = 30 x DiT + vocoder = {rel['chunk_s']:.1f} s for 2.4 s of audio: RTF {rel['rtf']:.1f} "
          f"(DiT {rel['rtf_dit']:.1f} + vocoder {rel['rtf_vocoder']:.2f}; extrapolated)")
    print(f"  ratio release / tiny RTF: {rel['rtf'] / tiny['rtf']:.0f}x")
    from _util import self_peak_rss_mb

    print(f"peak RSS of this process: {self_peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
