"""Kimi text tokenizer: `tiktoken.model` BPE ranks + special tokens from `tokenizer_config.json`.

`KimiTokenizer.encode(text)` never parses special-token markers inside user text (they
encode as ordinary BPE pieces, as the official tokenizer does). Special ids are exposed by
name (`tok.blank`, `tok.text_eos`, `tok.media_begin`, ...) and through `tok.special_id(name)`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# Qwen2-style split pattern with single-digit numbers (the Kimi `pat_str`).
KIMI_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_RESERVED_SPECIAL_TOKENS = 293 + 128

# Offsets from num_base_tokens of the special tokens the data format uses.
SPECIAL_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_msg_end|>": 2,
    "<|im_user_msg_start|>": 3,
    "<|im_assistant_msg_start|>": 4,
    "[EOT]": 9,
    "<|im_media_begin|>": 18,
    "<|im_media_end|>": 20,
    "<|im_kimia_text_blank|>": 23,
    "<|im_kimia_text_eos|>": 24,
    "<|im_kimia_user_msg_start|>": 27,
    "<|im_kimia_assistant_msg_start|>": 28,
    "<|im_kimia_speech_ct_id|>": 32,
    "<|im_kimia_speech_ctd_id|>": 33,
    "[PAD]": NUM_RESERVED_SPECIAL_TOKENS - 1,
}

_ROLE_NAMES = {
    "bos": "[BOS]",
    "eos": "[EOS]",
    "msg_end": "<|im_msg_end|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "blank": "<|im_kimia_text_blank|>",
    "text_eos": "<|im_kimia_text_eos|>",
    "user_start": "<|im_kimia_user_msg_start|>",
    "assistant_start": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>",
    "speech_ctd": "<|im_kimia_speech_ctd_id|>",
    "pad": "[PAD]",
}


class TokenizerLoadError(ValueError):
    pass


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise TokenizerLoadError(
                    f"{path}:{lineno}: not a tiktoken rank line ('<base64> <rank>'): {e}"
                ) from None
    if not ranks:
        raise TokenizerLoadError(f"{path}: empty tiktoken file")
    return ranks


class KimiTokenizer:
    """Text tokenizer of Kimi-Audio."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], source: str = "") -> None:
        import tiktoken

        self.source = source
        self.num_base_tokens = len(ranks)
        self.specials = dict(specials)
        self.id_to_special = {v: k for k, v in specials.items()}
        self._enc = tiktoken.Encoding(
            name=f"kimi:{source}", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=specials
        )
        for attr, name in _ROLE_NAMES.items():
            # A file that names a slot differently keeps the release id of that slot.
            setattr(self, attr, specials.get(name, self.num_base_tokens + SPECIAL_OFFSETS[name]))
        self.vocab_size = max([self.num_base_tokens - 1, *specials.values()]) + 1

    @classmethod
    def from_dir(cls, folder: str | Path) -> KimiTokenizer:
        folder = Path(folder)
        model_file = folder / "tiktoken.model"
        if not model_file.is_file():
            raise TokenizerLoadError(f"{model_file} not found: the Kimi-Audio folder needs its tiktoken.model")
        ranks = read_tiktoken_ranks(model_file)
        n_base = len(ranks)
        specials = {name: n_base + off for name, off in SPECIAL_OFFSETS.items()}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                data = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerLoadError(f"{config_file}:{e.lineno}: invalid JSON: {e.msg}") from None
            decoder = data.get("added_tokens_decoder") or {}
            from_file = {}
            for key, entry in decoder.items():
                content = entry.get("content") if isinstance(entry, dict) else entry
                if not isinstance(content, str) or not str(key).isdigit():
                    raise TokenizerLoadError(
                        f"{config_file}: added_tokens_decoder entry {key!r} is not {{id: {{content: ...}}}}; "
                        "restore the release tokenizer_config.json"
                    )
                from_file[content] = int(key)
            if from_file:
                # Names from the file win; the known offsets fill names it lacks.
                taken = set(from_file.values())
                specials = {k: v for k, v in specials.items() if v not in taken}
                specials.update(from_file)
        else:
            for i in range(NUM_RESERVED_SPECIAL_TOKENS):
                if n_base + i not in specials.values():
                    specials[f"<|reserved_token_{i}|>"] = n_base + i
        return cls(ranks, specials, source=str(folder))

    def special_id(self, name: str) -> int:
        try:
            return self.specials[name]
        except KeyError:
            raise KeyError(f"special token {name!r} is not defined by {self.source}") from None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if skip_special:
            ids = [i for i in ids if i < self.num_base_tokens]
        else:
            ids = [i for i in ids if i < self.num_base_tokens or i in self.id_to_special]
        return self._enc.decode(ids)
