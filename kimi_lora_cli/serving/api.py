"""The HTTP routes (FastAPI): OpenAI's transcription, chat and model-list endpoints plus /health.

Every refusal is a JSON body `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape, so
its clients raise their usual exceptions) with one line saying what is wrong and how to fix it.
The engine runs in its own threads; a request waits on futures the engine settles through a
listener, and a client that goes away marks its job cancelled (it leaves the batch at the next
step, or never starts).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_lora_cli.serving.audio_io import Uploads, decode_upload, pcm16, wav_bytes
from kimi_lora_cli.serving.engine import Engine, Job, JobResult, QueueFull, RequestError
from kimi_lora_cli.serving.requests import (
    ChatRequest,
    chat_parts,
    check_top_p,
    decode_base64,
    parse_chat,
    sampling,
    transcription_instruction,
)

log = logging.getLogger("kimi_lora.serve")
RETRY_AFTER_S = 1
TRANSCRIPTION_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature")
RESPONSE_FORMATS = ("json", "text", "verbose_json")


class _ClientGone(Exception):
    pass


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status, headers=headers)


class _Bridge:
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


async def _wait(fut: asyncio.Future, request: Request, job: Job) -> Any:
    """`fut`'s value, or _ClientGone (and the job cancelled) when the client disconnects first."""
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        job.cancelled = True
        raise _ClientGone
    finally:
        watcher.cancel()


class _AccessLog:
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


class _BodyLimit:
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


def create_app(engine: Engine) -> Any:
    """The ASGI app of a loaded engine (its worker starts and stops with the app's lifespan)."""
    spec = engine.spec
    uploads = Uploads()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            uploads.close()

    app = FastAPI(title="kimi-lora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> JSONResponse:
        request.state.note = f"error={e.message[:120]!r}"
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; this server has /v1/audio/transcriptions, "
                        "/v1/chat/completions, /v1/models and /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(RequestError(e.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        return error_response(RequestError(500, f"internal error ({line}); the server keeps running"))

    def authorize(request: Request) -> None:
        if spec.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), spec.api_key.encode()):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' with the "
                                    "key the server was started with (--api-key / KIMI_LORA_API_KEY)")

    def pick_model(name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"model is required; one of: {', '.join(engine.model_names)}", "model")
        if name not in engine.model_names:
            raise RequestError(404, f"model {name!r} is not served here; use one of: "
                                    f"{', '.join(engine.model_names)} (GET /v1/models)", "model")
        return name

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "kimi-lora",
                "root": str(spec.model), "parent": None if name == "base" else "base"}

    async def submit(request: Request, job: Job) -> _Bridge:
        bridge = _Bridge(asyncio.get_running_loop())
        job.listener = bridge
        try:
            engine.submit(job)
        except QueueFull as e:
            raise e from None
        request.state.note = f"model={job.adapter}"
        error = await _wait(bridge.ready, request, job)
        if error is not None:
            raise error
        return bridge

    async def finished(request: Request, job: Job, bridge: _Bridge) -> JobResult:
        outcome = await _wait(bridge.finished, request, job)
        if isinstance(outcome, RequestError):
            raise outcome
        request.state.note = (f"model={job.adapter} prompt={outcome.prompt_tokens} tokens={outcome.steps} "
                              f"batch={outcome.batch_rows} finish={outcome.finish}")
        return outcome

    async def load_upload(data: bytes, suffix: str, what: str, saved: list[Path]) -> tuple[Path, Any]:
        path = uploads.save(data, suffix)
        saved.append(path)
        wave = await asyncio.to_thread(decode_upload, path, what, spec.max_audio_seconds)
        return path, wave

    def need_listener() -> None:
        if not engine.can_listen:
            raise RequestError(400, "audio input needs the speech tokenizer; start the server with "
                                    "--speech-tokenizer DIR (the glm-4-voice-tokenizer folder)")

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.model_names, "waiting": engine.waiting, **engine.stats,
                "audio_input": engine.can_listen, "spoken_answers": engine.can_speak}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in engine.model_names]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return model_card(pick_model(name))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        authorize(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(400, "send multipart/form-data with a `file` field (the audio) and `model`")
        try:
            form = await request.form(max_files=1, max_fields=len(TRANSCRIPTION_FIELDS) + 4)
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and parser errors
            raise RequestError(400, f"the multipart body cannot be read ({e}); send multipart/form-data") from None
        unknown = [k for k in form.keys() if k not in TRANSCRIPTION_FIELDS]
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r}; this endpoint takes: "
                                    f"{', '.join(TRANSCRIPTION_FIELDS)}", unknown[0])
        adapter = pick_model(form.get("model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "file is required: the audio as a multipart file field", "file")
        fmt = form.get("response_format") or "json"
        if fmt not in RESPONSE_FORMATS:
            raise RequestError(400, f"response_format {fmt!r} is not supported; use json, text or verbose_json",
                               "response_format")
        text_sampling = engine_defaults_text()
        if form.get("temperature") not in (None, ""):
            try:
                t = float(form.get("temperature"))
                if not 0 <= t <= 2:
                    raise ValueError
            except ValueError:
                raise RequestError(400, "temperature must be a number in 0..2", "temperature") from None
            text_sampling = sampling(t, None, None, text_sampling)
        need_listener()
        language = form.get("language") or None
        instruction = transcription_instruction(language, form.get("prompt"))
        saved: list[Path] = []
        try:
            data = await upload.read()
            path, wave = await load_upload(data, Path(upload.filename or "").suffix, "file", saved)
            messages = [{"role": "user", "message_type": "text", "content": instruction},
                        {"role": "user", "message_type": "audio", "content": str(path)}]
            job = Job(messages=messages, adapter=adapter, output_type="text", text_sampling=text_sampling,
                      waves={path: wave})
            bridge = await submit(request, job)
            result = await finished(request, job, bridge)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            for p in saved:
                p.unlink(missing_ok=True)
        if fmt == "text":
            return PlainTextResponse(result.text)
        usage = {"type": "tokens", "input_tokens": result.prompt_tokens, "output_tokens": result.steps,
                 "total_tokens": result.prompt_tokens + result.steps}
        if fmt == "verbose_json":
            return JSONResponse({"task": "transcribe", "language": language or "english",
                                 "duration": round(len(wave) / 16000, 3), "text": result.text, "usage": usage})
        return JSONResponse({"text": result.text, "usage": usage})

    def engine_defaults_text():
        from kimi_lora_cli.inference.sampler import TEXT_DEFAULTS

        return TEXT_DEFAULTS

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS

        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            raise RequestError(400, "the body is not JSON; send application/json with `model` and `messages`") from None
        req = parse_chat(body)
        adapter = pick_model(req.model)
        check_top_p(req.top_p)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise RequestError(400, "send max_tokens or max_completion_tokens, not both", "max_tokens")
        speak = "audio" in (req.modalities or ["text"])
        if speak and not engine.can_speak:
            raise RequestError(400, "spoken answers need the detokenizer; start the server with --detokenizer DIR "
                                    "(the folder holding audio_detokenizer/ and vocoder/)", "modalities")
        if req.audio is not None and not speak:
            raise RequestError(400, "`audio` sets the spoken answer's format; also send modalities "
                                    "[\"text\", \"audio\"]", "audio")
        parts = chat_parts(req)
        if any(kind == "audio" for _, kind, _, _ in parts):
            need_listener()
        saved: list[Path] = []
        try:
            messages, waves = [], {}
            for role, kind, value, where in parts:
                if kind == "text":
                    messages.append({"role": role, "message_type": "text", "content": value})
                    continue
                data = decode_base64(value.data, f"{where}.data")
                path, wave = await load_upload(data, f".{value.format}", where, saved)
                waves[path] = wave
                messages.append({"role": role, "message_type": "audio", "content": str(path)})
            job = Job(
                messages=messages, adapter=adapter, output_type="both" if speak else "text",
                max_new_tokens=req.max_tokens or req.max_completion_tokens,
                text_sampling=sampling(req.temperature, req.top_k, req.repetition_penalty, TEXT_DEFAULTS),
                audio_sampling=sampling(req.audio_temperature, req.audio_top_k, req.audio_repetition_penalty,
                                        AUDIO_DEFAULTS),
                seed=req.seed if req.seed is not None else 0, speak=speak, stream=req.stream, waves=waves,
            )
            bridge = await submit(request, job)
        except BaseException:
            for p in saved:
                p.unlink(missing_ok=True)
            raise
        if req.stream:
            return StreamingResponse(_sse(request, req, job, bridge, saved), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await finished(request, job, bridge)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            for p in saved:
                p.unlink(missing_ok=True)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if speak:
            message["audio"] = _audio_field(result, req)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish, "logprobs": None}],
            "usage": _usage(result),
        })

    def _audio_field(result: JobResult, req: ChatRequest) -> dict[str, Any]:
        fmt = req.audio.format if req.audio is not None else "wav"
        if result.wave is None:
            data = b""
        elif fmt == "wav":
            data = wav_bytes(result.wave, result.sampling_rate)
        else:
            data = pcm16(result.wave).tobytes()
        return {"id": f"audio-{uuid.uuid4().hex}", "data": base64.b64encode(data).decode(),
                "expires_at": int(time.time()) + 3600, "transcript": result.text,
                "format": fmt, "sampling_rate": result.sampling_rate or None}

    async def _sse(request: Request, req: ChatRequest, job: Job, bridge: _Bridge, saved: list[Path]):
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        audio_id = f"audio-{uuid.uuid4().hex}"

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": req.model,
                                    "choices": [] if usage is not None else
                                    [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await bridge.events.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "audio":
                    data = base64.b64encode(pcm16(value).tobytes()).decode()
                    yield chunk({"audio": {"id": audio_id, "data": data}})
                else:
                    if isinstance(value, RequestError):
                        yield f"data: {json.dumps(error_body(value.status, value.message, value.param))}\n\n"
                    else:
                        request.state.note = (f"model={job.adapter} prompt={value.prompt_tokens} tokens={value.steps} "
                                              f"batch={value.batch_rows} finish={value.finish} stream")
                        if job.speak:
                            yield chunk({"audio": {"id": audio_id, "transcript": value.text}})
                        yield chunk({}, finish=value.finish)
                        if req.stream_options is not None and req.stream_options.include_usage:
                            yield chunk({}, usage=_usage(value))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled = True  # a no-op when it finished; stops it when the client left mid-stream
            for p in saved:
                p.unlink(missing_ok=True)

    return _BodyLimit(_AccessLog(app), spec.max_upload_bytes)


def _usage(result: JobResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.steps,
            "total_tokens": result.prompt_tokens + result.steps}
