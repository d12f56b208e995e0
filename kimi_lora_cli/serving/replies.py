"""What the chat endpoint answers: the completion body with its spoken-audio field and usage, or the
server-sent-event stream of chunks (text deltas, audio pieces, the final chunk, usage, [DONE])."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request

from kimi_lora_cli.serving.audio_io import pcm16, wav_bytes
from kimi_lora_cli.serving.bridge import Bridge
from kimi_lora_cli.serving.jobs import Job, JobResult, RequestError
from kimi_lora_cli.serving.middleware import error_body
from kimi_lora_cli.serving.requests import ChatRequest


def usage(result: JobResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.steps,
            "total_tokens": result.prompt_tokens + result.steps}


def result_note(job: Job, result: JobResult) -> str:
    """What the access log says of a finished job."""
    return (f"model={job.adapter} prompt={result.prompt_tokens} tokens={result.steps} "
            f"batch={result.batch_rows} finish={result.finish}")


def audio_field(result: JobResult, req: ChatRequest) -> dict[str, Any]:
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


def completion(req: ChatRequest, result: JobResult, speak: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if speak:
        message["audio"] = audio_field(result, req)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish, "logprobs": None}],
        "usage": usage(result),
    }


async def event_stream(request: Request, req: ChatRequest, job: Job, bridge: Bridge,
                       saved: list[Path]) -> AsyncIterator[str]:
    """The SSE lines of a streamed chat answer; the job is cancelled when the client leaves mid-stream."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    audio_id = f"audio-{uuid.uuid4().hex}"

    def chunk(delta: dict[str, Any], finish: str | None = None, usage_: Any = None) -> str:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": req.model,
                                "choices": [] if usage_ is not None else
                                [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage_ is not None:
            body["usage"] = usage_
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
                    request.state.note = f"{result_note(job, value)} stream"
                    if job.speak:
                        yield chunk({"audio": {"id": audio_id, "transcript": value.text}})
                    yield chunk({}, finish=value.finish)
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield chunk({}, usage_=usage(value))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled = True  # a no-op when it finished; stops it when the client left mid-stream
        for p in saved:
            p.unlink(missing_ok=True)
