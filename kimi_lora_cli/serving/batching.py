"""The engine's queue: waiting jobs, and the worker thread that takes the oldest one plus every waiting
job that can share its decode (same key, adapters within the pool's capacity) and runs them as one batch.

When to start a decode: an idle worker that sees a job waits --batch-wait-ms for others to join.
Requests the web layer is still receiving (their bodies arriving, their audio being decoded: it
counts them with `arriving`) are certain to come within moments, so while there are any the worker
waits for them too, up to JOIN_WAIT_FACTOR x --batch-wait-ms: a burst of uploads becomes one decode
instead of a small first batch that the rest must wait behind. `--batch-wait-ms 0` waits for nothing."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from kimi_lora_cli.adapter_names import BASE
from kimi_lora_cli.serving.jobs import Job, JobResult, QueueFull, RequestError
from kimi_lora_cli.serving.spec import ServeSpec

Finish = Callable[[Job, "JobResult | RequestError | None"], None]
JOIN_WAIT_FACTOR = 25  # longest wait for requests still arriving, in units of --batch-wait-ms


class JobQueue:
    """Thread-safe queue of jobs; `run_batch` decodes a batch, `finish` ends a job (None: cancelled)."""

    def __init__(self, spec: ServeSpec, adapter_capacity: int, run_batch: Callable[[list[Job]], None],
                 finish: Finish, stats: dict[str, int], fail: Callable[[Job, Exception], None]) -> None:
        self.spec = spec
        self.adapter_capacity = adapter_capacity
        self.run_batch = run_batch
        self.finish = finish
        self.fail = fail  # ends a job of a failed batch (unless it was answered already)
        self.stats = stats
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._arriving = 0  # requests received by the web layer whose jobs are not submitted yet
        self._worker: threading.Thread | None = None
        self._stopping = False

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def arriving_now(self) -> int:
        return self._arriving

    def arriving(self, change: int) -> None:
        """+1 when the web layer starts receiving a request that will submit a job, -1 when it will not."""
        with self._cond:
            self._arriving += change
            self._cond.notify_all()

    def submit(self, job: Job, arrived: bool = False) -> None:
        """Queue `job` (`arrived`: it was counted by `arriving`); QueueFull when --max-queue jobs wait already."""
        with self._cond:
            if arrived:
                self._arriving -= 1
                self._cond.notify_all()
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
        """Refuse the waiting jobs (503) and wait for the batch in progress."""
        with self._cond:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in left:
            self.finish(job, RequestError(503, "the server is shutting down; retry on another instance"))
        if self._worker is not None:
            self._worker.join()
            self._worker = None

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
                start = time.monotonic()
                wait = self.spec.batch_wait_ms / 1000
                while not self._stopping and len(self._waiting) < self.spec.max_batch_size:
                    until = start + (wait * JOIN_WAIT_FACTOR if self._arriving > 0 else wait)
                    if (left := until - time.monotonic()) <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return
                batch = self._take_batch()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                for job in batch:
                    self.fail(job, e)

    def take_joiners(self, accept: Callable[[Job], bool], limit: int) -> list[Job]:
        """Waiting jobs that can join a running decode, oldest first, at most `limit`; stops at the first
        one that cannot (no job overtakes an older one it cannot travel with: that one's decode comes next)."""
        taken: list[Job] = []
        with self._cond:
            while self._waiting and len(taken) < limit:
                job = self._waiting[0]
                if job.cancelled:
                    self.finish(self._waiting.popleft(), None)
                elif accept(job):
                    taken.append(self._waiting.popleft())
                else:
                    break
        return taken

    def _take_batch(self) -> list[Job]:
        """The oldest job and the waiting jobs that can share its decode (caller holds the lock)."""
        while self._waiting and self._waiting[0].cancelled:
            self.finish(self._waiting.popleft(), None)
        if not self._waiting:
            return []
        first = self._waiting.popleft()
        batch = [first]
        adapters = {first.adapter} - {BASE}
        rest: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                self.finish(job, None)
                continue
            fits = (len(batch) < self.spec.max_batch_size and job.key == first.key
                    and (job.adapter == BASE or job.adapter in adapters or len(adapters) < self.adapter_capacity))
            if fits:
                batch.append(job)
                if job.adapter != BASE:
                    adapters.add(job.adapter)
            else:
                rest.append(job)
        self._waiting = rest
        return batch
