"""Seeded tiny Kimi-Audio checkpoints in the exact release file layout (tests, demo, benchmarks).

`build_tiny_checkpoint(folder)` writes what the release folder holds, at toy sizes:
config.json with every release key, `model.safetensors.index.json` and unpadded shard names
(`model-1-of-2.safetensors` ... plus the last shard holding the five embedding / head / norm
tensors, as in the release), the 34-style `rotary_emb.inv_freq` tensors, `whisper-large-v3/`
(config.json, preprocessor_config.json, a full encoder + decoder under `model.encoder.*` /
`model.decoder.*`), `tiktoken.model` (a byte-level BPE trained here on a fixed corpus) and
`tokenizer_config.json` with `added_tokens_decoder`. Same seed, same bytes. With
`detokenizer=True` also `audio_detokenizer/` and `vocoder/` (spoken answers; random weights).

Other layouts: "finetune" (whisper under `whisper_model.speech_encoder.*` inside the main
shards, transformers shard names, no tokenizer or whisper folder) and "export"
(`whisper-large-v3/` keys without the `model.` prefix, no tokenizer files).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kimi_lora_cli.models.kimi_audio.tokenizer import (
    KIMI_PAT_STR,
    NUM_RESERVED_SPECIAL_TOKENS,
    SPECIAL_OFFSETS,
)

CORPUS = """
please transcribe the spoken content into written text. the quick brown fox jumps over the lazy dog.
hello world this is a tiny test of the kimi audio model. she sells sea shells by the sea shore.
one two three four five six seven eight nine ten. how are you today? i am fine thank you.
speech recognition turns audio into text and the model answers with words and sounds.
a small cat sat on the warm mat while rain fell outside the old stone house near the river.
"""

FIVE_LAST = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "mimo_output.weight",
             "model.mimo_norm.weight")


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mimo_layers: int = 2
    mimo_from_layer: int = 2
    bpe_merges: int = 256
    audio_codes: int = 128
    whisper_d_model: int = 16
    whisper_layers: int = 1
    whisper_heads: int = 2
    whisper_ffn: int = 32
    audio_delay: int = 6
    dtype: str = "float32"
    num_shards: int = 3
    seed: int = 0
    extra: dict = field(default_factory=dict)


def train_bpe(text: str, merges: int) -> dict[bytes, int]:
    """Deterministic byte-level BPE ranks: 256 single bytes then `merges` learned pairs."""
    import regex

    words = Counter(m.group(0).encode() for m in regex.finditer(KIMI_PAT_STR, text))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + merges:
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        candidates = [(n, p) for p, n in pairs.items() if p[0] + p[1] not in ranks]
        if not candidates:
            break
        _, (a, b) = max(candidates, key=lambda item: (item[0], item[1]))
        ranks[a + b] = len(ranks)
        for w, seq in seqs.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[w] = merged
    # Pad with unused multi-byte tokens so the vocabulary size is exactly 256 + merges.
    filler = 0
    while len(ranks) < 256 + merges:
        tok = b"\xff\xfe" + filler.to_bytes(2, "big")
        filler += 1
        if tok not in ranks:
            ranks[tok] = len(ranks)
    return ranks


def tiny_config(spec: TinySpec, num_base: int) -> dict:
    offset = num_base + NUM_RESERVED_SPECIAL_TOKENS
    cfg = {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
            "AutoModel": "modeling_moonshot_kimia.MoonshotKimiaModel",
            "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
        },
        "bos_token_id": num_base + SPECIAL_OFFSETS["[BOS]"],
        "eos_token_ids": [num_base + SPECIAL_OFFSETS["[EOS]"], num_base + SPECIAL_OFFSETS["<|im_msg_end|>"]],
        "pad_token_id": num_base + SPECIAL_OFFSETS["[PAD]"],
        "vocab_size": offset + spec.audio_codes,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "silu",
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": 8192,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-06,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "kimia_adaptor_input_dim": 4 * spec.whisper_d_model,
        "kimia_audio_output_vocab": spec.audio_codes + 512,
        "kimia_text_output_vocab": offset,
        "kimia_media_begin": num_base + SPECIAL_OFFSETS["<|im_media_begin|>"],
        "kimia_media_end": num_base + SPECIAL_OFFSETS["<|im_media_end|>"],
        "kimia_mimo_audiodelaytokens": spec.audio_delay,
        "kimia_mimo_layers": spec.mimo_layers,
        "kimia_mimo_transformer_from_layer_index": spec.mimo_from_layer,
        "kimia_token_offset": offset,
        "num_audio_special_tokens": 512,
        "num_base_tokens": num_base,
        "use_whisper_feature": True,
        "torch_dtype": spec.dtype,
        "transformers_version": "4.44.1",
        "use_cache": True,
    }
    cfg.update(spec.extra)
    return cfg


def _tokenizer_files(folder: Path, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n_base = len(ranks)
    names = {off: name for name, off in SPECIAL_OFFSETS.items()}
    decoder = {}
    for i in range(NUM_RESERVED_SPECIAL_TOKENS):
        content = names.get(i, f"<|reserved_token_{i}|>")
        decoder[str(n_base + i)] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimia.TikTokenTokenizer", None]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"})
    )


def _lm_tensors(cfg: dict, generator, dtype) -> dict:
    import torch

    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
    from kimi_lora_cli.models.kimi_audio.modeling import KimiAudioForCausalLM

    kcfg = KimiAudioConfig.from_dict(cfg)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in KimiAudioForCausalLM(kcfg).state_dict().items()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("layers.4.weight") or name.endswith("_layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            t = 0.08 * torch.randn(shape, generator=generator)
        tensors[name] = t.to(dtype)
    head_dim = kcfg.head_dim
    inv = 1.0 / (kcfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for stack, n in (("layers", kcfg.num_hidden_layers), ("mimo_layers", kcfg.kimia_mimo_layers)):
        for i in range(n):
            tensors[f"model.{stack}.{i}.self_attn.rotary_emb.inv_freq"] = inv.to(dtype).clone()
    return tensors


def _whisper_tensors(spec: TinySpec, generator, dtype) -> tuple[dict, dict]:
    import torch
    from transformers import WhisperConfig

    wcfg = WhisperConfig(
        vocab_size=64, num_mel_bins=128, d_model=spec.whisper_d_model,
        encoder_layers=spec.whisper_layers, decoder_layers=spec.whisper_layers,
        encoder_attention_heads=spec.whisper_heads, decoder_attention_heads=spec.whisper_heads,
        encoder_ffn_dim=spec.whisper_ffn, decoder_ffn_dim=spec.whisper_ffn,
        max_source_positions=1500, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    from transformers.models.whisper.modeling_whisper import WhisperModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WhisperModel(wcfg).state_dict().items()}
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if "layer_norm.weight" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            t = 0.2 * torch.randn(shape, generator=generator)
        tensors[name] = t.to(dtype)
    cfg = wcfg.to_dict()
    cfg["architectures"] = ["WhisperForConditionalGeneration"]
    cfg["torch_dtype"] = spec.dtype
    return tensors, cfg


def build_tiny_checkpoint(folder: str | Path, spec: TinySpec | None = None, layout: str = "release",
                          detokenizer: bool = False) -> Path:
    """Write a tiny random Kimi-Audio checkpoint into `folder` (created; must be empty or absent).
    `detokenizer=True` adds `audio_detokenizer/` + `vocoder/` (see models/detokenizer/tiny.py),
    sized for this checkpoint's audio codes."""
    spec = spec or TinySpec()
    if layout not in ("release", "finetune", "export"):
        raise ValueError(f"unknown layout {layout!r}")
    target = Path(folder)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: not empty; the tiny checkpoint is written into a new or empty folder")
    # Written into a sibling temp folder and renamed at the end: an interrupted build leaves no
    # folder that looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _write_checkpoint(folder, spec, layout)
        if detokenizer:
            add_tiny_detokenizer(folder, spec)
        if target.exists():
            target.rmdir()
        folder.rename(target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return target


def add_tiny_detokenizer(folder: str | Path, spec: TinySpec | None = None) -> Path:
    """Add tiny `audio_detokenizer/` + `vocoder/` to a tiny checkpoint folder (semantic vocab = its codes)."""
    import dataclasses

    from kimi_lora_cli.models.detokenizer.tiny import TinyDetokenizerSpec, build_tiny_detokenizer

    spec = spec or TinySpec()
    base = TinyDetokenizerSpec()
    dit = dataclasses.replace(base.dit, semantic_vocab_size=spec.audio_codes)
    return build_tiny_detokenizer(folder, dataclasses.replace(base, dit=dit, seed=spec.seed))


def _write_checkpoint(folder: Path, spec: TinySpec, layout: str) -> None:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, spec.dtype)
    generator = torch.Generator().manual_seed(spec.seed)
    ranks = train_bpe(CORPUS, spec.bpe_merges)
    cfg = tiny_config(spec, len(ranks))
    lm = _lm_tensors(cfg, generator, dtype)
    whisper, wcfg = _whisper_tensors(spec, generator, dtype)

    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg["bos_token_id"],
                                                               "eos_token_id": cfg["eos_token_ids"],
                                                               "pad_token_id": cfg["pad_token_id"]}))
    if layout == "finetune":
        lm.update({f"whisper_model.speech_encoder.{k[len('encoder.'):]}": v
                   for k, v in whisper.items() if k.startswith("encoder.")})
        lm = {k: v for k, v in lm.items() if not k.endswith("rotary_emb.inv_freq")}
        names = sorted(lm)
        n = max(1, spec.num_shards)
        groups = [names[i::n] for i in range(n)]
        shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    else:
        rest = sorted(k for k in lm if k not in FIVE_LAST)
        n = max(2, spec.num_shards)
        groups = [rest[i :: n - 1] for i in range(n - 1)] + [list(FIVE_LAST)]
        shard_names = [f"model-{i + 1}-of-{n - 1}.safetensors" for i in range(n - 1)] + [f"model-{n}-of-{n}.safetensors"]
    weight_map = {}
    total = 0
    for shard, group in zip(shard_names, groups):
        save_file({k: lm[k].contiguous() for k in group}, str(folder / shard), metadata={"format": "pt"})
        for k in group:
            weight_map[k] = shard
            total += lm[k].numel() * lm[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    if layout in ("release", "export"):
        wdir = folder / "whisper-large-v3"
        wdir.mkdir(exist_ok=True)
        prefix = "model." if layout == "release" else ""
        save_file({prefix + k: v.contiguous() for k, v in whisper.items()}, str(wdir / "model.safetensors"),
                  metadata={"format": "pt"})
        (wdir / "config.json").write_text(json.dumps(wcfg, indent=2))
        (wdir / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160,
            "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "sampling_rate": 16000,
            "chunk_length": 30, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
        }, indent=2))
    if layout == "release":
        _tokenizer_files(folder, ranks)


if __name__ == "__main__":  # python -m kimi_lora_cli.models.kimi_audio.tiny FOLDER [--detokenizer]
    import sys

    args = [a for a in sys.argv[1:] if a != "--detokenizer"]
    target = Path(args[0] if args else "kimi-audio-tiny")
    if (target / "config.json").exists():
        print(target)
    else:
        print(build_tiny_checkpoint(target, detokenizer="--detokenizer" in sys.argv))
