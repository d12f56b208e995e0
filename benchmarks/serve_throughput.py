"""Benchmark: `kimi-lora serve` requests/s with concurrent clients versus one client, one adapter versus a mix.

    python benchmarks/serve_throughput.py [--requests 32] [--steps 32] [--configs tiny,larger]

For each CPU model config (the tiny test checkpoint, and a larger one) a real `kimi-lora serve`
process is started on a free localhost port with 4 LoRA adapters, the tiny speech tokenizer and
the tiny detokenizer; then the same 32 transcription requests (one-second WAV uploads, a fixed
greedy budget of --steps per request) are sent by 1 client (sequential), 8 and 32 concurrent
clients: requests/s, p50/p95 latency, how many decodes ran and how many requests joined a running
decode (step-level batching); "8 stag." = 8 clients whose first requests are spread over one
sequential latency, so they arrive while others decode. Then the same with the requests spread
over 4 adapters.
Goals: 32 concurrent >= 4x sequential; 4-adapter mix >= 0.8x single-adapter throughput.
Last, on the tiny model: time to the first streamed audio piece of a spoken answer versus the time
of the whole answer (non-streamed) for the same request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

GOAL_CONCURRENT = 4.0
GOAL_MIX = 0.8
ADAPTERS = ("a0", "a1", "a2", "a3")


def configs() -> dict:
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec

    return {
        "tiny": TinySpec(),
        "larger": TinySpec(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=2, mimo_layers=2, mimo_from_layer=6, whisper_d_model=64,
                           whisper_layers=2, whisper_heads=4, whisper_ffn=128),
    }


def build(root: Path, name: str, spec) -> tuple[Path, dict[str, Path], Path, list[bytes]]:
    import numpy as np
    import soundfile as sf
    import torch
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint
    from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer

    ckpt = build_tiny_checkpoint(root / name, spec, detokenizer=True)
    adapters = {}
    for k, a in enumerate(ADAPTERS):
        torch.manual_seed(k)
        model = load_model(ckpt, dtype="float32", load_whisper=False, load_tokenizer_=False).model
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        peft.save_pretrained(str(root / f"{name}-{a}"))
        adapters[a] = root / f"{name}-{a}"
    glm = root / "glm"
    if not glm.exists():
        build_tiny_speech_tokenizer(glm, vocab=spec.audio_codes)
    rng = np.random.RandomState(0)
    clips = []
    for k in range(8):
        t = np.arange(16000) / 16000
        wave = (0.3 * np.sin(2 * np.pi * (200 + 30 * k) * t) + 0.01 * rng.randn(16000)).astype("float32")
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format="WAV")
        clips.append(buf.getvalue())
    return ckpt, adapters, glm, clips


class Server:
    def __init__(self, ckpt: Path, adapters: dict[str, Path], glm: Path, steps: int, batch: int, threads: int) -> None:
        cmd = [sys.executable, "-m", "kimi_lora_cli", "serve", "-m", str(ckpt), "--port", "0",
               "--speech-tokenizer", str(glm), "--max-new-tokens", str(steps), "--max-batch-size", str(batch),
               "--max-queue", "256", *[x for n, p in adapters.items() for x in ("-a", f"{n}={p}")]]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + 300
        while "Serving on" not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.1)
        self.url = Path(self.log.name).read_text().split("Serving on ")[1].split()[0]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        Path(self.log.name).unlink(missing_ok=True)


def burst(url: str, clips: list[bytes], n: int, clients: int, models: list[str], stagger_s: float = 0.0) -> dict:
    """`n` requests from `clients` client threads, each with its own connection opened beforehand (a GET
    /health), all starting together (`stagger_s`: client i starts i x stagger_s later); client i sends
    requests i, i + clients, ... one after another."""
    import httpx

    latencies: list[float] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            http.get(f"{url}/health").raise_for_status()
            start.wait()
            time.sleep(i * stagger_s)
            for k in range(i, n, clients):
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/audio/transcriptions", data={"model": models[k % len(models)]},
                              files={"file": ("clip.wav", clips[k % len(clips)], "audio/wav")})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

    def stats() -> dict:
        return httpx.get(f"{url}/health").json()

    before = stats()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = stats()
    latencies.sort()
    if len(latencies) != n:
        raise SystemExit(f"{n - len(latencies)} of {n} requests failed")
    return {"rps": n / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "decodes": after["batches"] - before["batches"], "joined": after["joined"] - before["joined"]}


def spoken(url: str) -> dict:
    """Time to the first streamed audio piece vs the whole (non-streamed) spoken answer, same request."""
    import httpx

    body = {"model": "base", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 400,
            "seed": 3, "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
            "audio_temperature": 1.0, "audio_top_k": 0}
    with httpx.Client(timeout=600) as http:
        http.post(f"{url}/v1/chat/completions", json=body).raise_for_status()  # warm-up
        t0 = time.perf_counter()
        whole = http.post(f"{url}/v1/chat/completions", json=body)
        whole_s = time.perf_counter() - t0
        wav = base64.b64decode(whole.json()["choices"][0]["message"]["audio"]["data"])
        first = pieces = None
        t0 = time.perf_counter()
        with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            pieces = 0
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if (delta.get("audio") or {}).get("data"):
                    pieces += 1
                    first = first if first is not None else time.perf_counter() - t0
        stream_s = time.perf_counter() - t0
    seconds = max(len(wav) - 44, 0) / 2 / 24000
    return {"first_piece_s": first, "whole_s": whole_s, "stream_s": stream_s, "pieces": pieces,
            "audio_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32, help="greedy steps per request (server --max-new-tokens)")
    ap.add_argument("--configs", default="tiny,larger")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS); 1 "
                    "keeps a shared 2-core machine from oversubscribing")
    args = ap.parse_args()

    rows, speech = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.configs.split(","):
            ckpt, adapters, glm, clips = build(tmp, name, configs()[name])
            server = Server(ckpt, adapters, glm, args.steps, batch=max(32, args.requests), threads=args.threads)
            try:
                burst(server.url, clips, 8, 8, ["a0"])  # warm-up
                for label, models in (("1 adapter", ["a0"]), ("4 adapters", list(ADAPTERS))):
                    for clients in (1, 8, 32):
                        r = burst(server.url, clips, args.requests, clients, models)
                        rows.append((name, label, clients, r))
                    seq = rows[-3][3]["p50"]  # clients arriving through a decode: step-level batching
                    r = burst(server.url, clips, args.requests, 8, models, stagger_s=seq / 8)
                    rows.append((name, label, "8 stag.", r))
                if name == "tiny":
                    speech = spoken(server.url)
            finally:
                server.close()

    print(f"serve_throughput: {args.requests} transcription requests (1 s WAV uploads), {args.steps} greedy steps "
          f"each, CPU, server with {args.threads} torch thread(s), clients in this process (httpx threads), "
          f"{os.cpu_count()} cores")
    print(f"{'config':8} {'adapters':11} {'clients':>7} {'req/s':>8} {'x seq':>6} {'p50 s':>7} {'p95 s':>7} "
          f"{'decodes':>7} {'joined':>6}")
    base = {}
    for name, label, clients, r in rows:
        if clients == 1:
            base[(name, label)] = r["rps"]
        ratio = r["rps"] / base[(name, label)]
        print(f"{name:8} {label:11} {clients!s:>7} {r['rps']:8.2f} {ratio:6.2f} {r['p50']:7.3f} {r['p95']:7.3f} "
              f"{r['decodes']:>7} {r['joined']:>6}")
    for name in dict.fromkeys(n for n, *_ in rows):
        one = {c: r["rps"] for n, lab, c, r in rows if n == name and lab == "1 adapter"}
        mix = {c: r["rps"] for n, lab, c, r in rows if n == name and lab == "4 adapters"}
        print(f"{name}: 32 concurrent / sequential = {one[32] / one[1]:.2f}x (goal >= {GOAL_CONCURRENT}x); "
              f"4-adapter mix / 1 adapter at 32 clients = {mix[32] / one[32]:.2f}x, at 8 clients = "
              f"{mix[8] / one[8]:.2f}x (goal >= {GOAL_MIX}x)")
    if speech is not None:
        print(f"tiny spoken answer ({speech['audio_s']:.2f} s of audio, {speech['pieces']} streamed pieces): first "
              f"audio piece after {speech['first_piece_s']:.3f} s, whole answer {speech['whole_s']:.3f} s "
              f"(ratio {speech['first_piece_s'] / speech['whole_s']:.2f}); streamed in {speech['stream_s']:.3f} s")


if __name__ == "__main__":
    main()
