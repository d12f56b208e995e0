"""Running the app: uvicorn in the foreground (`kimi-lora serve`) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time
from typing import Any

from kimi_lora_cli.serving.engine import Engine


def make_server(engine: Engine, host: str | None = None, port: int | None = None) -> Any:
    import uvicorn

    from kimi_lora_cli.serving.api import create_app

    spec = engine.spec
    config = uvicorn.Config(create_app(engine), host=host or spec.host, port=spec.port if port is None else port,
                            log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False)
    return uvicorn.Server(config)


def bound_port(server: Any) -> int:
    """The port a started server listens on (what --port 0 picked)."""
    return server.servers[0].sockets[0].getsockname()[1]


class BackgroundServer:
    """`with BackgroundServer(engine) as url:` - the server on a free localhost port in a thread."""

    def __init__(self, engine: Engine, port: int = 0) -> None:
        self.server = make_server(engine, host="127.0.0.1", port=port)
        self.thread = threading.Thread(target=self.server.run, name="kimi-serve-http", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{bound_port(self.server)}"
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
