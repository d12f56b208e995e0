"""The serving engine: one loaded model, a queue of jobs and a worker thread that batches them into `generate`.

A job is one request already turned into Kimi-Audio messages (the `infer` format: role,
message_type, content, audio_tokens). The worker takes the oldest waiting job plus every other
waiting job that can share its decode (same output type and sampler settings; adapters may differ:
each row of the batch runs its own LoRA adapter over the one shared base: row_adapters.StackedRows),
up to `--max-batch-size`. For the batch it then does what `infer` does for a
batch: speech codes of uploaded audio (`CodeStore`, the `--speech-tokenizer`), prompts and
Whisper rows (`build_prompts`), the official decoding loop (`generate`) with the same sampler,
per-request generators seeded from (seed, "prompt") as `infer --prompt` seeds them, and spoken
answers through the release detokenizer with the same noise seeding. A second thread runs the
detokenizer, so speech synthesis never holds up decoding.

Through `GenerationHooks` the worker watches every step: text deltas and 30-code audio chunks of
streaming jobs go out as soon as they are decided, a job whose client left (or whose own step
budget ran out) leaves the batch at once and its answer goes out. Requests that arrive during a
decode join it at the next step boundary (step-level batching, `generate`'s `join` hook) when they can
share it (same sampler settings; an adapter that is loaded and stacks with the batch's - a batch of
one adapter then switches to the base plus StackedRows; room under --max-batch-size) and no older
waiting request is kept out; the others wait for the next decode.

Jobs talk back through a `JobListener` (called from the worker threads), so this module has no
web or asyncio code. Beside it: the job types (jobs.py), the queue and its worker thread
(batching.py), the adapter pool (adapter_pool.py) and what each row of a running batch has
produced (streaming.py).
"""

from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kimi_lora_cli.adapter_names import BASE
from kimi_lora_cli.devices import resolve_device
from kimi_lora_cli.errors import DataError, KimiLoraError, ModelLoadError
from kimi_lora_cli.serving.adapter_pool import AdapterSlots, one_adapter
from kimi_lora_cli.serving.batching import JobQueue
from kimi_lora_cli.serving.jobs import (
    PROMPT_ID,
    Job,
    JobListener,
    JobResult,
    NullListener,
    QueueFull,
    RequestError,
)
from kimi_lora_cli.serving.row_adapters import StackedRows, stackable
from kimi_lora_cli.serving.spec import ServeSpec
from kimi_lora_cli.serving.streaming import Answer, BatchHooks

__all__ = ["Engine", "Job", "JobListener", "JobResult", "QueueFull", "RequestError"]


class Engine:
    """Loads the model, adapters, speech tokenizer and detokenizer of a `ServeSpec` (see module docstring)."""

    def __init__(self, spec: ServeSpec) -> None:
        import torch

        from kimi_lora_cli.inference.generation import StreamTokens, unwrap_model
        from kimi_lora_cli.loading import check_adapter_folder, check_detokenizer, load_model

        self.spec = spec
        self.device = resolve_device(spec.device)
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

        self.stats = {"requests": 0, "batches": 0, "batched_rows": 0, "largest_batch": 0, "cancelled": 0,
                      "running": 0, "joined": 0}
        self.queue = JobQueue(spec, self.adapters.capacity, self.run_batch, self._finish, self.stats, self._fail)
        self._stackable_cache: dict[tuple, bool] = {}
        self._finish_lock = threading.Lock()

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
        return len(self.queue)

    def submit(self, job: Job, arrived: bool = False) -> None:
        """Queue `job` (thread-safe); QueueFull when --max-queue jobs are waiting already. `arrived`: the
        request was counted by `self.queue.arriving(+1)` (see batching.py)."""
        if job.listener is None:
            job.listener = NullListener()
        self.queue.submit(job, arrived)

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.speech_pool.shutdown(wait=True)

    def run_pending(self) -> int:
        """Decode every waiting job in the calling thread (no worker needed); returns how many batches ran."""
        return self.queue.run_pending()

    def _fail(self, job: Job, e: Exception) -> None:
        """End `job` with a 500 for a failed batch, unless its row had already ended with an answer."""
        if not job.answered:
            message = str(e) if isinstance(e, KimiLoraError) else f"{type(e).__name__}: {e}".splitlines()[0]
            self._finish(job, RequestError(500, f"generation failed ({message}); the server keeps running"))

    def _finish(self, job: Job, outcome: JobResult | RequestError | None) -> None:
        with self._finish_lock:  # the worker and the speech thread may both end a job
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
        for j in jobs:
            if j.listener is None:
                j.listener = NullListener()
        live = []
        for j in jobs:
            if j.cancelled:
                self._finish(j, None)
            else:
                live.append(j)
        if not live:
            return
        output_type = live[0].output_type
        live, prompts = self._prepare(live, output_type)
        if not live:
            return
        wanted = {j.adapter for j in live}
        self.adapters.ensure(wanted - {BASE})
        if len(wanted) > 1 and not self._stackable(wanted - {BASE}):
            for name in wanted:  # DoRA & co.: one adapter at a time (peft has no per-row DoRA)
                self._decode([j for j in live if j.adapter == name],  # no joins: the other groups wait
                             [p for j, p in zip(live, prompts) if j.adapter == name], output_type, joins=False)
        else:
            self._decode(live, prompts, output_type)

    def _prepare(self, jobs: list[Job], output_type: str) -> tuple[list[Job], list[Any]]:
        """Speech codes and prompts of `jobs`; the ones refused are answered, the others hear `prepared`."""
        jobs = self._fill_codes(jobs)
        jobs, prompts = self._prompts(jobs, output_type)
        for j in jobs:
            j.listener.prepared(j, None)
        return jobs, prompts

    def _generators(self, jobs: list[Job]) -> list[Any]:
        """One generator per job, seeded as `infer --prompt` seeds its one sample."""
        import torch

        gens = []
        for j in jobs:
            g = torch.Generator(device=self.device)
            g.manual_seed(zlib.crc32(f"{j.seed}:{PROMPT_ID}".encode()))
            gens.append(g)
        return gens

    def _decode(self, live: list[Job], prompts: list[Any], output_type: str, joins: bool = True) -> None:
        """One `generate` over prepared jobs; each row runs its job's adapter (StackedRows when they differ).
        Waiting jobs that can travel with it join at step boundaries (`_take`); each job ends as soon as
        its row stops (`_complete`)."""
        from kimi_lora_cli.inference.generation import GenerationConfig, generate

        first = live[0]
        gcfg = GenerationConfig(output_type=output_type, max_new_tokens=max(j.budget for j in live),
                                text=first.text_sampling, audio=first.audio_sampling)
        gens = self._generators(live) if first.stochastic else None
        hooks = BatchHooks(list(live), [Answer(self, j) for j in live], take=self._take if joins else None,
                           complete=self._complete)
        row_adapters = [j.adapter for j in live]
        adapter = row_adapters[0]
        if len(set(row_adapters)) > 1:  # the base in peft, plus each row's own adapter from the hooks
            adapter = BASE
            hooks.router = StackedRows(self.model, row_adapters)
        hooks.adapter = adapter
        self.stats["running"] = len(live)
        self.stats["batches"] += 1
        self.stats["batched_rows"] += len(live)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        try:
            with ExitStack() as hooks.exits:  # a join may switch the model to the base + StackedRows
                hooks.exits.enter_context(one_adapter(self.model, self.loaded.adapter_names, adapter))
                results = generate(self.model, prompts, gcfg, self.tokens, gens, hooks=hooks)
        except Exception as e:
            for j in hooks.jobs[len(live):]:  # joined jobs are not in the queue's batch: end them here
                self._fail(j, e)
            raise
        finally:
            self.stats["running"] = 0
            if hooks.router is not None:
                hooks.router.close()
        for k, r in enumerate(results):  # rows that never ran a step (none in practice) end here
            hooks.finished(k, r)

    def _take(self, hooks: BatchHooks, first: int, rows: int) -> list[tuple[Any, Any, int]]:
        """Waiting jobs that join the running batch of `hooks` now: their prompts, generators and budgets."""
        room = self.spec.max_batch_size - rows
        if room <= 0 or not len(self.queue):
            return []
        lead = hooks.jobs[0]
        routed = hooks.router is not None
        in_use = set(hooks.router.adapters) if routed else {hooks.adapter} - {BASE}

        def fits(job: Job) -> bool:  # called oldest first; what it accepts widens the batch for the next
            if job.key != lead.key:
                return False
            mixed = routed or job.adapter != hooks.adapter  # the batch then runs StackedRows
            wanted = in_use | {job.adapter} - {BASE}
            if mixed and not (wanted <= set(self.loaded.adapter_names) and self._stackable(wanted)):
                return False
            in_use.update(wanted)
            return True

        taken = self.queue.take_joiners(fits, room)
        if not taken:
            return []
        try:
            taken, prompts = self._prepare(taken, lead.output_type)
        except Exception as e:  # they are in neither the queue nor the batch: end them here
            for j in taken:
                self._fail(j, e)
            raise
        if not taken:
            return []
        assert first == len(hooks.jobs), (first, len(hooks.jobs))
        hooks.jobs += taken
        hooks.answers += [Answer(self, j) for j in taken]
        self._route_joined(hooks, [j.adapter for j in taken])
        self.stats["joined"] += len(taken)
        self.stats["batched_rows"] += len(taken)
        self.stats["running"] = rows + len(taken)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows + len(taken))
        gens = self._generators(taken) if lead.stochastic else [None] * len(taken)
        return [(p, g, j.budget) for p, g, j in zip(prompts, gens, taken)]

    def _stackable(self, adapters: set[str]) -> bool:
        key = (frozenset(adapters), self.adapters.loads, self.adapters.evictions)
        if key not in self._stackable_cache:
            self._stackable_cache[key] = stackable(self.model, set(adapters))
        return self._stackable_cache[key]

    def _route_joined(self, hooks: BatchHooks, joined: list[str]) -> None:
        """Adapter routing for the rows `joined` brings: the batch's one adapter still, new rows of the
        StackedRows, or a switch to the base + StackedRows over old and new adapters."""
        self.adapters.ensure(set(joined) - {BASE})  # loaded already: marks them recently used
        if hooks.router is None and set(joined) == {hooks.adapter}:
            return
        everyone = [j.adapter for j in hooks.jobs]
        if hooks.router is None:
            if hooks.adapter != BASE:  # the rows so far ran peft's one adapter; from now on StackedRows
                hooks.exits.enter_context(self.model.disable_adapter())
            hooks.adapter = BASE
            hooks.router = StackedRows(self.model, everyone)
        elif set(joined) - hooks.router.adapters - {BASE}:
            hooks.router.close()
            hooks.router = StackedRows(self.model, everyone)
        else:
            hooks.router.add(joined)

    def _complete(self, job: Job, answer: Answer, r: Any, rows: int) -> None:
        """The end of one job's row: its result, streamed rest and spoken answer."""
        job.waves = {}  # the decoded upload is no longer needed (a long-running batch keeps its jobs)
        if job.cancelled:
            self._finish(job, None)
            return
        finish = {"text_eos": "stop", "audio_end": "stop"}.get(r.finish, "length")
        text = self.tokenizer.decode(r.text_tokens)
        result = JobResult(text=text, text_tokens=r.text_tokens, audio_codes=r.audio_tokens, finish=finish,
                           steps=r.steps, prompt_tokens=job.prompt_tokens, batch_rows=rows)
        if job.stream:
            answer.send_text(final=True, text=text)
        job.answered = True  # its `done` is on its way: a later failure of the batch must not replace it
        if job.speak and r.audio_tokens:
            self._speak(job, answer, result)
        else:
            result.seconds = time.perf_counter() - job.submitted
            self._finish(job, result)

    def _speak(self, job: Job, answer: Answer, result: JobResult) -> None:
        """The waveform of a spoken answer on the speech thread, then `done` (after any streamed pieces)."""
        from kimi_lora_cli.inference.speech import noise_generator

        result.sampling_rate = self.detok.sampling_rate
        if job.stream:
            if len(result.audio_codes) > answer.pushed:
                answer.codes = list(result.audio_codes)
                answer.push(len(answer.codes), is_final=True)
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
