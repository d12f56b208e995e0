"""Shared fixtures: tiny random Kimi-Audio checkpoints in the exact release file layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Release layout (config.json, index + shards, whisper-large-v3/, tiktoken.model ...), float32."""
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Kimi-Audio-tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny checkpoint loaded once (model, tokenizer, feature encoder). Do not mutate."""
    from kimi_lora_cli.loading import load_model

    return load_model(tiny_dir, dtype="float32")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: threads only add contention on a shared 2-core machine (training tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def cli():
    """Invoke the real Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(scope="session")
def tiny_speech_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny GLM-4-Voice tokenizer folder whose 128 codes fill the tiny checkpoint's audio vocabulary."""
    from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer

    return build_tiny_speech_tokenizer(tmp_path_factory.mktemp("glm") / "glm-4-voice-tokenizer", vocab=128)


@pytest.fixture(scope="session")
def tiny_detok_dir(tmp_path_factory) -> Path:
    """A folder holding only a tiny audio_detokenizer/ + vocoder/ (release layout, 128 codes)."""
    from kimi_lora_cli.models.detokenizer.tiny import build_tiny_detokenizer

    return build_tiny_detokenizer(tmp_path_factory.mktemp("detok") / "release")


@pytest.fixture(scope="session")
def tiny_detok(tiny_detok_dir):
    """The tiny detokenizer loaded once in float32 (its streaming state is reset by every call)."""
    from kimi_lora_cli.loading import load_detokenizer

    return load_detokenizer(tiny_detok_dir, dtype="float32")


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, tiny):
    """Synthetic training jsonl files in the official format (audio_tokens included), made once per
    (n, seed, task): `train_data(n=4, seed=1, task="understanding")`."""
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset

    made: dict[tuple[int, int, str], Path] = {}

    def make(n: int = 4, seed: int = 1, task: str = "understanding") -> Path:
        key = (n, seed, task)
        if key not in made:
            made[key] = write_synthetic_dataset(tmp_path_factory.mktemp(f"data-{task}-{n}-{seed}"), tiny.config,
                                                n=n, seed=seed, task=task)
        return made[key]

    return make


@pytest.fixture(scope="session")
def data(train_data) -> Path:
    """Four understanding conversations (the default `train_data`)."""
    return train_data()


@pytest.fixture(scope="session")
def train_args(tiny_dir):
    """`kimi-lora train` arguments for a LoRA run of the tiny model (or `model=`) on the CPU:
    `train_args(data, out, "--max-steps", "2", ...)`; `lora=False` leaves out --use-lora."""

    def make(data: Path, out: Path, *extra: object, lora: bool = True, model: Path | None = None) -> list[str]:
        return ["train", "--model-name-or-path", str(model or tiny_dir), "--data-path", str(data), "--output-dir", str(out),
                *(["--use-lora"] if lora else []), "--device", "cpu", *(str(x) for x in extra)]

    return make


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    """Two LoRA adapters `a` and `b` with random (non-zero) weights, saved by peft from fresh loads of the
    tiny model (seeds 100 and 101), for the infer and serve tests."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for k, name in enumerate(("a", "b")):
        torch.manual_seed(100 + k)
        model = load_model(tiny_dir, dtype="float32", load_whisper=False, load_tokenizer_=False).model
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        peft_model.save_pretrained(str(root / name))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def mixed_data(train_data) -> Path:
    """Two conversations with spoken answers (the mimo stack trains) and two text-only ones (no audio:
    a rank whose micro-batch has none must still take part in every collective) - for the sharded
    engines' multi-process tests (FSDP, DeepSpeed)."""
    import json
    import shutil

    source = train_data(n=2, seed=3, task="mixed")
    path = source.with_name("mixed_with_text_only.jsonl")  # beside it: the clip paths are relative
    shutil.copy(source, path)
    text_only = [{"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": question},
        {"role": "assistant", "message_type": "text", "content": answer}]}
        for question, answer in (("name a fox", "test fox"), ("say it again", "fox test"))]
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in text_only)
    return path

