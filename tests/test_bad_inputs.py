"""Bad inputs, command by command: each row is a command line, the exit code, words its one-line
message must hold, and the promise that no input changed (every file of the test world is hashed
before and after) and nothing was created where the row would have written.

Placeholders in a row: {model} a tiny release-layout model, {adapter} a LoRA adapter of it, {data}
a training jsonl with its clips, {st} a speech tokenizer folder, {run} the folder of a finished
`train` run with checkpoints, {foreign} a folder holding a user's file, {file} a user's file,
{world} the folder that holds all of them, {new} a path that does not exist yet; {bad_*} broken
copies (see `world`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from adapter_helpers import make_adapter
from typer.testing import CliRunner

from kimi_lora_cli.cli.app import app


def _copy_model(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _rewrite_header(shard: Path, change) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header = change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _edit_adapter(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


class _RunsCode:
    """Unpickling this would call os.mkdir(path): the proof that a loader ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def _crafted_bin(adapter: Path, proof: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**state, "x": _RunsCode(str(proof))}, adapter / "adapter_model.bin")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, tiny, tiny_speech_tokenizer_dir):
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("world")
    model = _copy_model(tiny_dir, root / "model")
    adapter = make_adapter(model, root / "adapter", "q_proj,v_proj", r=2)
    data = write_synthetic_dataset(root / "data", tiny.config, n=4, seed=3)
    shutil.copytree(tiny_speech_tokenizer_dir, root / "st")
    lines = data.read_text().splitlines()
    (data.parent / "bad_utf8.jsonl").write_bytes(lines[0].encode() + b"\n" + b'{"task_type": "caf\xe9"}\n')
    (data.parent / "invalid.jsonl").write_text(lines[0] + "\n" + '{"task_type": oops}\n')
    (data.parent / "empty.jsonl").write_text("")
    asr = json.loads(lines[0])
    asr["task_type"] = "asr"  # the official loader would train this as text + speech
    (data.parent / "asr_task.jsonl").write_text(lines[1] + "\n" + json.dumps(asr) + "\n")
    _byo(root / "byo")
    (root / "foreign").mkdir()
    (root / "foreign" / "mine.txt").write_text("a user's notes")
    (root / "notes.txt").write_text("a user's file")
    shutil.copytree(adapter, root / "nest" / "adapter")  # an adapter inside a folder with the user's files
    (root / "nest" / "mine.txt").write_text("a user's notes")

    shard = sorted(model.glob("model-*.safetensors"))[0].name
    _copy_model(model, root / "bad_cfg_abc", lambda c: c.update(hidden_size="abc"))
    _copy_model(model, root / "bad_cfg_negative", lambda c: c.update(num_hidden_layers=-2))
    _copy_model(model, root / "bad_cfg_shapes", lambda c: c.update(intermediate_size=80))
    _copy_model(model, root / "bad_cfg_utf8")
    (root / "bad_cfg_utf8" / "config.json").write_bytes(b'{"note": "\xff",\n' + (model / "config.json").read_bytes()[1:])
    _copy_model(model, root / "bad_hdr_list")
    _rewrite_header(root / "bad_hdr_list" / shard, lambda h: [1, 2])
    _copy_model(model, root / "bad_hdr_offsets")
    _rewrite_header(root / "bad_hdr_offsets" / shard,
                    lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "data_offsets"} if i == 1 else v)
                               for i, (k, v) in enumerate(h.items())})
    _edit_adapter(adapter, root / "bad_ad_r", r="abc")
    _edit_adapter(adapter, root / "bad_ad_alpha", lora_alpha="x")
    _edit_adapter(adapter, root / "bad_ad_targets", target_modules=5)
    shutil.copytree(adapter, root / "bad_ad_utf8")
    (root / "bad_ad_utf8" / "adapter_config.json").write_bytes(b"{\n\"r\": \"\xfe\"}")

    _copy_model(model, root / "bad_index_escape")  # an index entry that points outside the folder
    index = root / "bad_index_escape" / "model.safetensors.index.json"
    body = json.loads(index.read_text())
    body["weight_map"][next(iter(body["weight_map"]))] = "/etc/passwd"
    index.write_text(json.dumps(body))
    shutil.copytree(adapter, root / "bad_ad_pickle")  # --allow-pickle with a crafted .bin
    _crafted_bin(root / "bad_ad_pickle", root / "code-ran")

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--model-name-or-path", str(model), "--data-path", str(data),
                                 "--output-dir", str(root / "run"), "--use-lora", "--lora-rank", "2",
                                 "--lora-target", "q_proj", "--max-steps", "2", "--save-steps", "1",
                                 "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return root


def _byo(folder: Path) -> None:
    """Bring-your-own-data files with one thing wrong each (issue 18)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir()
    sf.write(folder / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    (folder / "cv.jsonl").write_text("path\tsentence\na.wav\thello\n")
    (folder / "cols.csv").write_text("a,b\na.wav,hello\n")
    (folder / "m.csv").write_text("audio,text\na.wav,hello\nmissing.wav,hi\na.wav,  \n")
    (folder / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "<audio><audio>What is said?"}, {"role": "assistant", "content": "hi"}],
        "audios": ["a.wav"]}) + "\n")
    (folder / "role.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "<audio>What is said?"}, {"role": "bot", "content": "hi"}],
        "audios": ["a.wav"]}) + "\n")
    (folder / "keys.jsonl").write_text(json.dumps({"wav": "a.wav", "words": "hi"}) + "\n")
    (folder / "kaldi").mkdir()
    (folder / "kaldi" / "wav.scp").write_text("u1 sox ../a.wav -t wav - |\n")
    (folder / "kaldi" / "text").write_text("u1 hello\n")
    (folder / "nowav").mkdir()
    (folder / "nowav" / "text").write_text("u1 hello\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (dot files included) with the sha256 of each file's bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def train(*extra: str, model: str = "{model}", data: str = "{data}", lora: bool = True) -> list[str]:
    return ["train", "--model-name-or-path", model, "--data-path", data, "--device", "cpu",
            *(["--use-lora"] if lora else []), *extra]


def resume(*extra: str, data: str = "{data}") -> list[str]:
    """The settings of the {run} fixture, resumed with `extra` changes."""
    return train("--lora-rank", "2", "--lora-target", "q_proj", "-o", "{run}", "--resume-from-checkpoint", "latest",
                 *extra, data=data)


def prep(*extra: str, model: str = "{model}", data: str = "{data}") -> list[str]:
    return ["prepare", "-m", model, "-d", data, *extra]


def infer(*extra: str, model: str = "{model}", data: str = "{data}") -> list[str]:
    return ["infer", "-m", model, "-d", data, *extra]


def merge(*extra: str, model: str = "{model}", adapter: str = "{adapter}") -> list[str]:
    return ["merge", "-m", model, "-a", adapter, *extra]


# (id, argv, exit code, words in the message)
CASES = [
    # -- train: outputs (item 1, 5), flags (item 13), files (items 12, 14)
    ("train-o-is-model", train("-o", "{model}"), 1, ["--output-dir", "is the model folder"]),
    ("train-full-o-is-model", train("-o", "{model}", lora=False), 1, ["is the model folder"]),
    ("train-o-inside-model", train("-o", "{model}/out"), 1, ["is inside the model folder"]),
    ("train-o-contains-model", train("-o", "{world}"), 1, ["contains the model folder"]),
    ("train-o-is-data", train("-o", "{data}"), 1, ["is the data file"]),
    ("train-o-inside-st", train("--speech-tokenizer", "{st}", "-o", "{st}/out"), 1,
     ["is inside the speech tokenizer folder"]),
    ("train-o-is-file", train("-o", "{file}"), 1, ["is a file, not a folder"]),
    ("train-o-under-file", train("-o", "{file}/sub"), 1, ["is a file, not a folder"]),
    ("train-o-used", train("-o", "{run}"), 1, ["already holds files", "--resume-from-checkpoint latest",
                                                 "--overwrite-output-dir"]),
    ("train-o-foreign", train("-o", "{foreign}"), 1, ["already holds files", "mine.txt"]),
    ("train-o-foreign-overwrite", train("-o", "{foreign}", "--overwrite-output-dir"), 1,
     ["not made by kimi-lora train", "mine.txt"]),
    ("train-o-adapter-overwrite", train("-o", "{adapter}", "--overwrite-output-dir"), 1,
     ["not made by kimi-lora train"]),
    ("train-resume-other-rank", resume("--lora-rank", "4"), 1,
     ["other settings", "lora_rank 2 -> 4", "--overwrite-output-dir"]),
    ("train-resume-other-target", train("--lora-rank", "2", "-o", "{run}", "--resume-from-checkpoint", "latest"), 1,
     ["other settings", "lora_target 'q_proj' -> 'all'"]),
    ("train-resume-other-data", resume(data="{data_dir}/invalid.jsonl"), 1,
     ["other settings", "data_path"]),
    ("train-resume-other-seed", resume("--seed", "5"), 1, ["seed 42 -> 5"]),
    ("train-resume-foreign", train("-o", "{foreign}", "--resume-from-checkpoint", "latest"), 1,
     ["no checkpoint-N folder"]),
    ("train-max-steps-negative", train("--max-steps", "-5", "-o", "{new}"), 1, ["--max-steps must be at least 1"]),
    ("train-max-steps-zero", train("--max-steps", "0", "-o", "{new}"), 1, ["--max-steps must be at least 1"]),
    ("train-alpha-zero", train("--lora-alpha", "0", "-o", "{new}"), 1, ["--lora-alpha must be positive"]),
    ("train-alpha-negative", train("--lora-alpha", "-3", "-o", "{new}"), 1, ["--lora-alpha must be positive"]),
    ("train-device", train("--device", "bogus", "-o", "{new}"), 1, ["--device 'bogus' is not a device"]),
    ("train-modules-to-save", train("--modules-to-save", "bogus_head", "-o", "{new}"), 1,
     ["--modules-to-save 'bogus_head' matches no module", "lm_head"]),
    ("train-num-processes", train("--num-processes", "0", "-o", "{new}"), 1, ["--num-processes must be at least 1"]),
    ("train-eval-steps", train("--eval-steps", "0", "-o", "{new}"), 1, ["--eval-steps must be at least 1"]),
    ("train-data-not-utf8", train("-o", "{new}", data="{data_dir}/bad_utf8.jsonl"), 1,
     ["bad_utf8.jsonl:2: not UTF-8 (byte 0xe9 at column 19)"]),
    ("train-data-invalid-json", train("-o", "{new}", data="{data_dir}/invalid.jsonl"), 1,
     ["invalid.jsonl:2: invalid JSON (Expecting value at column 15)"]),
    ("train-data-empty", train("-o", "{new}", data="{data_dir}/empty.jsonl"), 1, ["empty.jsonl: no usable samples"]),
    ("train-data-folder", train("-o", "{new}", data="{data_dir}"), 1,
     ["data: is a folder of", "a data folder is Kaldi", "asr_task.jsonl", "pass one of them as the data file"]),
    ("train-task-type", train("-o", "{new}", data="{data_dir}/asr_task.jsonl"), 1,
     ['asr_task.jsonl:2: unknown task_type "asr"', '"understanding"', '"speech_conversation"']),
    ("train-cfg-abc", train("-o", "{new}", model="{bad_cfg_abc}"), 1,
     ["config.json", "hidden_size = 'abc' is not valid"]),
    ("train-cfg-negative", train("-o", "{new}", model="{bad_cfg_negative}"), 1,
     ["config.json", "num_hidden_layers = -2"]),
    ("train-cfg-utf8", train("-o", "{new}", model="{bad_cfg_utf8}"), 1,
     ["config.json:1: not UTF-8"]),
    # -- train --quantization (QLoRA): what bitsandbytes cannot train, refused before any weight is read
    ("train-quant-full", train("--quantization", "nf4", "-o", "{new}", lora=False), 1,
     ["--quantization nf4 trains LoRA", "add --use-lora"]),
    ("train-quant-fsdp", train("--quantization", "nf4", "--fsdp", "-o", "{new}"), 1,
     ["cannot be sharded with --fsdp", "--num-processes N"]),
    ("train-quant-zero3", train("--quantization", "nf4", "--deepspeed", "zero3", "-o", "{new}"), 1,
     ["cannot be partitioned by DeepSpeed ZeRO", "drop --deepspeed", "--num-processes N"]),
    ("train-quant-zero2", train("--quantization", "nf4", "--deepspeed", "zero2", "-o", "{new}"), 1,
     ["cannot be partitioned by DeepSpeed ZeRO", "drop --deepspeed"]),
    ("train-quant-unknown", train("--quantization", "nf3", "-o", "{new}"), 1,
     ["--quantization must be one of nf4, fp4, int8"]),
    ("train-double-quant-alone", train("--double-quant", "-o", "{new}"), 1,
     ["--double-quant", "add --quantization nf4"]),
    ("train-quant-modules-to-save", train("--quantization", "int8", "--modules-to-save", "mlp", "-o", "{new}"), 1,
     ["--modules-to-save mlp would train", "in full", "--lora-target"]),
    ("infer-quant-unknown", infer("--quantization", "q2"), 1, ["--quantization 'q2' is not a quantization"]),
    ("infer-double-quant-alone", infer("--double-quant"), 1, ["--double-quant", "--quantization nf4"]),
    ("infer-quant-cpu-blocks", infer("--quantization", "nf4", "--device", "cpu"), 1,
     ["32 inputs", "multiple of 64"]),
    # -- prepare: outputs (item 2, 13), data (item 14)
    ("prepare-o-is-data", prep("-o", "{data}"), 1, ["--output must differ from --data"]),
    ("prepare-o-in-model", prep("-o", "{model}/config.json"), 1, ["is inside the model folder"]),
    ("prepare-o-inside-model", prep("-o", "{model}/new.jsonl"), 1, ["is inside the model folder"]),
    ("prepare-o-folder", prep("-o", "{foreign}"), 1, ["is a folder"]),
    ("prepare-o-exists", prep("-o", "{file}"), 1, ["already exists", "not a file `kimi-lora prepare` wrote",
                                                    "never replaced"]),
    ("prepare-o-foreign-overwrite", prep("-o", "{file}", "--overwrite"), 1,
     ["not a file `kimi-lora prepare` wrote", "never replaced"]),
    ("prepare-rejects-foreign-overwrite", prep("-o", "{new}", "--skip-bad", "--rejects", "{file}", "--overwrite"), 1,
     ["--rejects", "not a file `kimi-lora prepare` wrote", "never replaced"]),
    ("prepare-o-inside-st", prep("--speech-tokenizer", "{st}", "-o", "{st}/o.jsonl"), 1,
     ["inside the speech tokenizer folder"]),
    ("prepare-rejects-is-data", prep("-o", "{new}", "--skip-bad", "--rejects", "{data}"), 1,
     ["--rejects", "is the --data file"]),
    ("prepare-rejects-is-output", prep("-o", "{new}", "--skip-bad", "--rejects", "{new}"), 1,
     ["--rejects", "is the --output file"]),
    ("prepare-rejects-exists", prep("-o", "{new}", "--skip-bad", "--rejects", "{file}"), 1,
     ["--rejects", "already exists"]),
    ("prepare-rejects-in-model", prep("-o", "{new}", "--rejects", "{model}/config.json"), 1,
     ["--rejects", "model folder"]),
    ("prepare-device", prep("-o", "{new}", "--device", "bogus"), 1, ["not a device"]),
    ("prepare-batch-size", prep("-o", "{new}", "--batch-size", "0"), 1, ["--batch-size 0"]),
    ("prepare-data-not-utf8", prep("-o", "{new}", data="{data_dir}/bad_utf8.jsonl"), 1,
     ["bad_utf8.jsonl:2: not UTF-8 (byte 0xe9 at column 19)"]),
    ("prepare-data-invalid-json", prep("-o", "{new}", data="{data_dir}/invalid.jsonl"), 1,
     ["invalid.jsonl:2: invalid JSON (Expecting value at column 15)"]),
    ("prepare-data-empty", prep("-o", "{new}", data="{data_dir}/empty.jsonl"), 1, ["no samples (the file is empty)"]),
    ("prepare-data-folder", prep("-o", "{new}", data="{foreign}"), 1,
     ["foreign: is a folder of no known data layout", "a data folder is Kaldi"]),
    ("prepare-task-type", prep("-o", "{new}", data="{data_dir}/asr_task.jsonl"), 1,
     ["asr_task.jsonl", 'unknown task_type "asr"']),
    ("prepare-cfg-abc", ["prepare", "-m", "{bad_cfg_abc}", "-d", "{data}", "-o", "{new}"], 1, ["hidden_size = 'abc'"]),
    ("prepare-cfg-utf8", ["prepare", "-m", "{bad_cfg_utf8}", "-d", "{data}", "-o", "{new}"], 1,
     ["config.json:1: not UTF-8"]),
    # -- infer: outputs (item 9), flags, data, adapters (item 12)
    ("infer-o-model-config", infer("-o", "{model}/config.json"), 1, ["is inside the model folder"]),
    ("infer-o-is-data", infer("-o", "{data}"), 1, ["is the --data file"]),
    ("infer-o-in-adapter", infer("-a", "{adapter}", "-o", "{adapter}/preds.jsonl"), 1, ["inside the adapter folder"]),
    ("infer-o-foreign-file", infer("-o", "{file}"), 1, ["not a predictions file", "never replaced"]),
    ("infer-o-folder", infer("-o", "{foreign}"), 1, ["is a folder"]),
    ("infer-device", infer("--device", "bogus"), 1, ["--device 'bogus' is not a device"]),
    ("infer-batch-size", infer("--batch-size", "0"), 1, ["--batch-size must be >= 1"]),
    ("infer-data-not-utf8", infer(data="{data_dir}/bad_utf8.jsonl"), 1,
     ["bad_utf8.jsonl:2: not UTF-8 (byte 0xe9 at column 19)"]),
    ("infer-data-invalid-json", infer(data="{data_dir}/invalid.jsonl"), 1,
     ["invalid.jsonl:2: invalid JSON (Expecting value at column 15)"]),
    ("infer-data-empty", infer(data="{data_dir}/empty.jsonl"), 1, ["no samples (the file is empty)"]),
    ("infer-data-folder", infer(data="{data_dir}"), 1, ["data: is a folder of", "pass one of them as the data file"]),
    ("infer-task-type", infer(data="{data_dir}/asr_task.jsonl"), 1,
     ['asr_task.jsonl:2: unknown task_type "asr"', '"understanding"']),
    ("infer-cfg-negative", ["infer", "-m", "{bad_cfg_negative}", "-d", "{data}"], 1, ["num_hidden_layers = -2"]),
    ("infer-adapter-r", infer("-a", "{bad_ad_r}"), 1, ["adapter_config.json", "r = 'abc' is not valid"]),
    ("infer-adapter-alpha", infer("-a", "{bad_ad_alpha}"), 1, ["lora_alpha = 'x' is not valid"]),
    ("infer-adapter-targets", infer("-a", "{bad_ad_targets}"), 1, ["target_modules = 5 is not valid"]),
    ("infer-index-escape", ["infer", "-m", "{bad_index_escape}", "-d", "{data}"], 1,
     ["'/etc/passwd', a path outside the model folder"]),
    ("infer-pickle-crafted", infer("-a", "{bad_ad_pickle}", "--allow-pickle", "--max-new-tokens", "1"), 1,
     ["adapter_model.bin: refused - it holds Python objects (posix.mkdir), which could run code"]),
    # -- merge: outputs (items 1, 3), bases that cannot load (item 12), flags
    ("merge-o-is-model", merge("-o", "{model}"), 1, ["is the base model folder"]),
    ("merge-o-inside-model", merge("-o", "{model}/merged"), 1, ["is inside the base model folder"]),
    ("merge-o-is-adapter", merge("-o", "{adapter}", "--overwrite"), 1, ["is the adapter folder"]),
    ("merge-o-contains-model", merge("-o", "{world}", "--overwrite"), 1, ["contains the base model folder"]),
    ("merge-o-contains-adapter", merge("-o", "{world}/nest", "--overwrite", adapter="{world}/nest/adapter"), 1,
     ["contains the adapter folder"]),
    ("merge-o-foreign", merge("-o", "{foreign}"), 1, ["is not empty", "--overwrite"]),
    ("merge-o-foreign-overwrite", merge("-o", "{foreign}", "--overwrite"), 1, ["not made by kimi-lora",
                                                                              "never replaced"]),
    ("merge-o-train-run-overwrite", merge("-o", "{run}", "--overwrite"), 1, ["made by `kimi-lora train`"]),
    ("merge-o-is-file", merge("-o", "{file}"), 1, ["is a file, not a folder"]),
    ("merge-device", merge("-o", "{new}", "--device", "bogus"), 1, ["not a device"]),
    ("merge-shard-size", merge("-o", "{new}", "--max-shard-size", "lots"), 1, ["--max-shard-size"]),
    ("merge-weights-nan", merge("-o", "{new}", "--weights", "nan"), 1, ["--weights nan", "not a finite number"]),
    ("merge-weights-inf", merge("-o", "{new}", "--weights", "inf"), 1, ["--weights inf", "not a finite number"]),
    ("merge-weights-minus-inf", merge("-o", "{new}", "--weights", "-inf"), 1, ["not a finite number"]),
    ("merge-index-escape", ["merge", "-m", "{bad_index_escape}", "-a", "{adapter}", "-o", "{new}"], 1,
     ["'/etc/passwd', a path outside the model folder"]),
    ("merge-pickle-crafted", merge("-o", "{new}", "--allow-pickle", adapter="{bad_ad_pickle}"), 1,
     ["adapter_model.bin: refused - it holds Python objects (posix.mkdir), which could run code"]),
    ("merge-cfg-abc", ["merge", "-m", "{bad_cfg_abc}", "-a", "{adapter}", "-o", "{new}"], 1, ["hidden_size = 'abc'"]),
    ("merge-cfg-negative", ["merge", "-m", "{bad_cfg_negative}", "-a", "{adapter}", "-o", "{new}"], 1,
     ["num_hidden_layers = -2"]),
    ("merge-cfg-shapes", ["merge", "-m", "{bad_cfg_shapes}", "-a", "{adapter}", "-o", "{new}"], 1,
     ["config.json implies", "different models"]),
    ("merge-cfg-utf8", ["merge", "-m", "{bad_cfg_utf8}", "-a", "{adapter}", "-o", "{new}"], 1, ["not UTF-8"]),
    ("merge-hdr-list", ["merge", "-m", "{bad_hdr_list}", "-a", "{adapter}", "-o", "{new}"], 1,
     ["malformed safetensors header", "JSON list"]),
    ("merge-hdr-offsets", ["merge", "-m", "{bad_hdr_offsets}", "-a", "{adapter}", "-o", "{new}"], 1,
     ["malformed safetensors header", "lacks data_offsets"]),
    ("merge-adapter-r", merge("-o", "{new}", adapter="{bad_ad_r}"), 1, ["r = 'abc' is not valid"]),
    ("merge-adapter-alpha", merge("-o", "{new}", adapter="{bad_ad_alpha}"), 1, ["lora_alpha = 'x'"]),
    ("merge-adapter-targets", merge("-o", "{new}", adapter="{bad_ad_targets}"), 1, ["target_modules = 5"]),
    ("merge-adapter-utf8", merge("-o", "{new}", adapter="{bad_ad_utf8}"), 1,
     ["adapter_config.json:2: not UTF-8"]),
    # -- inspect-adapter: a base that cannot load never "fits" (item 12); --top (item 13)
    ("inspect-base-cfg-abc", ["inspect-adapter", "{adapter}", "--base", "{bad_cfg_abc}"], 1, ["hidden_size = 'abc'"]),
    ("inspect-base-cfg-negative", ["inspect-adapter", "{adapter}", "--base", "{bad_cfg_negative}"], 1,
     ["num_hidden_layers = -2"]),
    ("inspect-base-shapes", ["inspect-adapter", "{adapter}", "--base", "{bad_cfg_shapes}"], 1, ["config.json implies"]),
    ("inspect-base-utf8", ["inspect-adapter", "{adapter}", "--base", "{bad_cfg_utf8}"], 1, ["config.json:1: not UTF-8"]),
    ("inspect-base-hdr-list", ["inspect-adapter", "{adapter}", "--base", "{bad_hdr_list}"], 1,
     ["malformed safetensors header"]),
    ("inspect-base-hdr-offsets", ["inspect-adapter", "{adapter}", "--base", "{bad_hdr_offsets}"], 1,
     ["lacks data_offsets"]),
    ("inspect-adapter-r", ["inspect-adapter", "{bad_ad_r}"], 1, ["r = 'abc' is not valid"]),
    ("inspect-adapter-alpha", ["inspect-adapter", "{bad_ad_alpha}"], 1, ["lora_alpha = 'x' is not valid"]),
    ("inspect-adapter-targets", ["inspect-adapter", "{bad_ad_targets}"], 1, ["target_modules = 5 is not valid"]),
    ("inspect-adapter-utf8", ["inspect-adapter", "{bad_ad_utf8}"], 1, ["not UTF-8"]),
    ("inspect-pickle-crafted", ["inspect-adapter", "{bad_ad_pickle}", "--allow-pickle"], 1,
     ["adapter_model.bin: refused - it holds Python objects (posix.mkdir), which could run code"]),
    ("inspect-base-index-escape", ["inspect-adapter", "{adapter}", "--base", "{bad_index_escape}"], 1,
     ["a path outside the model folder"]),
    ("inspect-top", ["inspect-adapter", "{adapter}", "--top", "-1"], 2, ["--top", "greater than or equal to 0"]),
    # -- bring your own data (issue 18): each format's bad input, in one line
    ("byo-tsv-as-jsonl", prep("-o", "{new}", data="{world}/byo/cv.jsonl"), 1,
     ["cv.jsonl: looks like a TSV with columns path, sentence", "--format tsv --columns audio=path,text=sentence",
      "clips/a.wav"]),
    ("byo-csv-columns", train("-o", "{new}", data="{world}/byo/cols.csv"), 1,
     ["cols.csv: looks like a CSV with columns a, b", "--format csv --columns"]),
    ("byo-columns-missing", prep("-o", "{new}", "--columns", "audio=nope", data="{world}/byo/m.csv"), 1,
     ["--columns audio=nope: no such column (columns: audio, text)"]),
    ("byo-columns-spelling", infer("--columns", "audio", data="{world}/byo/m.csv"), 1,
     ["--columns 'audio'", "expected audio=COLUMN,text=COLUMN"]),
    ("byo-csv-rows", prep("-o", "{new}", data="{world}/byo/m.csv"), 1,
     ["m.csv:3: message 1: audio file 'missing.wav' not found", "m.csv:4: empty transcript", "--skip-bad"]),
    ("byo-train-csv-rows", train("-o", "{new}", data="{world}/byo/m.csv"), 1,
     ["m.csv:3: message 1: audio file 'missing.wav' not found", "m.csv:4: empty transcript"]),
    ("byo-max-seconds", prep("-o", "{new}", "--max-audio-seconds", "0.5", data="{world}/byo/m.csv"), 1,
     ["m.csv:2: audio a.wav is 1.0 s, longer than --max-audio-seconds 0.5"]),
    ("byo-placeholders", infer(data="{world}/byo/chat.jsonl"), 1,
     ["chat.jsonl:1: 2 <audio> placeholders in the messages but 1 entry in audios"]),
    ("byo-unknown-role", prep("-o", "{new}", data="{world}/byo/role.jsonl"), 1,
     ["role.jsonl:1: message 1: unknown role 'bot'", "user/human, assistant/gpt or system"]),
    ("byo-unknown-keys", train("-o", "{new}", data="{world}/byo/keys.jsonl"), 1,
     ["keys.jsonl: looks like JSON with keys wav, words", "--format nemo --columns audio=wav,text=words"]),
    ("byo-kaldi-pipeline", prep("-o", "{new}", data="{world}/byo/kaldi"), 1,
     ["wav.scp:1: is a shell pipeline", "never runs a command from a data file"]),
    ("byo-kaldi-no-wav-scp", train("-o", "{new}", "--format", "kaldi", data="{world}/byo/nowav"), 1,
     ["nowav: a Kaldi data folder needs wav.scp", "present: text"]),
    ("byo-format-unknown", prep("-o", "{new}", "--format", "xml"), 1, ["--format 'xml' is unknown"]),
    ("byo-format-folder-on-file", infer("--format", "kaldi", data="{world}/byo/m.csv"), 1,
     ["m.csv: is a file; --format kaldi reads a folder"]),
    ("byo-task-unknown", train("-o", "{new}", "--task", "asr2", data="{world}/byo/m.csv"), 1,
     ["--task 'asr2' is unknown"]),
    ("byo-language-unknown", prep("-o", "{new}", "--language", "fr", data="{world}/byo/m.csv"), 1,
     ["--language 'fr' is unknown"]),
    ("byo-no-such-data", infer(data="{world}/byo/nothing.tsv"), 1, ["nothing.tsv: no such file or folder"]),
    # -- list-modules: configs (item 12)
    ("list-cfg-abc", ["list-modules", "{bad_cfg_abc}"], 1, ["hidden_size = 'abc'"]),
    ("list-cfg-negative", ["list-modules", "{bad_cfg_negative}"], 1, ["num_hidden_layers = -2"]),
    ("list-cfg-utf8", ["list-modules", "{bad_cfg_utf8}"], 1, ["config.json:1: not UTF-8"]),
    # -- demo: its work folder is its own
    ("demo-foreign", ["demo", "--workdir", "{foreign}"], 1, ["not made by `kimi-lora demo`"]),
    ("demo-train-run", ["demo", "--workdir", "{run}"], 1, ["not made by `kimi-lora demo`"]),
    ("demo-file", ["demo", "--workdir", "{file}"], 1, ["is a file, not a folder"]),
]


def _fill(arg: str, world: Path, new: Path) -> str:
    names = {"model": "model", "adapter": "adapter", "data_dir": "data", "data": "data/train.jsonl", "st": "st",
             "run": "run", "foreign": "foreign", "file": "notes.txt"}
    out = arg.replace("{world}", str(world)).replace("{new}", str(new))
    for key, rel in names.items():
        out = out.replace("{" + key + "}", str(world / rel))
    if "{bad_" in out:
        start = out.index("{bad_")
        end = out.index("}", start)
        out = out[:start] + str(world / out[start + 1 : end]) + out[end + 1 :]
    return out


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, argv, code, words):
    new = tmp_path / "new"
    args = [_fill(a, world, new) for a in argv]
    before = snapshot(world)
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    text = " ".join(result.stderr.split())
    assert result.exit_code == code, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert text.count("Error") == 1, result.stderr  # one message
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    assert "weights_only=False" not in text and "unexpected" not in text
    assert snapshot(world) == before, "an input changed"
    assert not new.exists() and list(tmp_path.iterdir()) == []


def test_the_table_is_big_enough():
    """Every command has its rows (the count is reported in the issue's closing note)."""
    commands = {c[1][0] for c in CASES}
    assert commands == {"train", "prepare", "infer", "merge", "inspect-adapter", "list-modules", "demo"}
    assert len(CASES) >= 90 and len({c[0] for c in CASES}) == len(CASES)


def test_json_and_utf8_errors_read_the_same_in_every_command(world, tmp_path):
    """train, prepare and infer report a bad line with the same words (one line reader)."""
    found = {}
    for name in ("invalid.jsonl", "bad_utf8.jsonl"):
        data = str(world / "data" / name)
        for cmd in (["train", "--model-name-or-path", str(world / "model"), "--data-path", data, "--use-lora",
                     "-o", str(tmp_path / "t")],
                    ["prepare", "-m", str(world / "model"), "-d", data, "-o", str(tmp_path / "p.jsonl")],
                    ["infer", "-m", str(world / "model"), "-d", data]):
            result = CliRunner().invoke(app, cmd, catch_exceptions=False)
            line = next(x for x in " ".join(result.stderr.split()).split(f"{name}:2: ")[1:])
            found.setdefault(name, set()).add(line.split(";")[0])
    assert found["invalid.jsonl"] == {"invalid JSON (Expecting value at column 15)"}
    assert found["bad_utf8.jsonl"] == {"not UTF-8 (byte 0xe9 at column 19)"}
