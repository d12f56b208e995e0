"""`kimi-lora serve`: an OpenAI-compatible server for Kimi-Audio with per-request adapters and spoken answers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kimi_lora_cli.cli._options import AllowPickleOpt, DeviceOpt, DtypeOpt

_NET = "Network and safety"
_LOAD = "Batching and memory"
_SPEECH = "Audio in and out"


def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="Base model folder (the Kimi-Audio release folder), "
                                        "or a merged folder from `kimi-lora merge`.", show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", help="Adapter as NAME=DIR (or DIR, named after the folder); repeat for several. "
        "Clients pick one with `model`; 'base' is the model without adapter. Only these can be asked for.",
        show_default=False)] = None,
    speech_tokenizer: Annotated[Path | None, typer.Option(
        "--speech-tokenizer", help="Local glm-4-voice-tokenizer folder: uploaded audio is tokenized with it, as "
        "`infer --audio` does. Without it the server takes text only.", rich_help_panel=_SPEECH,
        show_default=False)] = None,
    detokenizer: Annotated[Path | None, typer.Option(
        "--detokenizer", help="Folder holding audio_detokenizer/ and vocoder/ for spoken answers. Default: "
        "--model when it has them (else spoken answers are refused).", rich_help_panel=_SPEECH,
        show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; the default answers this machine "
                                      "only. Use 0.0.0.0 (with --api-key) to serve the network.",
                                      rich_help_panel=_NET)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).", rich_help_panel=_NET)] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="KIMI_LORA_API_KEY", help="Require 'Authorization: Bearer KEY' on every /v1 request "
        "(also read from KIMI_LORA_API_KEY).", rich_help_panel=_NET, show_default=False,
        show_envvar=False)] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body (uploads, base64 "
                                                 "audio); larger ones get 413.", rich_help_panel=_NET)] = 25.0,
    max_audio_seconds: Annotated[float, typer.Option("--max-audio-seconds", help="Longest audio clip; longer "
                                                     "ones get 400.", rich_help_panel=_NET)] = 600.0,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests decoded together (they may "
                                                "use different adapters).", rich_help_panel=_LOAD)] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a decode; beyond it "
                                           "clients get 429 with Retry-After.", rich_help_panel=_LOAD)] = 64,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="How long an idle server waits for more "
                                                 "requests to join a decode (a burst becomes one batch); up to "
                                                 "25x while requests are still being received; 0: no wait.",
                                                 rich_help_panel=_LOAD)] = 10.0,
    max_loaded_adapters: Annotated[int, typer.Option(
        "--max-loaded-adapters", help="Adapters kept in memory at once (least recently used are unloaded and "
        "reloaded on demand); 0 = all.", rich_help_panel=_LOAD)] = 0,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", help="Step budget of a request without max_tokens, as `infer`: -1 = official (7500 "
        "- prompt length for text, 1500 - prompt length for spoken answers). \\[default: 512 for text answers, "
        "official for spoken]", rich_help_panel=_LOAD, show_default=False)] = None,
    ode_steps: Annotated[int, typer.Option("--ode-steps", help="Detokenizer flow-matching time points per chunk "
                                           "(official 30).", rich_help_panel=_SPEECH)] = 30,
    device: DeviceOpt = "",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Serve the model and its adapters over an OpenAI-compatible HTTP API.

    Endpoints: POST /v1/audio/transcriptions (multipart upload, the official ASR prompt), POST
    /v1/chat/completions (text and input_audio parts, multi-turn, stream, spoken answers with
    modalities ["text", "audio"]), GET /v1/models, GET /health. Same prompts, decoding loop,
    sampler defaults and detokenizer as `kimi-lora infer`; concurrent requests are decoded together.

    [bold]Examples[/]

      $ kimi-lora serve -m ./Kimi-Audio-7B-Instruct -a asr=out/asr --speech-tokenizer ./glm-4-voice-tokenizer

      $ kimi-lora serve -m ./Kimi-Audio-7B-Instruct -a a=out/a -a b=out/b --host 0.0.0.0 --api-key "$KEY"

      $ curl localhost:8000/v1/audio/transcriptions -F model=asr -F file=@clip.wav
    """
    from kimi_lora_cli.errors import ConfigError
    from kimi_lora_cli.serving.spec import (
        SERVE_EXTRA_HINT,
        ServeSpec,
        api_key_from,
        check_spec,
        parse_adapters,
    )

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - uploads (the python-multipart package)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"`kimi-lora serve` needs the serve extra ({e.name} is missing): {SERVE_EXTRA_HINT}") from None
    spec = ServeSpec(
        model=model, adapters=parse_adapters(adapter or []), speech_tokenizer=speech_tokenizer,
        detokenizer=detokenizer, host=host, port=port, api_key=api_key_from(api_key), max_batch_size=max_batch_size,
        max_queue=max_queue, batch_wait_ms=batch_wait_ms, max_loaded_adapters=max_loaded_adapters, max_new_tokens=max_new_tokens,
        max_upload_mb=max_upload_mb, max_audio_seconds=max_audio_seconds, device=device or None, dtype=dtype,
        allow_pickle=allow_pickle, ode_steps=ode_steps,
    )
    check_spec(spec)
    sock = _bind(spec.host, spec.port)  # a taken port fails now, not after the model has loaded
    try:
        _run(spec, sock)
    finally:
        sock.close()


def _bind(host: str, port: int) -> Any:
    import socket

    from kimi_lora_cli.errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: not an address this machine knows ({e}); use 127.0.0.1 or 0.0.0.0") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (0 = any free "
                          "one) or stop what uses it") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn takes the socket over
    return sock


def _run(spec: Any, sock: Any) -> None:
    import dataclasses
    import logging

    from kimi_lora_cli.cli._output import err
    from kimi_lora_cli.serving.engine import Engine
    from kimi_lora_cli.serving.server import make_server

    port = sock.getsockname()[1]
    spec = dataclasses.replace(spec, port=port)
    err.print(f"serve: loading {spec.model} ...")
    engine = Engine(spec)
    _startup_table(engine)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("kimi_lora.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    server = make_server(engine)
    server.run(sockets=[sock])
    err.print("serve: stopped")


def _startup_table(engine: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kimi_lora_cli.cli._output import err

    spec = engine.spec
    table = Table(title="kimi-lora serve", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    adapters = ", ".join(f"{n} ({p})" for n, p in spec.adapters) or "none (base only)"
    rows = [
        ("URL", f"{spec.url}/v1"),
        ("model", f"base = {spec.model}"),
        ("adapters", adapters),
        ("loaded at once", str(engine.adapters.capacity) if spec.adapters else "-"),
        ("device / dtype", f"{engine.device} / {str(engine.dtype).replace('torch.', '')}"),
        ("audio input", str(spec.speech_tokenizer) if engine.can_listen else "off (no --speech-tokenizer)"),
        ("spoken answers", str(engine.detokenizer_path) if engine.can_speak else "off (no detokenizer)"),
        ("batch / queue", f"{spec.max_batch_size} / {spec.max_queue}"),
        ("limits", f"{spec.max_upload_mb:g} MB upload, {spec.max_audio_seconds:g} s audio"),
        ("API key", "required" if spec.api_key else "none"),
    ]
    for what, value in rows:
        table.add_row(what, escape(value))
    err.print(table)
    if spec.api_key is None and spec.host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]Note:[/] listening on {escape(spec.host)} without --api-key: anyone who reaches this "
                  "machine can use the model")
    err.print(f"Serving on {escape(spec.url)} (Ctrl-C stops)")
