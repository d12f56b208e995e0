"""The HTTP routes (FastAPI): OpenAI's transcription, chat and model-list endpoints plus /health.

Every refusal is a JSON body `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape, so
its clients raise their usual exceptions) with one line saying what is wrong and how to fix it.
The engine runs in its own threads; a request waits on futures the engine settles through a
listener (bridge.py), and a client that goes away marks its job cancelled (it leaves the batch at
the next step, or never starts). The routes are plain functions over the app's `ServerState`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS, SamplingParams
from kimi_lora_cli.serving.audio_io import Uploads, decode_upload
from kimi_lora_cli.serving.bridge import Bridge, ClientGone, wait_for
from kimi_lora_cli.serving.engine import Engine, Job, JobResult, QueueFull, RequestError
from kimi_lora_cli.serving.middleware import ARRIVING, AccessLog, Arrivals, BodyLimit, error_response, log
from kimi_lora_cli.serving.replies import completion, event_stream, result_note
from kimi_lora_cli.serving.requests import (
    ChatRequest,
    chat_parts,
    check_top_p,
    decode_base64,
    parse_chat,
    sampling,
    transcription_instruction,
)
from kimi_lora_cli.serving.spec import ServeSpec

TRANSCRIPTION_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature")
RESPONSE_FORMATS = ("json", "text", "verbose_json")


@dataclass
class ServerState:
    """What every route needs: the engine, the upload folder and the start time (model cards)."""

    engine: Engine
    uploads: Uploads
    started: int

    @property
    def spec(self) -> ServeSpec:
        return self.engine.spec

    def authorize(self, request: Request) -> None:
        if self.spec.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.spec.api_key.encode()):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' with the "
                                    "key the server was started with (--api-key / KIMI_LORA_API_KEY)")

    def pick_model(self, name: Any) -> str:
        names = self.engine.model_names
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"model is required; one of: {', '.join(names)}", "model")
        if name not in names:
            raise RequestError(404, f"model {name!r} is not served here; use one of: "
                                    f"{', '.join(names)} (GET /v1/models)", "model")
        return name

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "kimi-lora",
                "root": str(self.spec.model), "parent": None if name == "base" else "base"}

    def need_listener(self) -> None:
        if not self.engine.can_listen:
            raise RequestError(400, "audio input needs the speech tokenizer; start the server with "
                                    "--speech-tokenizer DIR (the glm-4-voice-tokenizer folder)")

    async def load_upload(self, data: bytes, suffix: str, what: str, saved: list[Path]) -> tuple[Path, Any]:
        path = self.uploads.save(data, suffix)
        saved.append(path)
        wave = await asyncio.to_thread(decode_upload, path, what, self.spec.max_audio_seconds)
        return path, wave

    async def submit(self, request: Request, job: Job) -> Bridge:
        """Queue `job` and wait until its prompt is built (a refusal of its input raises here)."""
        bridge = Bridge(asyncio.get_running_loop())
        job.listener = bridge
        try:
            self.engine.submit(job, arrived=request.scope["state"].pop(ARRIVING, False))
        except QueueFull as e:
            raise e from None
        request.state.note = f"model={job.adapter}"
        error = await wait_for(bridge.ready, request, job)
        if error is not None:
            raise error
        return bridge

    async def finished(self, request: Request, job: Job, bridge: Bridge) -> JobResult:
        outcome = await wait_for(bridge.finished, request, job)
        if isinstance(outcome, RequestError):
            raise outcome
        request.state.note = result_note(job, outcome)
        return outcome


def _state(request: Request) -> ServerState:
    return request.app.state.kimi


def _remove(saved: list[Path]) -> None:
    for p in saved:
        p.unlink(missing_ok=True)


async def _unless_gone(answer: Awaitable[Any], saved: list[Path]) -> Any:
    """`answer`'s value, or None when the client went away; the uploaded files are removed either way."""
    try:
        return await answer
    except ClientGone:
        return None
    finally:
        _remove(saved)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.kimi
    state.engine.start()
    try:
        yield
    finally:
        await asyncio.get_running_loop().run_in_executor(None, state.engine.stop)
        state.uploads.close()


# -- errors ------------------------------------------------------------------------------------


async def _refused(request: Request, e: RequestError) -> JSONResponse:
    request.state.note = f"error={e.message[:120]!r}"
    return error_response(e)


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}; this server has /v1/audio/transcriptions, "
                    "/v1/chat/completions, /v1/models and /health",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return error_response(RequestError(e.status_code, message))


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error")
    line = f"{type(e).__name__}: {e}".splitlines()[0]
    return error_response(RequestError(500, f"internal error ({line}); the server keeps running"))


# -- routes ------------------------------------------------------------------------------------


async def health(request: Request) -> dict[str, Any]:
    engine = _state(request).engine
    return {"status": "ok", "models": engine.model_names, "waiting": engine.waiting, **engine.stats,
            "audio_input": engine.can_listen, "spoken_answers": engine.can_speak}


async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    state.authorize(request)
    return {"object": "list", "data": [state.model_card(n) for n in state.engine.model_names]}


async def one_model(name: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.authorize(request)
    return state.model_card(state.pick_model(name))


async def _transcription_form(request: Request) -> Any:
    """The multipart form, its fields checked by name."""
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
    return form


def _transcription_sampling(value: Any) -> SamplingParams:
    if value in (None, ""):
        return TEXT_DEFAULTS
    try:
        t = float(value)
        if not 0 <= t <= 2:
            raise ValueError
    except ValueError:
        raise RequestError(400, "temperature must be a number in 0..2", "temperature") from None
    return sampling(t, None, None, TEXT_DEFAULTS)


async def transcriptions(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    form = await _transcription_form(request)
    adapter = state.pick_model(form.get("model"))
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise RequestError(400, "file is required: the audio as a multipart file field", "file")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise RequestError(400, f"response_format {fmt!r} is not supported; use json, text or verbose_json",
                           "response_format")
    text_sampling = _transcription_sampling(form.get("temperature"))
    state.need_listener()
    language = form.get("language") or None
    instruction = transcription_instruction(language, form.get("prompt"))
    saved: list[Path] = []

    async def answer() -> tuple[JobResult, Any]:
        data = await upload.read()
        path, wave = await state.load_upload(data, Path(upload.filename or "").suffix, "file", saved)
        messages = [{"role": "user", "message_type": "text", "content": instruction},
                    {"role": "user", "message_type": "audio", "content": str(path)}]
        job = Job(messages=messages, adapter=adapter, output_type="text", text_sampling=text_sampling,
                  waves={path: wave})
        bridge = await state.submit(request, job)
        return await state.finished(request, job, bridge), wave

    done = await _unless_gone(answer(), saved)
    if done is None:
        return Response(status_code=499)
    result, wave = done
    if fmt == "text":
        return PlainTextResponse(result.text)
    usage = {"type": "tokens", "input_tokens": result.prompt_tokens, "output_tokens": result.steps,
             "total_tokens": result.prompt_tokens + result.steps}
    if fmt == "verbose_json":
        return JSONResponse({"task": "transcribe", "language": language or "english",
                             "duration": round(len(wave) / 16000, 3), "text": result.text, "usage": usage})
    return JSONResponse({"text": result.text, "usage": usage})


def _check_chat(state: ServerState, req: ChatRequest) -> tuple[str, bool]:
    """(adapter, whether the answer is spoken) of a parsed chat request; RequestError for what cannot be served."""
    adapter = state.pick_model(req.model)
    check_top_p(req.top_p)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise RequestError(400, "send max_tokens or max_completion_tokens, not both", "max_tokens")
    speak = "audio" in (req.modalities or ["text"])
    if speak and not state.engine.can_speak:
        raise RequestError(400, "spoken answers need the detokenizer; start the server with --detokenizer DIR "
                                "(the folder holding audio_detokenizer/ and vocoder/)", "modalities")
    if req.audio is not None and not speak:
        raise RequestError(400, "`audio` sets the spoken answer's format; also send modalities "
                                "[\"text\", \"audio\"]", "audio")
    return adapter, speak


async def _chat_job(state: ServerState, req: ChatRequest, parts: list, adapter: str, speak: bool,
                    saved: list[Path]) -> Job:
    """The job of a chat request, its audio messages decoded into `saved` files."""
    messages, waves = [], {}
    for role, kind, value, where in parts:
        if kind == "text":
            messages.append({"role": role, "message_type": "text", "content": value})
            continue
        data = decode_base64(value.data, f"{where}.data")
        path, wave = await state.load_upload(data, f".{value.format}", where, saved)
        waves[path] = wave
        messages.append({"role": role, "message_type": "audio", "content": str(path)})
    return Job(
        messages=messages, adapter=adapter, output_type="both" if speak else "text",
        max_new_tokens=req.max_tokens or req.max_completion_tokens,
        text_sampling=sampling(req.temperature, req.top_k, req.repetition_penalty, TEXT_DEFAULTS),
        audio_sampling=sampling(req.audio_temperature, req.audio_top_k, req.audio_repetition_penalty,
                                AUDIO_DEFAULTS),
        seed=req.seed if req.seed is not None else 0, speak=speak, stream=req.stream, waves=waves,
    )


async def chat(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError(400, "the body is not JSON; send application/json with `model` and `messages`") from None
    req = parse_chat(body)
    adapter, speak = _check_chat(state, req)
    parts = chat_parts(req)
    if any(kind == "audio" for _, kind, _, _ in parts):
        state.need_listener()
    saved: list[Path] = []
    try:
        job = await _chat_job(state, req, parts, adapter, speak, saved)
        bridge = await state.submit(request, job)
    except BaseException:
        _remove(saved)
        raise
    if req.stream:
        return StreamingResponse(event_stream(request, req, job, bridge, saved), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = await _unless_gone(state.finished(request, job, bridge), saved)
    if result is None:
        return Response(status_code=499)
    return JSONResponse(completion(req, result, speak))


def create_app(engine: Engine) -> Any:
    """The ASGI app of a loaded engine (its worker starts and stops with the app's lifespan)."""
    uploads = Uploads()
    started = int(time.time())
    app = FastAPI(title="kimi-lora serve", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kimi = ServerState(engine, uploads, started)
    app.add_exception_handler(RequestError, _refused)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/v1/models/{name}")(one_model)
    app.post("/v1/audio/transcriptions")(transcriptions)
    app.post("/v1/chat/completions")(chat)
    return BodyLimit(AccessLog(Arrivals(app, engine.queue)), engine.spec.max_upload_bytes)
