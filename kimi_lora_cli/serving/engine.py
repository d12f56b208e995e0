"""The serving engine: one loaded model, a queue of jobs and a worker thread that batches them into `generate`.

A job is one request already turned into Kimi-Audio messages (the `infer` format: role,
message_type, content, audio_tokens). The worker takes the oldest waiting job plus every other
waiting job that can share its decode (same output type and sampler settings; adapters may differ:
each row of the batch runs its own LoRA adapter over the one shared base, through peft's per-row
`adapter_names`), up to `--max-batch-size`. For the batch it then does what `infer` does for a
batch: speech codes of uploaded audio (`CodeStore`, the `--speech-tokenizer`), prompts and
Whisper rows (`build_prompts`), the official decoding loop (`generate`) with the same sampler,
per-request generators seeded from (seed, "prompt") as `infer --prompt` seeds them, and spoken
answers through the release detokenizer with the same noise seeding. A second thread runs the
detokenizer, so speech synthesis never holds up decoding.

Through `GenerationHooks` the worker watches every step: text deltas and 30-code audio chunks of
streaming jobs go out as soon as they are decided, a job whose client left (or whose own step
budget ran out) leaves the batch at once. Requests that arrive during a decode wait for the next
one (batching per decode, not per step).

Jobs talk back through a `JobListener` (called from the worker threads), so this module has no
web or asyncio code.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kimi_lora_cli.errors import ConfigError, DataError, KimiLoraError, ModelLoadError
from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS, SamplingParams
from kimi_lora_cli.serving.spec import BASE, ServeSpec

PROMPT_ID = "prompt"  # the sample id `infer --prompt` seeds its generators and detokenizer noise with
PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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
    _finished: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one decode."""
        return (self.output_type, self.text_sampling, self.audio_sampling)

    @property
    def stochastic(self) -> bool:
        return not (self.text_sampling.greedy and self.audio_sampling.greedy)


class _Listener:
    """A listener that ignores everything (jobs submitted without one)."""

    def prepared(self, job, error):
        pass

    def text(self, job, delta):
        pass

    def audio(self, job, wave):
        pass

    def done(self, job, outcome):
        pass


def _resolve_device(device: str | None) -> str:
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class AdapterSlots:
    """The adapters given at start; at most `capacity` attached to the model at once (least recently
    used leave first). Only the worker thread calls `ensure`."""

    def __init__(self, loaded: Any, folders: dict[str, Path], capacity: int, allow_pickle: bool) -> None:
        self.loaded = loaded
        self.folders = folders
        self.capacity = capacity
        self.allow_pickle = allow_pickle
        self.present: OrderedDict[str, None] = OrderedDict((n, None) for n in loaded.adapter_names)
        self.loads = 0
        self.evictions = 0

    def ensure(self, names: set[str]) -> None:
        from kimi_lora_cli.loading import attach_adapters

        for n in names:
            if n in self.present:
                self.present.move_to_end(n)
        missing = [n for n in names if n not in self.present]
        for n in missing:
            while len(self.present) >= self.capacity:
                victim = next(k for k in self.present if k not in names)
                self.loaded.model.delete_adapter(victim)
                self.loaded.adapter_names.remove(victim)
                del self.present[victim]
                self.evictions += 1
            attach_adapters(self.loaded, [(n, self.folders[n])], allow_pickle=self.allow_pickle)
            self.loaded.model.eval()
            self.present[n] = None
            self.loads += 1


class _MixedAdapters:
    """Forward pre-hooks on every LoRA layer that hand it the adapter of each batch row."""

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora import LoraLayer

        self.names: list[str] = []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for m in model.modules() if isinstance(m, LoraLayer)]

    def _hook(self, module, args, kwargs):
        kwargs["adapter_names"] = self.names
        return args, kwargs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Answer:
    """What one job's row has produced so far, by the rules `generate` keeps its result by."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.engine, self.job = engine, job
        self.text_ids: list[int] = []
        self.text_done = False
        self.sent = ""
        self.codes: list[int] = []
        self.pushed = 0
        self.chunk_end = engine.chunk_rules.first_chunk_tokens if engine.chunk_rules else 0
        self.detok = None
        self.noise = None

    def observe(self, step: int, text_id: int, audio_id: int) -> None:
        tokens = self.engine.tokens
        if not self.text_done:
            if text_id == tokens.text_eos:
                self.text_done = True
            elif text_id < tokens.token_offset:
                self.text_ids.append(text_id)
                if self.job.stream:
                    self._send_text(final=False)
        if self.job.output_type == "both" and step >= tokens.delay and audio_id >= tokens.token_offset:
            self.codes.append(audio_id - tokens.token_offset)
            if self.job.stream and self.job.speak:
                while len(self.codes) > self.chunk_end:  # more follow, so this chunk is not the last
                    self._push(self.chunk_end, is_final=False)
                    self.chunk_end += self.engine.chunk_rules.chunk_tokens

    def _send_text(self, final: bool, text: str | None = None) -> None:
        text = self.engine.tokenizer.decode(self.text_ids) if text is None else text
        if not final and text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.listener.text(self.job, text[len(self.sent):])
            self.sent = text

    def _push(self, end: int, is_final: bool) -> None:
        import torch

        from kimi_lora_cli.inference.speech import noise_generator

        if self.detok is None:
            self.detok = self.engine.new_detokenizer()
            self.noise = noise_generator(self.job.seed, PROMPT_ID)
        codes = torch.tensor(self.codes[self.pushed:end], dtype=torch.long)
        self.pushed = end
        job, detok, noise = self.job, self.detok, self.noise

        def work() -> None:
            if job.cancelled:
                return
            wave = detok.push(codes, is_final, generator=noise).cpu()
            job.listener.audio(job, wave)

        self.engine.speech_pool.submit(work)


class Engine:
    """Loads the model, adapters, speech tokenizer and detokenizer of a `ServeSpec` (see module docstring)."""

    def __init__(self, spec: ServeSpec) -> None:
        import torch

        from kimi_lora_cli.inference.generation import StreamTokens, unwrap_model
        from kimi_lora_cli.loading import check_adapter_folder, check_detokenizer, load_model

        self.spec = spec
        self.device = _resolve_device(spec.device)
        for name, folder in spec.adapters:
            try:
                check_adapter_folder(Path(folder), spec.allow_pickle)
            except KimiLoraError as e:
                raise type(e)(f"--adapter {name}: {e}") from None
        detok_root = spec.detokenizer
        if detok_root is None and (Path(spec.model) / "audio_detokenizer").is_dir():
            detok_root = Path(spec.model)
        detok_files = check_detokenizer(detok_root) if detok_root is not None else None

        slots = spec.loaded_adapter_slots
        first = [(n, str(p)) for n, p in spec.adapters[:slots]]
        self.loaded = load_model(spec.model, dtype=spec.dtype, device=self.device, adapters=first or None,
                                 allow_pickle=spec.allow_pickle)
        if not self.loaded.info.is_kimi:
            raise ModelLoadError(f"{self.loaded.info.path}: `serve` runs Kimi-Audio models (config.json with "
                                 "kimia_* keys); this folder holds another architecture")
        self.model = self.loaded.model.eval()
        self.config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.tokens = StreamTokens.from_model(self.tokenizer, self.config)
        net = unwrap_model(self.model)
        self.dtype = net.dtype
        self.context = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        self.adapters = AdapterSlots(self.loaded, {n: Path(p) for n, p in spec.adapters}, max(slots, 1),
                                     spec.allow_pickle)

        self.codes = None
        if spec.speech_tokenizer is not None:
            from kimi_lora_cli.data.features import CodeStore
            from kimi_lora_cli.loading import load_speech_tokenizer

            tok = load_speech_tokenizer(spec.speech_tokenizer, device=self.device)
            self.codes = CodeStore(tok, self.config.kimia_token_offset, self.config.vocab_size, cache_dir=None,
                                   memory_budget_bytes=0)

        self.detok = None
        self.chunk_rules = None
        self.detokenizer_path = None
        if detok_files is not None:
            from kimi_lora_cli.loading import load_detokenizer

            codebook = self.config.vocab_size - self.config.kimia_token_offset
            if codebook > detok_files.dit_config.semantic_vocab_size:
                raise ModelLoadError(f"{detok_files.root / 'audio_detokenizer' / 'config.yaml'}: semantic_vocab_size "
                                     f"{detok_files.dit_config.semantic_vocab_size} is smaller than the model's "
                                     f"{codebook} audio codes; use the detokenizer of the same release")
            self.detok = load_detokenizer(detok_files.root, dtype=self.dtype, device=self.device,
                                          ode_steps=spec.ode_steps)
            self.chunk_rules = self.detok.rules
            self.detokenizer_path = detok_files.root
        self.speech_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-serve-speech")
        self.torch_threads = torch.get_num_threads()

        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "batches": 0, "batched_rows": 0, "largest_batch": 0, "cancelled": 0,
                      "running": 0}

    # -- what clients may ask for ------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return [BASE, *(n for n, _ in self.spec.adapters)]

    @property
    def can_listen(self) -> bool:
        return self.codes is not None

    @property
    def can_speak(self) -> bool:
        return self.detok is not None

    def new_detokenizer(self) -> Any:
        """A detokenizer with its own streaming state over the shared DiT and vocoder weights."""
        from kimi_lora_cli.models.detokenizer.streaming import Detokenizer

        return Detokenizer(self.detok.dit, self.detok.vocoder, self.detok.rules)

    # -- the queue ----------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue `job` (thread-safe); QueueFull when --max-queue jobs are waiting already."""
        if job.listener is None:
            job.listener = _Listener()
        with self._cond:
            if len(self._waiting) >= self.spec.max_queue:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self.stats["requests"] += 1
            self._cond.notify()

    def start(self) -> None:
        if self._worker is None:
            self._stopping = False
            self._worker = threading.Thread(target=self._loop, name="kimi-serve-decode", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in left:
            self._finish(job, RequestError(503, "the server is shutting down; retry on another instance"))
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self.speech_pool.shutdown(wait=True)

    def run_pending(self) -> int:
        """Decode every waiting job in the calling thread (no worker needed); returns how many batches ran."""
        batches = 0
        while True:
            with self._cond:
                batch = self._take_batch()
            if not batch:
                return batches
            self.run_batch(batch)
            batches += 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                # Requests of a burst arrive a few ms apart: give the rest a moment to join this decode.
                until = time.monotonic() + self.spec.batch_wait_ms / 1000
                while (not self._stopping and len(self._waiting) < self.spec.max_batch_size
                       and (left := until - time.monotonic()) > 0):
                    self._cond.wait(left)
                if self._stopping:
                    return
                batch = self._take_batch()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                message = f"{type(e).__name__}: {e}".splitlines()[0] if not isinstance(e, KimiLoraError) else str(e)
                for job in batch:
                    self._finish(job, RequestError(500, f"generation failed ({message}); the server keeps running"))

    def _take_batch(self) -> list[Job]:
        """The oldest job and the waiting jobs that can share its decode (caller holds the lock)."""
        while self._waiting and self._waiting[0].cancelled:
            self._finish(self._waiting.popleft(), None)
        if not self._waiting:
            return []
        first = self._waiting.popleft()
        batch = [first]
        adapters = {first.adapter} - {BASE}
        rest: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                self._finish(job, None)
                continue
            fits = (len(batch) < self.spec.max_batch_size and job.key == first.key
                    and (job.adapter == BASE or job.adapter in adapters or len(adapters) < self.adapters.capacity))
            if fits:
                batch.append(job)
                if job.adapter != BASE:
                    adapters.add(job.adapter)
            else:
                rest.append(job)
        self._waiting = rest
        return batch

    def _finish(self, job: Job, outcome: JobResult | RequestError | None) -> None:
        if job._finished:
            return
        job._finished = True
        if outcome is None:
            self.stats["cancelled"] += 1
            outcome = RequestError(499, "the client went away; nothing was generated")
        try:
            job.listener.done(job, outcome)
        except Exception:  # noqa: BLE001 - a listener's failure is its own
            pass

    def _refuse(self, job: Job, error: RequestError) -> None:
        try:
            job.listener.prepared(job, error)
        finally:
            self._finish(job, error)

    # -- one decode ---------------------------------------------------------------------------

    def _budget(self, job: Job, prompt_len: int) -> int:
        from kimi_lora_cli.inference.generation import GenerationConfig

        asked = job.max_new_tokens
        room = self.context - prompt_len if self.context else None
        if prompt_len >= (self.context or prompt_len + 1):
            raise RequestError(400, f"the prompt takes {prompt_len} positions but the model's context is "
                                    f"{self.context}; send shorter audio or fewer messages", "messages")
        if asked is not None:
            if room is not None and asked > room:
                raise RequestError(400, f"max_tokens {asked} plus the prompt's {prompt_len} positions exceed the "
                                        f"model's context of {self.context}; ask for at most {room}", "max_tokens")
            return asked
        from kimi_lora_cli.inference.decode import step_budget

        default = step_budget(self.spec.max_new_tokens, job.output_type)  # the budget `infer` defaults to
        budget = GenerationConfig(output_type=job.output_type, max_new_tokens=default).budget(prompt_len)
        return min(budget, room) if room is not None else budget

    def _fill_codes(self, jobs: list[Job]) -> list[Job]:
        """Speech codes for every uploaded audio message, all files of the batch together."""
        need = [(j, m) for j in jobs for m in j.messages
                if m.get("message_type") == "audio" and m.get("audio_tokens") is None]
        if not need:
            return jobs
        if self.codes is None:
            for j in {id(j): j for j, _ in need}.values():
                self._refuse(j, RequestError(400, "audio input needs the speech tokenizer; start the server "
                                                  "with --speech-tokenizer DIR (glm-4-voice-tokenizer)"))
            return [j for j in jobs if not j._finished]
        waves = {p: w for j, _ in need for p, w in j.waves.items()}
        try:
            found = self.codes.codes([Path(m["content"]) for _, m in need], waves)
        except DataError:  # find the job it belongs to
            found = []
            for j, m in need:
                try:
                    found += self.codes.codes([Path(m["content"])], j.waves)
                except DataError as e:
                    self._refuse(j, RequestError(400, str(e)))
                    found.append(None)
        for (_, m), codes in zip(need, found):
            if codes is not None:
                m["audio_tokens"] = codes
        return [j for j in jobs if not j._finished]

    def _prompts(self, jobs: list[Job], output_type: str) -> tuple[list[Job], list[Any]]:
        from kimi_lora_cli.inference.prompts import build_prompts, tokenize_prompt

        ok = []
        for j in jobs:
            try:
                length = len(tokenize_prompt(j.messages, self.tokenizer, self.config, output_type, "request"))
                j.prompt_tokens = length
                j.budget = self._budget(j, length)
            except DataError as e:
                self._refuse(j, RequestError(400, str(e), "messages"))
                continue
            except RequestError as e:
                self._refuse(j, e)
                continue
            ok.append(j)

        def build(group: list[Job]) -> list[Any]:
            return build_prompts([j.messages for j in group], self.tokenizer, self.config,
                                 self.loaded.feature_encoder, output_type, ["request"] * len(group))

        try:
            return ok, build(ok) if ok else []
        except DataError:
            kept, prompts = [], []
            for j in ok:
                try:
                    prompts += build([j])
                    kept.append(j)
                except DataError as e:
                    self._refuse(j, RequestError(400, str(e), "messages"))
            return kept, prompts

    def run_batch(self, jobs: list[Job]) -> None:
        """Decode `jobs` together (they share a key); every job ends with exactly one `done`."""
        import torch

        from kimi_lora_cli.inference.generation import GenerationConfig, generate

        for j in jobs:
            if j.listener is None:
                j.listener = _Listener()
        live = []
        for j in jobs:
            if j.cancelled:
                self._finish(j, None)
            else:
                live.append(j)
        if not live:
            return
        output_type = live[0].output_type
        live = self._fill_codes(live)
        live, prompts = self._prompts(live, output_type)
        if not live:
            return
        for j in live:
            j.listener.prepared(j, None)
        self.adapters.ensure({j.adapter for j in live} - {BASE})

        first = live[0]
        gcfg = GenerationConfig(output_type=output_type, max_new_tokens=max(j.budget for j in live),
                                text=first.text_sampling, audio=first.audio_sampling)
        gens = None
        if first.stochastic:
            gens = []
            for j in live:  # seeded as `infer --prompt` seeds its one sample
                g = torch.Generator(device=self.device)
                g.manual_seed(zlib.crc32(f"{j.seed}:{PROMPT_ID}".encode()))
                gens.append(g)
        answers = [_Answer(self, j) for j in live]
        hooks = _BatchHooks(live, answers)
        wanted = {j.adapter for j in live}
        mixed = None
        if len(wanted) > 1:  # per-row adapters; one adapter runs as `infer` runs it (no per-row indexing)
            mixed = _MixedAdapters(self.model)
            hooks.names = mixed.names
        self.stats["running"] = len(live)
        self.stats["batches"] += 1
        self.stats["batched_rows"] += len(live)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        try:
            with self._only(wanted.pop() if mixed is None else None):
                results = generate(self.model, prompts, gcfg, self.tokens, gens, hooks=hooks)
        finally:
            self.stats["running"] = 0
            if mixed is not None:
                mixed.close()
        for j, a, r in zip(live, answers, results):
            if j.cancelled:
                self._finish(j, None)
                continue
            finish = {"text_eos": "stop", "audio_end": "stop"}.get(r.finish, "length")
            text = self.tokenizer.decode(r.text_tokens)
            result = JobResult(text=text, text_tokens=r.text_tokens, audio_codes=r.audio_tokens, finish=finish,
                               steps=r.steps, prompt_tokens=j.prompt_tokens, batch_rows=len(live))
            if j.stream:
                a._send_text(final=True, text=text)
            if j.speak and r.audio_tokens:
                self._speak(j, a, result)
            else:
                result.seconds = time.perf_counter() - j.submitted
                self._finish(j, result)

    @contextmanager
    def _only(self, adapter: str | None):
        """The model as one adapter (or the plain base) for a whole batch; None: rows choose (hooks)."""
        if adapter is None or not self.loaded.adapter_names:
            yield
        elif adapter == BASE:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _speak(self, job: Job, answer: _Answer, result: JobResult) -> None:
        """The waveform of a spoken answer on the speech thread, then `done` (after any streamed pieces)."""
        from kimi_lora_cli.inference.speech import noise_generator

        result.sampling_rate = self.detok.sampling_rate
        if job.stream:
            if len(result.audio_codes) > answer.pushed:
                answer.codes = list(result.audio_codes)
                answer._push(len(answer.codes), is_final=True)
        codes = result.audio_codes

        def work() -> None:
            try:
                if job.cancelled:
                    self._finish(job, None)
                    return
                if not job.stream:
                    result.wave = self.new_detokenizer().detokenize(codes, generator=noise_generator(job.seed,
                                                                                                     PROMPT_ID))
                result.seconds = time.perf_counter() - job.submitted
                self._finish(job, result)
            except Exception as e:  # noqa: BLE001
                self._finish(job, RequestError(500, f"speech synthesis failed ({type(e).__name__}: {e}); the "
                                                    "server keeps running"))

        self.speech_pool.submit(work)


class _BatchHooks:
    """`generate`'s hooks for one batch: per-row adapters, streamed output, per-job stops."""

    def __init__(self, jobs: list[Job], answers: list[_Answer]) -> None:
        self.jobs, self.answers = jobs, answers
        self.names: list[str] = []

    def before_forward(self, rows: list[int]) -> None:
        self.names[:] = [PEFT_BASE if self.jobs[r].adapter == BASE else self.jobs[r].adapter for r in rows]

    def after_step(self, step: int, rows: list[int], text: list[int], audio: list[int]) -> set[int]:
        gone = set()
        for r, t, a in zip(rows, text, audio):
            job = self.jobs[r]
            self.answers[r].observe(step, t, a)
            if job.cancelled or step + 1 >= job.budget:
                gone.add(r)
        return gone
