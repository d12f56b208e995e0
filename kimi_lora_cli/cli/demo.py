"""`kimi-lora demo`: the whole pipeline on a tiny built-in model, as a tutorial that runs in a minute."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

DEMO_SAMPLES = 8
DEFAULT_WORKDIR = "kimi-lora-demo"  # in the current folder; the repository's .gitignore lists it
SPOKEN_PROMPT = "Say hello in a friendly voice."


def _invoke(command: Any, args: list[str]) -> None:
    """Run one real `kimi-lora` command in this process, showing the standalone command first."""
    from kimi_lora_cli.cli._output import err
    from kimi_lora_cli.errors import KimiLoraError

    err.rule(style="cyan")
    err.print(f"[bold cyan]$ kimi-lora {shlex.join(args)}[/]", soft_wrap=True)
    try:
        code = command.main(args=args, prog_name="kimi-lora", standalone_mode=False)
    except SystemExit as e:  # a command may exit on its own
        code = e.code
    if code not in (None, 0):
        raise KimiLoraError(f"demo step `kimi-lora {args[0]}` failed (exit {code}); see its message above")


def demo(
    ctx: typer.Context,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Folder for the demo files "
                                                 "(default: ./kimi-lora-demo); a rerun replaces the demo's outputs.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (the default memorises the data).")] = 120,
) -> None:
    """Run the whole pipeline on a tiny Kimi-Audio: prepare, list-modules, train, inspect-adapter, merge,
    infer, and a spoken answer written as a WAV file.

    Builds a tiny random Kimi-Audio checkpoint in the exact release layout (with its audio
    detokenizer and vocoder), a tiny speech tokenizer and a small synthetic speech data set (WAV files
    and transcripts, which `prepare` turns into training data), then runs each step as the
    standalone command it prints, and checks what a user should see: the loss falls, the adapter
    learns the transcripts (WER high -> near 0), the merged model equals base + adapter, and a
    spoken answer becomes a WAV (noise: the tiny model is random). No download, no GPU; about a
    minute on 2 CPU cores.

    Examples:

      $ kimi-lora demo

      $ kimi-lora demo --workdir /tmp/kimi-demo --steps 200
    """
    import functools

    from rich.markup import escape

    from kimi_lora_cli.cli._output import err, out
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.errors import ConfigError
    from kimi_lora_cli.fileops import naming_errors, remove_tree, write_atomic
    from kimi_lora_cli.inference.metrics import score
    from kimi_lora_cli.models.kimi_audio.tiny import add_tiny_detokenizer, build_tiny_checkpoint
    from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer
    from kimi_lora_cli.outputs import (
        OLD_DEMO_MARKER,
        check_output,
        marker_info,
        user_entries,
        write_marker,
    )

    # each step runs through the app that runs `demo` (found from the context, not imported back up)
    run = functools.partial(_invoke, ctx.find_root().command)

    work = check_output(workdir or Path(DEFAULT_WORKDIR), [], flag="--workdir")
    info = marker_info(work)
    ours = (info is not None and info.get("command") == "demo") or (work / OLD_DEMO_MARKER).is_file()
    if user_entries(work) and not ours:
        raise ConfigError(f"{work}: folder is not empty and was not made by `kimi-lora demo`; "
                          "pass a new or empty --workdir (the demo replaces its own outputs there)")
    with naming_errors(work):
        work.mkdir(parents=True, exist_ok=True)
    write_marker(work, "demo")
    err.print(f"Demo folder: [bold]{escape(str(work.resolve()))}[/] (a rerun replaces the demo's files there; "
              "--workdir DIR puts them elsewhere)", soft_wrap=True)
    model = work / "Kimi-Audio-tiny"
    if not (model / "config.json").is_file():
        err.print(f"Building a tiny random Kimi-Audio (release layout) in {model}")
        build_tiny_checkpoint(model, detokenizer=True)
    elif not (model / "audio_detokenizer").is_dir():  # a folder from an older demo
        add_tiny_detokenizer(model)
    config = json.loads((model / "config.json").read_text())
    speech_tokenizer = work / "glm-4-voice-tokenizer-tiny"
    if not (speech_tokenizer / "config.json").is_file():
        err.print(f"Building a tiny random speech tokenizer (glm-4-voice-tokenizer layout) in {speech_tokenizer}")
        build_tiny_speech_tokenizer(speech_tokenizer, vocab=config["vocab_size"] - config["kimia_token_offset"])
    raw = _raw_data(write_synthetic_dataset(work / "data", config, n=DEMO_SAMPLES, seed=0, name="synthetic.jsonl"))
    data = work / "data" / "train.jsonl"
    adapter, merged, preds = work / "adapter", work / "merged", work / "predictions.jsonl"
    spoken, spoken_preds = work / "spoken", work / "spoken.jsonl"
    # A rerun starts the steps afresh (only the outputs the demo's own steps wrote are removed).
    for old, command in ((adapter, "train"), (merged, "merge")):
        if old.is_dir() and (marker_info(old) or {}).get("command") == command:
            remove_tree(old)
        elif old.exists():
            raise ConfigError(f"{old}: not written by the demo's `kimi-lora {command}`; move it away and rerun")
    preds.unlink(missing_ok=True)
    spoken_preds.unlink(missing_ok=True)
    err.print(f"Data: {raw} ({DEMO_SAMPLES} synthetic clips with transcripts; `prepare` adds their audio_tokens)")

    run(["prepare", "--model", str(model), "--speech-tokenizer", str(speech_tokenizer), "--data", str(raw),
         "--output", str(data), "--overwrite"])
    run(["list-modules", str(model), "--target", "all,lm_head", "--rank", "32"])
    run(["train", "--model-name-or-path", str(model), "--data-path", str(data), "--output-dir", str(adapter),
             "--use-lora", "--lora-rank", "32", "--lora-alpha", "64", "--lora-dropout", "0",
             "--lora-target", "all,lm_head", "--learning-rate", "1e-2", "--warmup-ratio", "0",
             "--max-steps", str(steps), "--per-device-train-batch-size", str(DEMO_SAMPLES),
             "--logging-steps", "10", "--save-steps", str(10 * steps), "--seed", "0"])
    run(["inspect-adapter", str(adapter), "--base", str(model), "--stats"])
    run(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(merged),
             "--verify", "--overwrite"])
    run(["infer", "--model", str(model), "--adapter", f"demo={adapter}", "--compare-base",
             "--data", str(data), "--output", str(preds), "--batch-size", str(DEMO_SAMPLES),
             "--max-new-tokens", "24"])
    # Audio sampling over the whole vocabulary: a random model picks an audio code about one step in
    # eight, so 200 steps give a couple of seconds of (noise) speech.
    run(["infer", "--model", str(model), "--prompt", SPOKEN_PROMPT, "--output-type", "both",
             "--audio-dir", str(spoken), "--output", str(spoken_preds), "--max-new-tokens", "200",
             "--audio-temperature", "1.0", "--audio-top-k", "0"])

    summary = summarize(work, adapter, preds, score)
    answer = json.loads(spoken_preds.read_text().splitlines()[0])
    summary["spoken_answer"], summary["spoken_seconds"] = answer.get("audio_path"), answer.get("audio_seconds")
    write_atomic(work / "demo_summary.json", json.dumps(summary, indent=2))
    err.rule(style="cyan")
    out.print(f"[bold]What to notice[/] (from {work}):")
    out.print(f"  loss fell: {summary['loss_first']:.3f} -> {summary['loss_last']:.4f} "
              f"(logs: {adapter / 'logs' / 'metrics.jsonl'})")
    out.print(f"  WER on the training clips: base {summary['wer']['base']:.2f} -> adapter "
              f"{summary['wer']['demo']:.2f} (predictions: {preds})")
    out.print(f"  merged folder {merged} loads with the same loader and matched base + adapter (--verify)")
    if summary["spoken_answer"]:
        out.print(f"  spoken answer: {summary['spoken_answer']} ({summary['spoken_seconds']:.2f} s, 24 kHz 16-bit WAV); "
                  "the tiny model is random, so it is noise - on the release folder the same command speaks")
    else:
        out.print("  spoken answer: the random model chose no audio code, so no WAV was written")
    out.print(f"  summary written to {work / 'demo_summary.json'}")
    out.print(f"Everything the demo made is in {work.resolve()}; delete that folder when done.")


def _raw_data(synthetic: Path) -> Path:
    """The synthetic jsonl as a user's own data starts: audio paths and transcripts, no audio_tokens."""
    rows = [json.loads(line) for line in synthetic.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        for message in row["conversation"]:
            message.pop("audio_tokens", None)
    raw = synthetic.with_name("raw.jsonl")
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return raw


def summarize(work: Path, adapter: Path, preds: Path, score) -> dict:
    """The demo's claims, read back from the files the steps wrote."""
    metrics = [json.loads(line) for line in (adapter / "logs" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    totals: dict[str, list[int]] = {}
    for line in preds.read_text().splitlines():
        rec = json.loads(line)
        c = score(rec.get("reference") or "", rec.get("prediction") or "")
        t = totals.setdefault(rec["adapter"], [0, 0])
        t[0] += c.word_errors
        t[1] += c.ref_words
    wer = {name: errors / max(words, 1) for name, (errors, words) in totals.items()}
    return {"workdir": str(work), "loss_first": losses[0], "loss_last": losses[-1], "wer": wer,
            "adapter": str(adapter), "merged": str(work / "merged"), "predictions": str(preds)}
