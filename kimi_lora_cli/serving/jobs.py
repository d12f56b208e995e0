"""What the engine queues and hands back: a job (one request as Kimi-Audio messages), its result, the
listener it reports through, and the refusals that carry an HTTP status."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kimi_lora_cli.adapter_names import BASE
from kimi_lora_cli.errors import KimiLoraError
from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS, SamplingParams

PROMPT_ID = "prompt"  # the sample id `infer --prompt` seeds its generators and detokenizer noise with


class RequestError(KimiLoraError):
    """A request the server refuses; `status` is the HTTP status, the message says what and how to fix."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class QueueFull(RequestError):
    def __init__(self, waiting: int) -> None:
        super().__init__(429, f"the server is busy ({waiting} requests waiting, --max-queue reached); retry "
                              "after the Retry-After seconds")


class JobListener(Protocol):
    def prepared(self, job: Job, error: RequestError | None) -> None: ...

    def text(self, job: Job, delta: str) -> None: ...

    def audio(self, job: Job, wave: Any) -> None: ...

    def done(self, job: Job, outcome: JobResult | RequestError) -> None: ...


@dataclass
class JobResult:
    text: str
    text_tokens: list[int]
    audio_codes: list[int]
    finish: str  # "stop" | "length" | "cancelled"
    steps: int
    prompt_tokens: int
    wave: Any = None  # float32 tensor of the spoken answer (jobs with speak=True and audio codes)
    sampling_rate: int = 0
    batch_rows: int = 1
    seconds: float = 0.0  # from submit to done


@dataclass(eq=False)
class Job:
    messages: list[dict[str, Any]]
    adapter: str = BASE
    output_type: str = "text"
    max_new_tokens: int | None = None  # None: the server's --max-new-tokens
    text_sampling: SamplingParams = TEXT_DEFAULTS
    audio_sampling: SamplingParams = AUDIO_DEFAULTS
    seed: int = 0
    speak: bool = False  # turn the audio codes into a waveform
    stream: bool = False  # report text deltas and audio pieces as they come
    waves: dict[Path, Any] = field(default_factory=dict)  # decoded uploads (their codes are computed from them)
    listener: JobListener | None = None
    cancelled: bool = False  # set by the web layer when the client goes away
    prompt_tokens: int = 0
    budget: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    answered: bool = False  # its row ended with an answer (done may still wait for the speech thread)
    _finished: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one decode."""
        return (self.output_type, self.text_sampling, self.audio_sampling)

    @property
    def stochastic(self) -> bool:
        return not (self.text_sampling.greedy and self.audio_sampling.greedy)


class NullListener:
    """A listener that ignores everything (jobs submitted without one)."""

    def prepared(self, job, error):
        pass

    def text(self, job, delta):
        pass

    def audio(self, job, wave):
        pass

    def done(self, job, outcome):
        pass

