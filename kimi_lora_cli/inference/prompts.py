"""Prompt messages -> prefill inputs: the two token streams plus the Whisper rows of each audio span."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kimi_lora_cli.errors import DataError
from kimi_lora_cli.inference.generation import Prompt


def tokenize_prompt(messages: list[dict[str, Any]], tokenizer: Any, config: Any, output_type: str,
                    source: str = "prompt"):
    """The conversation's streams with the generation prompt (assistant start) appended."""
    from kimi_lora_cli.data.conversation import ConversationError, tokenize_conversation

    try:
        return tokenize_conversation(messages, tokenizer, config, output_type=output_type,
                                     add_generation_prompt=True)
    except ConversationError as e:
        raise DataError(f"{source}: {e}") from None


def build_prompts(
    conversations: Sequence[list[dict[str, Any]]],
    tokenizer: Any,
    config: Any,
    feature_encoder: Any,
    output_type: str,
    sources: Sequence[str] | None = None,
    features: Any = None,
) -> list[Prompt]:
    """One `Prompt` per conversation; all audio spans go through the Whisper encoder together, or
    through `features` (a FeatureStore: rows kept on disk by audio content) when given."""
    from pathlib import Path

    from kimi_lora_cli.data.audio import AudioError, load_audio
    from kimi_lora_cli.data.conversation import ConversationError, place_features

    sources = list(sources) if sources is not None else [f"prompt {i}" for i in range(len(conversations))]
    seqs = [tokenize_prompt(m, tokenizer, config, output_type, s) for m, s in zip(conversations, sources)]
    rows_by_seq: list[list[Any]] = [[] for _ in seqs]
    owners = [k for k, seq in enumerate(seqs) for _ in seq.media]
    paths = [Path(span.audio) for seq in seqs for span in seq.media]
    if features is not None:
        all_rows = features.rows(paths) if paths else []
    else:
        waves = []
        for k, p in zip(owners, paths):
            try:
                waves.append(load_audio(p))
            except AudioError as e:
                raise DataError(f"{sources[k]}: {e}") from None
        if waves and feature_encoder is None:
            raise DataError(f"{sources[owners[0]]}: audio input needs the Whisper encoder, which was not loaded")
        all_rows = feature_encoder.encode_batch(waves) if waves else []
    for k, rows in zip(owners, all_rows):
        rows_by_seq[k].append(rows)
    prompts = []
    for k, seq in enumerate(seqs):
        feats = None
        if seq.media:
            try:
                feats = place_features(seq, rows_by_seq[k], config.kimia_adaptor_input_dim)
            except ConversationError as e:
                raise DataError(f"{sources[k]}: {e}") from None
        prompts.append(Prompt(list(seq.audio_ids), list(seq.text_ids), list(seq.is_continuous), feats))
    return prompts
