"""Evaluation during training: eval loss over the eval set, and with --eval-generate greedy decoding of
eval conversations by `infer`'s engine (inference/decode.py) under the current adapter -> eval_wer /
eval_cer.

Under DDP each rank evaluates its share and the sums are reduced. Engines that shard the weights
(DeepSpeed ZeRO-3) gather them inside every forward, so every rank must run the same forwards: there
each rank decodes the whole generation set (identical batches, identical greedy steps) and the
counts are taken once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kimi_lora_cli.data.samples import Sample
from kimi_lora_cli.inference.samples import InferSample, split_conversation

PAIRS_SHOWN = 4


def generation_samples(samples: list[Sample], indices: list[int], limit: int) -> list[InferSample]:
    """The eval conversations to decode (those with a text reference), at most `limit` (-1 = all), in
    eval-set order: the prompt is the conversation up to its trailing assistant answer, as in `infer`."""
    out = []
    for i in indices:
        s = samples[i]
        messages, reference = split_conversation(s.conversation)
        if reference is None or not messages:
            continue
        out.append(InferSample(id=f"{s.source.name}:{s.line}", messages=messages, reference=reference,
                               output_type=s.output_type, source=f"{s.source}:{s.line}"))
        if 0 < limit <= len(out):
            break
    return out


def default_max_new_tokens(samples: list[InferSample], tokenizer: Any) -> int:
    """Room for twice the longest reference (an over-long answer still scores its errors) plus 16."""
    longest = max((len(tokenizer.encode(s.reference or "")) for s in samples), default=0)
    return 2 * longest + 16


@dataclass
class Evaluator:
    """Everything evaluation needs from the run; `evaluate(model)` returns the eval_* metrics."""

    indices: list[int]
    batch_size: int
    decode_batch_size: int
    rank: int
    world: int
    reduce: Callable[[list[float]], list[float]]  # sum over ranks
    to_device: Callable[[list[int]], dict[str, Any]]  # collated batch on the run's device
    text_weight: float = 1.0
    audio_weight: float = 1.0
    generate: list[InferSample] = field(default_factory=list)
    tokenizer: Any = None
    config: Any = None
    store: Any = None  # FeatureStore (Whisper rows cached like training's)
    max_new_tokens: int = 64
    sharded: bool = False  # weights gathered per forward (ZeRO-3): every rank decodes everything
    autocast: Callable[[], Any] | None = None
    plan: Any = None  # BatchPlan: its eval batches (packed rows with --packing)
    last_pairs: list[tuple[str, str, str]] = field(default_factory=list)

    def evaluate(self, model: Any, unwrapped: Any) -> dict[str, float]:
        import torch

        model.eval()
        try:
            with torch.no_grad():
                metrics = self._loss(model)
                if self.generate:
                    metrics.update(self._decode(unwrapped))
        finally:
            model.train()
        return metrics

    def _loss(self, model: Any) -> dict[str, float]:
        from kimi_lora_cli.training.loss import compute_loss

        # Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
        # a rank that ran out of samples repeats one and does not count it.
        sums = [0.0, 0.0, 0.0, 0.0]
        for chunk in self._batches():
            parts = compute_loss(model, self.to_device(chunk or self.indices[:1]), self.text_weight,
                                 self.audio_weight)
            if not chunk:
                continue
            sums[0] += float(parts.total.sum())
            sums[1] += float(parts.text.sum())
            sums[2] += float(parts.audio.sum())
            sums[3] += parts.total.shape[0]
        total, text, audio, n = self.reduce(sums)
        n = max(n, 1.0)
        return {"eval_loss": total / n, "eval_text_loss": text / n, "eval_audio_loss": audio / n}

    def _batches(self) -> list[list[int]]:
        if self.plan is not None:
            return self.plan.eval_batches(self.indices, self.batch_size)
        mine = self.indices[self.rank :: self.world]
        per_rank = math.ceil(len(self.indices) / self.world)
        return [mine[b * self.batch_size : (b + 1) * self.batch_size]
                for b in range(math.ceil(per_rank / self.batch_size))]

    def _decode(self, unwrapped: Any) -> dict[str, float]:
        import contextlib

        from kimi_lora_cli.inference.decode import greedy_scores

        mine = self.generate if self.sharded else self.generate[self.rank :: self.world]
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            scored = greedy_scores(unwrapped, mine, self.tokenizer, self.config, self.store.encoder,
                                   batch_size=self.decode_batch_size, max_new_tokens=self.max_new_tokens,
                                   features=self.store)
        c = scored.counts
        sums = [c.word_errors, c.ref_words, c.char_errors, c.ref_chars, c.samples]
        if not self.sharded:
            sums = self.reduce([float(v) for v in sums])
        word_errors, ref_words, char_errors, ref_chars, n = sums
        self.last_pairs = scored.pairs[:PAIRS_SHOWN]
        return {"eval_wer": word_errors / ref_words if ref_words else float(word_errors > 0),
                "eval_cer": char_errors / ref_chars if ref_chars else float(char_errors > 0),
                "eval_generated": int(n)}


def build_evaluator(cfg: Any, samples: list[Sample], eval_idx: list[int], *, tokenizer: Any, config: Any,
                    **context: Any) -> Evaluator:
    """The run's Evaluator: the decoded set chosen from the eval conversations (an error when
    --eval-generate finds none to score), and `context` (rank, world, reduce, to_device, store, sharded,
    autocast, plan) from the trainer."""
    from kimi_lora_cli.errors import ConfigError

    generate = []
    if cfg.eval_generate_count:
        generate = generation_samples(samples, eval_idx, cfg.eval_generate_count)
        if not generate:
            raise ConfigError("--eval-generate: no evaluation conversation ends with an assistant text answer "
                              "to score")
    return Evaluator(indices=eval_idx, batch_size=cfg.eval_batch_size, decode_batch_size=cfg.decode_batch_size,
                     text_weight=cfg.text_loss_weight, audio_weight=cfg.audio_loss_weight, generate=generate,
                     tokenizer=tokenizer, config=config,
                     max_new_tokens=cfg.eval_max_new_tokens or default_max_new_tokens(generate, tokenizer), **context)


@dataclass
class EvaluationTracker:
    """Evaluations during training with their log lines, the best-model bookkeeping and early stopping
    (`best`: the run's TrainerState, replaced on resume)."""

    evaluator: Evaluator
    cfg: Any
    output_dir: Any
    say: Callable[[str], None]
    show_pairs: Callable[[list[tuple[str, str, str]]], None] | None = None
    best: Any = None

    def evaluate(self, model: Any, unwrapped: Any) -> dict[str, float]:
        metrics = self.evaluator.evaluate(model, unwrapped)
        pairs = self.evaluator.last_pairs if "eval_wer" in metrics else []
        if pairs and self.show_pairs is not None:
            self.show_pairs(pairs)
        return metrics

    def track(self, step: int, epoch: float, model: Any, unwrapped: Any, metrics: Any, result: Any) -> None:
        ev = self.evaluate(model, unwrapped)
        metrics.write({"step": step, "epoch": round(epoch, 4), **ev})
        result.last_eval_loss, result.last_eval = ev["eval_loss"], ev
        checkpoint = self.output_dir / f"checkpoint-{step}"
        improved = self.best.observe(ev, step, checkpoint, self.cfg.early_stopping_threshold)
        text = f"eval at step {step}: loss {ev['eval_loss']:.4f} (text {ev['eval_text_loss']:.4f} audio " \
               f"{ev['eval_audio_loss']:.4f})"
        if "eval_wer" in ev:
            text += f", WER {ev['eval_wer']:.4f} CER {ev['eval_cer']:.4f} on {ev['eval_generated']} decoded"
        if improved:
            text += f" [bold]best {self.best.metric_for_best_model}[/]"
        self.say(text)

    def should_stop(self) -> bool:
        patience = self.cfg.early_stopping_patience
        if patience and self.best.early_stopping_patience_counter >= patience:
            self.say(f"Early stopping: {self.best.metric_for_best_model} has not improved by more than "
                     f"{self.cfg.early_stopping_threshold} for {patience} evaluations (best "
                     f"{self.best.best_metric:.4f} at step {self.best.best_global_step}).")
            return True
        return False
