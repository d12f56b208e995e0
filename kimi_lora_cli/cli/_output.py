"""Consoles (results to stdout, progress and errors to stderr) and the error boundary."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from kimi_lora_cli.formatting import human_bytes, human_count  # noqa: F401 - re-exported for cli/

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)


def debug_enabled() -> bool:
    return os.environ.get("KIMI_LORA_DEBUG", "").lower() not in ("", "0", "false", "no")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `Error: message` on stderr (one line) and return the Exit to raise."""
    err.print(f"[bold red]Error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so clean-up code runs as for Ctrl-C); exit 143."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def guarded(fn: F) -> F:
    """Turn core errors into one-line messages with a non-zero exit (traceback only in debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kimi_lora_cli.errors import KimiLoraError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KimiLoraError as e:
            if debug_enabled():
                raise
            raise fail(_escape(str(e))) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None
        except Terminated:
            err.print("Terminated.")
            raise typer.Exit(143) from None
        except OSError as e:
            if debug_enabled():
                raise
            from kimi_lora_cli.fileops import describe_os_error

            raise fail(_escape(describe_os_error(e))) from None
        except Exception as e:  # noqa: BLE001 - the boundary: no traceback for users
            if debug_enabled():
                raise
            raise fail(
                _escape(f"{type(e).__name__}: {e}".splitlines()[0])
                + " (unexpected; rerun with KIMI_LORA_DEBUG=1 for the traceback and report it)"
            ) from None

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def is_tty() -> bool:
    return sys.stderr.isatty()
