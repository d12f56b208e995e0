"""Batched decoding of evaluation samples: the batch plan `infer` uses, and greedy predictions with
WER/CER for evaluation during training (the same prompts, generation loop and scoring as `infer`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kimi_lora_cli.inference.generation import GenerationConfig, StreamTokens, generate
from kimi_lora_cli.inference.metrics import ErrorCounts, score
from kimi_lora_cli.inference.samples import InferSample

OUTPUT_ORDER = ("text", "both")
# Steps a text answer gets unless --max-new-tokens says otherwise (spoken answers: the official budget).
DEFAULT_TEXT_STEPS = 512


def step_budget(max_new_tokens: int | None, output_type: str) -> int:
    """--max-new-tokens as GenerationConfig takes it (-1: the official budget)."""
    if max_new_tokens is not None:
        return max_new_tokens
    return DEFAULT_TEXT_STEPS if output_type == "text" else -1


def plan_batches(samples: Sequence[InferSample], out_type: dict[str, str], lengths: dict[str, int],
                 batch_size: int) -> list[tuple[str, list[InferSample]]]:
    """Batches of one output type each, samples sorted by prompt length (less padding per batch)."""
    order = sorted(samples, key=lambda s: (out_type[s.id], lengths[s.id]))
    batches = []
    for otype in OUTPUT_ORDER:
        group = [s for s in order if out_type[s.id] == otype]
        batches += [(otype, group[i : i + batch_size]) for i in range(0, len(group), batch_size)]
    return batches


@dataclass
class ScoredPredictions:
    counts: ErrorCounts = field(default_factory=ErrorCounts)
    pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reference, prediction)


def greedy_scores(model: Any, samples: Sequence[InferSample], tokenizer: Any, config: Any, feature_encoder: Any,
                  *, batch_size: int, max_new_tokens: int, features: Any = None) -> ScoredPredictions:
    """Greedy-decode every sample (its own output type, as `infer` would) and score the text answer
    against its reference. `model` is the (peft-wrapped) model in its current adapter state."""
    from kimi_lora_cli.inference.prompts import build_prompts, tokenize_prompt

    tokens = StreamTokens.from_model(tokenizer, config)
    out_type = {s.id: s.output_type for s in samples}
    lengths = {s.id: len(tokenize_prompt(s.messages, tokenizer, config, s.output_type, s.source)) for s in samples}
    result = ScoredPredictions()
    for otype, batch in plan_batches(samples, out_type, lengths, batch_size):
        prompts = build_prompts([s.messages for s in batch], tokenizer, config, feature_encoder, otype,
                                [s.source for s in batch], features=features)
        gcfg = GenerationConfig(output_type=otype, max_new_tokens=max_new_tokens)
        for s, r in zip(batch, generate(model, prompts, gcfg, tokens)):
            prediction = tokenizer.decode(r.text_tokens)
            if s.reference is not None:
                result.counts.add(score(s.reference, prediction))
                result.pairs.append((s.id, s.reference, prediction))
    order = {s.id: k for k, s in enumerate(samples)}
    result.pairs.sort(key=lambda p: order[p[0]])
    return result
