"""Reading every data format: rows/s (records out of `open_source`, no checks, no tokenizing) at
--rows rows per format, and the peak RSS of `kimi-lora prepare --dry-run` (check pass + summary) at
1,000 vs 100,000 rows of a NeMo manifest, a CSV and a parquet file (a streamed HF dataset).

    python benchmarks/data_sources.py [--rows 20000] [--big 100000] [--small 1000]

Each format holds the same 8 short clips over and over (folders of audio use hard links, and at most
--folder-rows rows, as a tree of 100,000 files says more about the file system than about us).
The peak-RSS ratio big/small must stay within 1.2: a source is never held whole in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

from _util import run_measured  # noqa: E402

CLIPS = 8
INSTR = "Please transcribe the spoken content into written text."


def write_clips(root: Path) -> list[Path]:
    import numpy as np
    import soundfile as sf

    (root / "clips").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(CLIPS):
        p = root / "clips" / f"c{i}.wav"
        sf.write(p, np.random.default_rng(i).uniform(-0.3, 0.3, 8000 + 800 * i).astype(np.float32), 16000)
        out.append(p)
    return out


def write_formats(root: Path, n: int, folder_rows: int) -> dict[str, Path]:
    clips = write_clips(root)
    f: dict[str, Path] = {}

    def lines(path: Path, make) -> Path:
        with open(path, "w") as fh:
            for i in range(n):
                fh.write(make(i))
        return path

    f["jsonl"] = lines(root / "official.jsonl", lambda i: json.dumps({"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": INSTR},
        {"role": "user", "message_type": "audio", "content": f"clips/c{i % CLIPS}.wav"},
        {"role": "assistant", "message_type": "text", "content": f"row {i}"}]}) + "\n")
    f["nemo"] = lines(root / "manifest.json", lambda i: json.dumps(
        {"audio_filepath": f"clips/c{i % CLIPS}.wav", "text": f"row {i}", "duration": 0.5}) + "\n")
    (root / "m.csv").write_text("audio,text\n")
    with open(root / "m.csv", "a") as fh:
        fh.writelines(f"clips/c{i % CLIPS}.wav,row {i}\n" for i in range(n))
    f["csv"] = root / "m.csv"
    (root / "m.tsv").write_text("path\tsentence\n")
    with open(root / "m.tsv", "a") as fh:
        fh.writelines(f"c{i % CLIPS}.wav\trow {i}\n" for i in range(n))
    f["tsv"] = root / "m.tsv"
    kaldi = root / "kaldi"
    kaldi.mkdir()
    with open(kaldi / "wav.scp", "w") as a, open(kaldi / "text", "w") as b:
        for i in range(n):
            a.write(f"u{i:07d} {clips[i % CLIPS]}\n")
            b.write(f"u{i:07d} row {i}\n")
    f["kaldi"] = kaldi
    f["chat"] = lines(root / "swift.jsonl", lambda i: json.dumps({"messages": [
        {"role": "user", "content": f"{INSTR}<audio>"}, {"role": "assistant", "content": f"row {i}"}],
        "audios": [f"clips/c{i % CLIPS}.wav"]}) + "\n")
    folder = root / "folder"
    folder.mkdir()
    for i in range(min(n, folder_rows)):
        os.link(clips[i % CLIPS], folder / f"u{i:07d}.wav")
        (folder / f"u{i:07d}.txt").write_text(f"row {i}\n")
    f["folder"] = folder
    try:
        import datasets

        datasets.Dataset.from_dict({"audio": [str(clips[i % CLIPS]) for i in range(n)],
                                    "text": [f"row {i}" for i in range(n)]}).to_parquet(str(root / "d.parquet"))
        f["hf-parquet"] = root / "d.parquet"
    except ImportError:
        print("datasets not installed: no HF rows", file=sys.stderr)
    return f


def rows_per_second(files: dict[str, Path]) -> dict[str, tuple[int, float]]:
    from kimi_lora_cli.data.sources import open_source

    out = {}
    for name, path in files.items():
        source = open_source(path)
        t = time.perf_counter()
        count = sum(1 for rec in source if rec.obj is not None)
        out[name] = (count, count / (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--folder-rows", type=int, default=5000)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--big", type=int, default=100000)
    args = ap.parse_args()

    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_formats(tmp / "speed", args.rows, args.folder_rows)
        print(f"reading {args.rows} rows per format ({args.folder_rows} for the folder), no tokenizing:")
        for name, (count, rate) in rows_per_second(files).items():
            print(f"  {name:12s} {count:7d} rows  {rate:10.0f} rows/s")
        model = build_tiny_checkpoint(tmp / "tiny")
        small = write_formats(tmp / "small", args.small, 0)
        big = write_formats(tmp / "big", args.big, 0)
        exe = [sys.executable, "-m", "kimi_lora_cli"]
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        print(f"peak RSS of `kimi-lora prepare --dry-run`, {args.small} vs {args.big} rows:")
        for name in ("nemo", "csv", "hf-parquet"):
            if name not in small:
                continue
            cmd = [*exe, "prepare", "-m", str(model), "--dry-run"]
            t1, r1 = run_measured([*cmd, "-d", str(small[name])], env)
            t2, r2 = run_measured([*cmd, "-d", str(big[name])], env)
            print(f"  {name:12s} {r1:7.0f} MB ({t1:5.1f} s)  {r2:7.0f} MB ({t2:6.1f} s, {args.big / t2:6.0f} rows/s)  "
                  f"ratio {r2 / r1:.3f}")


if __name__ == "__main__":
    main()
