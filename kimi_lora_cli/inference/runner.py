"""`infer` core: samples x (base, adapters) -> generation -> streamed predictions jsonl + WER/CER.

Python API (what `kimi-lora infer` calls)::

    report = run_inference(InferSpec(model="Kimi-Audio-7B-Instruct", adapters=(("asr", "out/asr"),),
                                     data="test.jsonl", output="preds.jsonl"))
    report.summaries["asr"].counts.wer

The base model is loaded once with every adapter attached (peft); adapters are switched with
`set_adapter`, and the plain base is run inside peft's `disable_adapter()`, so the base weights
are never reloaded. Each (sample, adapter) pair becomes one jsonl line, written and flushed as
soon as its batch finishes; `resume=True` keeps the lines already in the file and skips those
pairs. Random draws (temperature > 0) use one generator per sample seeded from (seed, sample
id), so every adapter sees the same draws and a resumed run continues identically.

Spoken answers: with `audio_dir`, every prediction of output type "both" is turned into a WAV by
the Kimi-Audio detokenizer (`audio_detokenizer/` + `vocoder/` of `detokenizer`, default the model
folder; see inference/speech.py), written before its jsonl line, which names it (`audio_path`,
`audio_seconds`). The detokenizer folder is checked before any weight is read.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kimi_lora_cli.adapter_names import BASE
from kimi_lora_cli.devices import resolve_device
from kimi_lora_cli.errors import ConfigError, ModelLoadError
from kimi_lora_cli.fileops import naming_errors
from kimi_lora_cli.inference.decode import DEFAULT_TEXT_STEPS, plan_batches, step_budget
from kimi_lora_cli.inference.generation import GenerationConfig, StreamTokens, generate, unwrap_model
from kimi_lora_cli.inference.metrics import ErrorCounts, score
from kimi_lora_cli.inference.predictions import (
    PredictionWriter,
    partial_of,
    predictions_or_empty,
    read_predictions,
)
from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS, SamplingParams
from kimi_lora_cli.inference.samples import InferSample, prompt_sample, read_audio_tokens_file, read_samples

if TYPE_CHECKING:
    from kimi_lora_cli.data.sources import SourceOptions

# Text answers (ASR, chat) rarely pass a few hundred tokens; the official 7500 positions let a model
# that never says text_eos (an untrained base, say) run for minutes per sample. Spoken answers keep
# the official budget (1500 positions, 120 s of speech), which already bounds them.
DETOKENIZER_NOTE = (
    "audio_tokens are GLM-4-Voice semantic codes (offset removed); pass --audio-dir DIR to turn them into "
    "WAV files with the Kimi-Audio detokenizer (audio_detokenizer/ + vocoder/ of the release folder)"
)


@dataclass(frozen=True)
class InferSpec:
    model: str | Path
    adapters: tuple[tuple[str, str | Path], ...] = ()
    compare_base: bool = False
    data: str | Path | None = None
    prompt: str | None = None
    audio: str | Path | None = None
    audio_tokens: str | Path | None = None
    output: str | Path | None = None
    resume: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: DEFAULT_TEXT_STEPS for text answers, official for both
    output_type: str | None = None  # None: each sample's task_type decides ("text" for --prompt)
    text_sampling: SamplingParams = TEXT_DEFAULTS
    audio_sampling: SamplingParams = AUDIO_DEFAULTS
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    use_cache: bool = True
    allow_pickle: bool = False
    speech_tokenizer: str | Path | None = None  # glm-4-voice-tokenizer folder: codes for audio without audio_tokens
    cache_features: str | Path | None = None  # speech codes and Whisper features kept here, by audio content
    audio_dir: str | Path | None = None  # one WAV per spoken answer (output type "both")
    detokenizer: str | Path | None = None  # folder holding audio_detokenizer/ + vocoder/ (default: model)
    ode_steps: int = 30  # detokenizer flow-matching time points (official: 30)
    sources: SourceOptions | None = None  # how --data is read (format, columns, task ...)
    quantization: str | None = None  # nf4 / fp4 / int8: decoder linears quantized as they load (QLoRA adapters)
    double_quant: bool = False


class ProgressSink(Protocol):
    def start(self, total_samples: int) -> None: ...

    def update(self, samples: int = 0, tokens: int = 0) -> None: ...


@dataclass
class VariantSummary:
    name: str
    counts: ErrorCounts = field(default_factory=ErrorCounts)
    samples: int = 0  # predictions for this run's samples (resumed ones included)
    scored: int = 0  # of which with a reference
    new_samples: int = 0  # generated in this run
    new_tokens: int = 0
    seconds: float = 0.0  # generation wall time in this run

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class InferReport:
    model: str
    variants: list[str]
    samples: list[InferSample]
    records: list[dict[str, Any]]  # one per (sample, variant), sample order then variant order
    summaries: dict[str, VariantSummary]
    output: str | None
    skipped: int = 0  # pairs found in the output file and not regenerated
    output_types: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    audio_dir: str | None = None  # where the WAVs of spoken answers went (None: not asked for)
    spoken: int = 0  # predictions with a WAV


def budget_note(records: list[dict[str, Any]], max_new_tokens: int | None) -> str | None:
    """How many of this run's answers were cut by the step budget (finish "length")."""
    cut = [r for r in records if r.get("finish") == "length"]
    if not cut:
        return None
    if max_new_tokens is None:
        which = (f"the default budget ({DEFAULT_TEXT_STEPS} steps for text answers, the official one for spoken "
                 "answers)")
    elif max_new_tokens == -1:
        which = "the official budget"
    else:
        which = f"--max-new-tokens {max_new_tokens}"
    return (f"{len(cut)} of {len(records)} answers reached {which} before ending (finish \"length\" in the "
            "predictions); raise --max-new-tokens if they were cut short (-1: the official 7500 positions)")


def _check_spec(spec: InferSpec) -> None:
    if (spec.data is None) == (spec.prompt is None):
        raise ConfigError("pass exactly one of --data FILE.jsonl or --prompt TEXT")
    if spec.data is not None and (spec.audio is not None or spec.audio_tokens is not None):
        raise ConfigError("--audio/--audio-tokens go with --prompt; in --data files the messages carry them")
    if spec.resume and spec.output is None:
        raise ConfigError("--resume needs --output FILE (the predictions file to continue)")
    if spec.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {spec.batch_size}")
    if spec.output_type not in (None, "text", "both"):
        raise ConfigError(f"--output-type must be text or both, not {spec.output_type!r}")
    if spec.max_new_tokens is not None and (spec.max_new_tokens == 0 or spec.max_new_tokens < -1):
        raise ConfigError(f"--max-new-tokens must be > 0 (or -1 for the official budget), not {spec.max_new_tokens}")
    if spec.audio_tokens is not None and spec.audio is None:
        raise ConfigError("--audio-tokens needs --audio FILE too (the model also reads the waveform's Whisper "
                          "features)")
    if spec.compare_base and not spec.adapters:
        raise ConfigError("--compare-base needs at least one --adapter (without one, the base is all that runs)")
    from kimi_lora_cli.devices import check_device

    check_device(spec.device)
    if spec.output is not None:
        check_output_file(spec)
    if spec.audio_dir is not None and spec.output_type == "text":
        raise ConfigError("--audio-dir writes spoken answers, but --output-type text asks for none; use "
                          "--output-type both")
    from kimi_lora_cli.quantization import quant_spec

    quant_spec(spec.quantization, flag="--quantization")
    if spec.double_quant and spec.quantization not in ("nf4", "fp4"):
        raise ConfigError("--double-quant quantizes the scales of 4-bit weights; add --quantization nf4 (or fp4)")
    if spec.ode_steps < 2:
        raise ConfigError(f"--ode-steps must be >= 2 (time points from 0 to 1), not {spec.ode_steps}")


def check_output_file(spec: InferSpec) -> None:
    """--output is a new file or a predictions file of an earlier run - never an input, never a file
    inside the model, adapter or speech tokenizer folders, never some other existing file."""
    from kimi_lora_cli.outputs import check_output

    output = Path(spec.output).expanduser()
    inputs = [("model folder", spec.model), *((f"adapter folder ({name})", folder) for name, folder in spec.adapters),
              ("--data file", spec.data), ("--audio file", spec.audio), ("--audio-tokens file", spec.audio_tokens),
              ("speech tokenizer folder", spec.speech_tokenizer)]
    check_output(output, inputs, flag="--output", kind="file")
    for path in (output, partial_of(output)):
        if not predictions_or_empty(path):
            raise ConfigError(f"--output {output}: {path} exists and is not a predictions file of `kimi-lora "
                              "infer`; it is never replaced - choose another --output")


# -------------------------------------------------------------------------------------------
# Running
# -------------------------------------------------------------------------------------------


@contextmanager
def activate(model: Any, name: str, adapter_names: list[str]):
    """Run `model` as adapter `name`, or as the plain base (peft's disable_adapter) for 'base'."""
    if not adapter_names:
        yield
    elif name == BASE:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


def sample_generators(samples: list[InferSample], seed: int, device: Any, needed: bool):
    if not needed:
        return None
    import torch

    gens = []
    for s in samples:
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{seed}:{s.id}".encode()))
        gens.append(g)
    return gens


def speech_codes_loader(spec: InferSpec, config: Any) -> Callable[[], Any] | None:
    """With --speech-tokenizer: a function that loads it as a CodeStore (called only when some audio
    message lacks audio_tokens; the codes are kept in --cache-features when given)."""
    if spec.speech_tokenizer is None:
        return None

    def load() -> Any:
        from kimi_lora_cli.data.features import CodeStore
        from kimi_lora_cli.loading import load_speech_tokenizer

        tokenizer = load_speech_tokenizer(spec.speech_tokenizer, device=resolve_device(spec.device))
        return CodeStore(tokenizer, config.kimia_token_offset, config.vocab_size, cache_dir=spec.cache_features,
                         memory_budget_bytes=0)

    return load


def model_config(spec: InferSpec) -> Any:
    """The Kimi-Audio config of --model from config.json alone (the data is checked before loading)."""
    from kimi_lora_cli.loading import inspect_folder, kimi_config

    info = inspect_folder(spec.model, need_weights=False, allow_pickle=spec.allow_pickle)
    if not info.is_kimi:
        raise ModelLoadError(f"{info.path}: `infer` runs Kimi-Audio models (config.json with kimia_* keys); "
                             "this folder holds another architecture")
    return kimi_config(info)


def check_speech(spec: InferSpec, config: Any, samples: list[InferSample], out_type: dict[str, str]) -> Any:
    """Before any weight is read: the --audio-dir folder, the detokenizer folder, and that its codes fit
    the model's. Returns (detokenizer files, AudioFolder) or None."""
    if spec.audio_dir is None:
        return None
    from kimi_lora_cli.inference.speech import AudioFolder
    from kimi_lora_cli.loading import check_detokenizer

    if all(out_type[s.id] != "both" for s in samples):
        raise ConfigError("--audio-dir: no sample answers in speech (every task_type is 'understanding'); "
                          "pass --output-type both")
    files = check_detokenizer(spec.detokenizer or spec.model)
    codebook = config.vocab_size - config.kimia_token_offset
    if codebook > files.dit_config.semantic_vocab_size:
        raise ModelLoadError(f"{files.root / 'audio_detokenizer' / 'config.yaml'}: semantic_vocab_size "
                             f"{files.dit_config.semantic_vocab_size} is smaller than the model's {codebook} audio "
                             "codes; use the detokenizer of the same release")
    return files, AudioFolder(spec.audio_dir)


def speak(detok: Any, folder: Any, sample: InferSample, variant: str, codes: list[int], seed: int) -> dict[str, Any]:
    """The WAV of one prediction (none for an answer without audio codes): jsonl fields."""
    import time

    from kimi_lora_cli.inference.speech import noise_generator, wav_name

    if not codes:
        return {"audio_path": None, "audio_seconds": 0.0}
    start = time.perf_counter()
    wav = detok.detokenize(codes, generator=noise_generator(seed, sample.id))
    path = folder.write(wav_name(sample.id, variant), wav, detok.sampling_rate)
    return {"audio_path": str(path), "audio_seconds": round(wav.numel() / detok.sampling_rate, 3),
            "audio_time_s": round(time.perf_counter() - start, 4)}


def make_record(sample: InferSample, variant: str, output_type: str, result: Any, tokenizer: Any) -> dict[str, Any]:
    prediction = tokenizer.decode(result.text_tokens)
    rec: dict[str, Any] = {
        "id": sample.id,
        "adapter": variant,
        "output_type": output_type,
        "prompt": sample.summary,
        "prediction": prediction,
        "reference": sample.reference,
        "text_tokens": result.text_tokens,
    }
    if output_type == "both":
        rec["audio_tokens"] = result.audio_tokens
    rec["new_tokens"] = result.steps
    rec["finish"] = result.finish
    rec["time_s"] = round(result.seconds, 4)
    if sample.reference is not None:
        c = score(sample.reference, prediction)
        rec["wer"], rec["cer"] = round(c.wer, 6), round(c.cer, 6)
    return rec


def run_inference(spec: InferSpec, progress: ProgressSink | None = None, loaded: Any = None) -> InferReport:
    """Run every (sample, variant) pair not already in the output file; see the module docstring.

    `loaded` reuses an already loaded model (its adapters must be the spec's)."""
    _check_spec(spec)
    if spec.output is None:
        return _run(spec, progress, loaded, None)
    from kimi_lora_cli.outputs import FolderLock

    output = Path(spec.output).expanduser()
    with naming_errors(output.parent):
        output.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock.beside(output, "infer") as lock:
        check_output_file(spec)  # again under the lock: a run that just finished may have written it
        return _run(spec, progress, loaded, lock.note)


def _run(spec: InferSpec, progress: ProgressSink | None, loaded: Any, lock_note: str | None) -> InferReport:
    import torch

    from kimi_lora_cli.inference.prompts import build_prompts, tokenize_prompt

    output = Path(spec.output).expanduser() if spec.output is not None else None
    config = loaded.config if loaded is not None else model_config(spec)
    speech_codes = speech_codes_loader(spec, config)
    notes: list[str] = [lock_note] if lock_note else []
    if spec.data is not None:
        samples = read_samples(spec.data, config, speech_codes=speech_codes, notes=notes, options=spec.sources)
    else:
        codes = None
        if spec.audio_tokens is not None:
            codes = read_audio_tokens_file(spec.audio_tokens, config.kimia_token_offset, config.vocab_size)
        samples = [prompt_sample(spec.prompt or "", spec.audio, codes, spec.output_type or "text", config,
                                 speech_codes=speech_codes)]
    if loaded is None:
        from kimi_lora_cli.loading import load_model

        loaded = load_model(spec.model, dtype=spec.dtype, device=resolve_device(spec.device),
                            adapters=[(n, str(p)) for n, p in spec.adapters] or None,
                            allow_pickle=spec.allow_pickle, quantization=spec.quantization,
                            double_quant=spec.double_quant)
    if not loaded.info.is_kimi:
        raise ModelLoadError(f"{loaded.info.path}: `infer` runs Kimi-Audio models (config.json with kimia_* keys); "
                             "this folder holds another architecture")
    tokenizer, config = loaded.tokenizer, loaded.config
    if spec.quantization:
        from kimi_lora_cli.quantization import quant_spec, summary

        base_model = unwrap_model(loaded.model)
        notes.append(summary(base_model, quant_spec(spec.quantization, spec.double_quant), base_model.dtype))
    features = None
    if spec.cache_features is not None and loaded.feature_encoder is not None:
        from kimi_lora_cli.data.features import FeatureStore

        features = FeatureStore(loaded.feature_encoder, cache_dir=spec.cache_features, memory_budget_bytes=0)
    out_type = {s.id: spec.output_type or s.output_type for s in samples}
    speech = check_speech(spec, config, samples, out_type)
    lengths = {s.id: len(tokenize_prompt(s.messages, tokenizer, config, out_type[s.id], s.source)) for s in samples}

    adapter_names = list(loaded.adapter_names)
    variants = ([BASE] if spec.compare_base or not adapter_names else []) + adapter_names
    previous = []
    if spec.resume and output is not None:  # an interrupted run's partial file, else the finished output
        previous = read_predictions(partial_of(output) if partial_of(output).is_file() else output)
    ids = {s.id for s in samples}
    done = {(r["id"], r["adapter"]) for r in previous if r["id"] in ids}
    todo = [s for s in samples if any((s.id, v) not in done for v in variants)]
    skipped = sum(1 for s in samples for v in variants if (s.id, v) in done)

    model = loaded.model.eval()
    tokens = StreamTokens.from_model(tokenizer, config)
    device = unwrap_model(loaded.model).device
    detok = audio_folder = None
    if speech is not None:
        from kimi_lora_cli.loading import load_detokenizer

        detok = load_detokenizer(speech[0].root, dtype=unwrap_model(loaded.model).dtype, device=device,
                                 ode_steps=spec.ode_steps)
        audio_folder = speech[1].open()
    stochastic = not (spec.text_sampling.greedy and spec.audio_sampling.greedy)
    summaries = {v: VariantSummary(v) for v in variants}
    new_records: list[dict[str, Any]] = []

    # Similar lengths in one batch waste less compute on padding; each output type on its own.
    batches = plan_batches(todo, out_type, lengths, spec.batch_size)

    writer = PredictionWriter(output, spec.resume)
    if progress is not None:
        progress.start(sum(1 for s in todo for v in variants if (s.id, v) not in done))
    try:
        for otype, batch in batches:
            prompts = build_prompts([s.messages for s in batch], tokenizer, config, loaded.feature_encoder,
                                    otype, [s.source for s in batch], features=features)
            gcfg = GenerationConfig(output_type=otype, max_new_tokens=step_budget(spec.max_new_tokens, otype),
                                    text=spec.text_sampling, audio=spec.audio_sampling, use_cache=spec.use_cache)
            for v in variants:
                picks = [k for k, s in enumerate(batch) if (s.id, v) not in done]
                if not picks:
                    continue
                subset = [batch[k] for k in picks]
                gens = sample_generators(subset, spec.seed, device, stochastic)
                step_cb = (lambda n: progress.update(tokens=n)) if progress is not None else None
                with activate(model, v, adapter_names):
                    results = generate(model, [prompts[k] for k in picks], gcfg, tokens, gens, on_step=step_cb)
                summary = summaries[v]
                summary.seconds += max((r.seconds for r in results), default=0.0)
                for s, r in zip(subset, results):
                    rec = make_record(s, v, otype, r, tokenizer)
                    if detok is not None and otype == "both":
                        rec.update(speak(detok, audio_folder, s, v, r.audio_tokens, spec.seed))
                    writer.write(rec)
                    new_records.append(rec)
                    summary.new_samples += 1
                    summary.new_tokens += r.steps
                if progress is not None:
                    progress.update(samples=len(subset))
        writer.finish()
    finally:
        writer.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    by_key = {(r["id"], r["adapter"]): r for r in previous if r["id"] in ids}
    by_key.update({(r["id"], r["adapter"]): r for r in new_records})
    records = [by_key[(s.id, v)] for s in samples for v in variants if (s.id, v) in by_key]
    sample_by_id = {s.id: s for s in samples}
    for r in records:
        summary = summaries.get(r["adapter"])
        if summary is None:
            continue
        summary.samples += 1
        ref = sample_by_id[r["id"]].reference
        if ref is not None:
            summary.scored += 1
            summary.counts.add(score(ref, r.get("prediction") or ""))
    otypes = tuple(sorted({out_type[s.id] for s in samples}))
    notes += [DETOKENIZER_NOTE] if "both" in otypes and detok is None else []
    silent = sum(1 for r in records if r.get("output_type") == "both" and "audio_path" not in r)
    if detok is not None and silent:
        notes.append(f"{silent} predictions kept from {output} were made without --audio-dir and have no WAV; "
                     "rerun without --resume (or with a new --output) to hear them")
    note = budget_note(new_records, spec.max_new_tokens)
    if note:
        notes.append(note)
    spoken = sum(1 for r in records if r.get("audio_path"))
    if audio_folder is not None and not spoken:
        notes.append(silence_note(records, audio_folder.path, tokens.delay))
    return InferReport(model=str(loaded.info.path), variants=variants, samples=samples, records=records,
                       summaries=summaries, output=str(output) if output else None, skipped=skipped,
                       output_types=otypes, notes=notes,
                       audio_dir=str(audio_folder.path) if audio_folder is not None else None, spoken=spoken)


def silence_note(records: list[dict[str, Any]], folder: Path, delay: int) -> str:
    """Why --audio-dir got no WAV: every spoken answer came back without an audio code."""
    both = [r for r in records if r.get("output_type") == "both"]
    if both and all(r.get("finish") == "length" and r.get("new_tokens", 0) <= delay for r in both):
        why = (f"the --max-new-tokens budget ended before the audio stream began (it starts {delay} steps after "
               "the text); raise --max-new-tokens")
    else:
        why = ("the model ended every answer without an audio code, as a model or adapter trained on text "
               "answers (ASR, task_type \"understanding\") does; use one trained on spoken answers "
               "(task_type \"speech_conversation\")")
    return f"no spoken answer was produced, so {folder} holds no WAV: {why}"

