"""The predictions file of `infer`: one JSON object per (sample, variant) line, appended and flushed
as each batch finishes into `<output>.partial`, renamed to the output when the run ends; read back for
`--resume` (a torn last line from a crash is dropped) and recognised so that no other file is ever
replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import DataError
from kimi_lora_cli.fileops import naming_errors


def partial_of(output: Path) -> Path:
    """Where a run writes its predictions until it finishes (then renamed to the output)."""
    return output.with_name(output.name + ".partial")


def predictions_or_empty(path: Path) -> bool:
    """True for a missing or empty path and for a file whose first line is a prediction record."""
    if not path.is_file() or not path.stat().st_size:
        return not path.exists() or path.is_file()
    with open(path, "rb") as f:
        first = f.readline()
    try:
        rec = json.loads(first)
    except ValueError:
        return False
    return isinstance(rec, dict) and {"id", "adapter", "prediction"} <= set(rec)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records already in a predictions file. A cut-off last line (crash mid-write) is dropped
    from the file; any other bad line is an error."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_end, pos = [], 0, 0
    for k, line in enumerate(lines):
        end = pos + len(line) + (1 if k < len(lines) - 1 else 0)
        if line.strip():
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or "id" not in obj or "adapter" not in obj:
                    raise ValueError("not a prediction record")
            except ValueError:
                if all(not rest.strip() for rest in lines[k + 1 :]):
                    with open(path, "r+b") as f:  # drop the torn tail so new lines append cleanly
                        f.truncate(good_end)
                    break
                raise DataError(f"{path}:{k + 1}: not a prediction line written by `kimi-lora infer`; "
                                "remove the line or write to a new --output file") from None
            records.append(obj)
            good_end = end
        pos = end
    else:
        if raw and not raw.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
    return records


class PredictionWriter:
    """Appends one JSON line per prediction to `<output>.partial`, flushed to disk at once; `finish`
    renames it to the output, so the output is always a whole file of whole lines. With `resume`
    it continues the partial file of an interrupted run, or a copy of the finished output."""

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.partial = partial_of(path) if path is not None else None
        self._f = None
        if path is not None:
            from kimi_lora_cli.fileops import clone_or_copy

            with naming_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
            if resume and not self.partial.exists() and path.is_file():
                clone_or_copy(path, self.partial)
            with naming_errors(self.partial):
                self._f = open(self.partial, "ab" if resume else "wb")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        start = self._f.tell()
        try:
            with naming_errors(self.partial):
                self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                self._f.flush()
                os.fsync(self._f.fileno())
        except OSError:
            try:  # a line that did not fit is cut off, so the file stays whole lines for --resume
                self._f.truncate(start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass

    def finish(self) -> None:
        """Put the finished predictions in place under the output's name."""
        self.close()
        if self.path is not None:
            with naming_errors(self.path):
                os.replace(self.partial, self.path)
