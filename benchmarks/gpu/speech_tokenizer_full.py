"""Full-size GLM-4-Voice speech tokenizer on a GPU (random weights): hours of audio per minute.

    python benchmarks/gpu/speech_tokenizer_full.py [--batch 1,16,64] [--pieces 128] [--dtype float32]
    python benchmarks/gpu/speech_tokenizer_full.py --folder ./glm-4-voice-tokenizer   # real weights
    python benchmarks/gpu/speech_tokenizer_full.py --smoke                            # tiny, CPU ok

Geometry of THUDM/glm-4-voice-tokenizer (d_model 1280, 20 heads, FFN 5120, 16 layers before the
codebook, 16384 codes, 200-frame causal blocks, pool 4), weights from the default init unless
--folder is given. Feeds `--pieces` full 30 s pieces of synthetic speech (the common case in a
corpus) plus a few short ones, times `tokenize_batch` per batch size after a warm-up, checks the
codes equal the batch-1 codes for the first pieces, and prints throughput, the ratio to batch 1
and peak GPU memory. Everything is measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (30 s pieces per pass)")
    ap.add_argument("--pieces", type=int, default=128, help="30 s pieces per timed run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--folder", default=None, help="a real glm-4-voice-tokenizer folder instead of random weights")
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few pieces (checks the script runs)")
    args = ap.parse_args()

    import torch

    from kimi_lora_cli.models.speech_tokenizer.configuration import SpeechTokenizerConfig
    from kimi_lora_cli.models.speech_tokenizer.modeling import SpeechTokenizer, WhisperVQEncoder
    from kimi_lora_cli.models.speech_tokenizer.tiny import synthetic_speech

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.folder:
        from kimi_lora_cli.loading import load_speech_tokenizer

        tok = load_speech_tokenizer(args.folder, device=device, dtype=dtype)
    else:
        sizes = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
                     quantize_position=16, pooling_position=16, quantize_vocab_size=16384)
        if args.smoke:
            sizes = dict(d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128, encoder_layers=2,
                         quantize_position=2, pooling_position=2, quantize_vocab_size=256)
        cfg = SpeechTokenizerConfig.from_dict(sizes)
        torch.manual_seed(0)
        with torch.device(device):
            enc = WhisperVQEncoder(cfg).to(dtype)
        tok = SpeechTokenizer(enc, source="random weights")
    pieces = 4 if args.smoke else args.pieces
    batches = [1, 2] if args.smoke else [int(b) for b in args.batch.split(",")]
    params = sum(p.numel() for p in tok.encoder.parameters())
    full = [synthetic_speech(30.0, seed=i % 8) for i in range(pieces)]
    short = [synthetic_speech(s, seed=100 + i) for i, s in enumerate((3.2, 11.7, 0.5))]
    waves = full + short
    audio_h = sum(len(w) for w in waves) / 16000 / 3600
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{params / 1e6:.1f} M params, {args.dtype}, {len(waves)} files = {audio_h * 60:.1f} min of audio")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    reference = [tok.tokenize(w) for w in waves[:2] + short]
    results = {}
    for b in batches:
        tok.tokenize_batch(waves[: max(b, 2)], batch_size=b)  # warm-up at this shape
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        codes = tok.tokenize_batch(waves, batch_size=b)
        sync()
        dt = time.perf_counter() - start
        same = codes[:2] + codes[-3:] == reference
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[b] = dt
        print(f"batch {b:4d}: {audio_h / (dt / 60):8.2f} audio hours per minute, {audio_h * 3600 / dt:8.0f}x "
              f"real time, peak {peak:.1f} GiB, codes equal to one-by-one: {same}")
    base = results[batches[0]]
    for b in batches[1:]:
        print(f"ratio batch {b} / batch {batches[0]}: {base / results[b]:.2f}x")


if __name__ == "__main__":
    main()
