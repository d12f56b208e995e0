"""What each row of a running batch has produced: text deltas and audio chunks of streaming jobs as
soon as they are decided, and the per-step hooks `generate` calls (row adapters, early stops)."""

from __future__ import annotations

from typing import Any

from kimi_lora_cli.serving.jobs import PROMPT_ID, Job


class Answer:
    """What one job's row has produced so far, by the rules `generate` keeps its result by."""

    def __init__(self, engine: Any, job: Job) -> None:  # engine: the serving Engine
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
                    self.send_text(final=False)
        if self.job.output_type == "both" and step >= tokens.delay and audio_id >= tokens.token_offset:
            self.codes.append(audio_id - tokens.token_offset)
            if self.job.stream and self.job.speak:
                while len(self.codes) > self.chunk_end:  # more follow, so this chunk is not the last
                    self.push(self.chunk_end, is_final=False)
                    self.chunk_end += self.engine.chunk_rules.chunk_tokens

    def send_text(self, final: bool, text: str | None = None) -> None:
        text = self.engine.tokenizer.decode(self.text_ids) if text is None else text
        if not final and text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.listener.text(self.job, text[len(self.sent):])
            self.sent = text

    def push(self, end: int, is_final: bool) -> None:
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


class BatchHooks:
    """`generate`'s hooks for one batch: per-row adapters, streamed output, per-job stops, jobs that join
    the running decode (`take`: the engine's) and each job's end as soon as its row stops (`complete`)."""

    def __init__(self, jobs: list[Job], answers: list[Answer], take: Any = None, complete: Any = None) -> None:
        self.jobs, self.answers = jobs, answers
        self.router: Any = None  # row_adapters.StackedRows when the rows' adapters differ
        self.take, self.complete = take, complete
        self.adapter: str | None = None  # the batch's one adapter (BASE: none) when there is no router
        self.exits: Any = None  # the batch's ExitStack (the adapter mode it entered)
        self._ended: set[int] = set()

    def join(self, first: int, rows: int) -> list:
        return self.take(self, first, rows) if self.take is not None else []

    def finished(self, index: int, result: Any) -> None:
        if self.complete is not None and index not in self._ended:
            self._ended.add(index)
            self.complete(self.jobs[index], self.answers[index], result, len(self.jobs))

    def before_forward(self, rows: list[int]) -> None:
        if self.router is not None:
            self.router.route(rows)

    def after_step(self, steps: list[int], rows: list[int], text: list[int], audio: list[int]) -> set[int]:
        gone = set()
        for step, r, t, a in zip(steps, rows, text, audio):
            job = self.jobs[r]
            self.answers[r].observe(step, t, a)
            if job.cancelled or step + 1 >= job.budget:
                gone.add(r)
        return gone
