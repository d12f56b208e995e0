"""From the engine's threads to the event loop: a job's listener that settles futures and fills a queue,
and waiting on them while watching for the client to go away (then the job is cancelled)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from kimi_lora_cli.serving.jobs import Job, JobResult, RequestError


class ClientGone(Exception):
    pass


class Bridge:
    """The engine's listener for one request: thread callbacks -> futures and a queue on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready: asyncio.Future = loop.create_future()
        self.finished: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (server stopped)
            pass

    @staticmethod
    def _settle(fut: asyncio.Future, value: Any) -> None:
        if not fut.done():
            fut.set_result(value)

    def prepared(self, job: Job, error: RequestError | None) -> None:
        self._call(self._settle, self.ready, error)

    def text(self, job: Job, delta: str) -> None:
        self._call(self.events.put_nowait, ("text", delta))

    def audio(self, job: Job, wave: Any) -> None:
        self._call(self.events.put_nowait, ("audio", wave))

    def done(self, job: Job, outcome: JobResult | RequestError) -> None:
        self._call(self._settle, self.ready, outcome if isinstance(outcome, RequestError) else None)
        self._call(self._settle, self.finished, outcome)
        self._call(self.events.put_nowait, ("done", outcome))


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_for(fut: asyncio.Future, request: Request, job: Job) -> Any:
    """`fut`'s value, or ClientGone (and the job cancelled) when the client disconnects first."""
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        job.cancelled = True
        raise ClientGone
    finally:
        watcher.cancel()
