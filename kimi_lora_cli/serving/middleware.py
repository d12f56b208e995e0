"""The app's outer layers: OpenAI's error body for every refusal, one access-log line per request, the
request-size limit (--max-upload-mb), and the count of requests still arriving (for the batcher)."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.responses import JSONResponse

from kimi_lora_cli.serving.jobs import RequestError

log = logging.getLogger("kimi_lora.serve")
RETRY_AFTER_S = 1
DECODING_PATHS = ("/v1/audio/transcriptions", "/v1/chat/completions")  # requests that submit a job
ARRIVING = "kimi_arriving"  # scope state key: this request is counted as arriving


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status, headers=headers)


class AccessLog:
    """One log line per request: method, path, status, seconds, and what the handler noted."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 0}
        scope.setdefault("state", {})

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            note = scope["state"].get("note", "")
            log.info("%s %s %s %.3fs%s", scope["method"], scope["path"], status["code"] or "-",
                     time.perf_counter() - start, f" {note}" if note else "")


class BodyLimit:
    """413 for a body over the limit: at once from Content-Length, else while it arrives."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return (f"the request body is over this server's limit of {self.limit / (1 << 20):g} MB "
                "(--max-upload-mb); send a shorter or compressed clip")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(RequestError(413, self._message()))(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, self._message())
            return message

        await self.app(scope, counted, send)



class Arrivals:
    """Counts the requests that will submit a job from the moment they come in until they do (or end
    without one), so the batcher waits for a burst still being received (batching.py)."""

    def __init__(self, app: Any, queue: Any) -> None:  # queue: batching.JobQueue
        self.app, self.queue = app, queue

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in DECODING_PATHS:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        self.queue.arriving(+1)
        state[ARRIVING] = True
        try:
            await self.app(scope, receive, send)
        finally:
            if state.pop(ARRIVING, False):  # refused or gone before its job was submitted
                self.queue.arriving(-1)
