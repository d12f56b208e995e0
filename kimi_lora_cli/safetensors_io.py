"""Safetensors at the byte level: tensor headers of a folder, raw tensor reads, a streaming shard writer.

The merge never holds a whole shard: each output file's header is planned up front (names,
dtypes, shapes are known from the input headers), then tensors are streamed in one by one,
untouched ones as a kernel-side byte copy.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.fileops import naming_errors

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TORCH_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[st_dtype][0])


def st_dtype(dtype: torch.dtype) -> str:
    return TORCH_TO_ST[str(dtype).replace("torch.", "")]


def numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class TensorLoc:
    """Where a tensor lives: file, absolute byte offset, size, dtype, shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def header_locations(path: Path) -> dict[str, TensorLoc]:
    """All tensors of one safetensors file with their absolute byte ranges (header read only)."""
    from kimi_lora_cli.model_files import read_safetensors_header

    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    base = 8 + n
    out = {}
    for name, v in header.items():
        start, end = v["data_offsets"]
        if v["dtype"] not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {v['dtype']}, which kimi-lora cannot handle")
        out[name] = TensorLoc(name, path, base + start, end - start, v["dtype"], tuple(v["shape"]))
    return out


def read_tensor(loc: TensorLoc) -> torch.Tensor:
    """One tensor read with plain file I/O (no mmap, so nothing of the file stays resident)."""
    import torch

    buf = bytearray(loc.nbytes)
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        got = f.readinto(buf)
    if got != loc.nbytes:
        raise ModelLoadError(f"{loc.file}: truncated while reading {loc.name}; re-download the file")
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=torch_dtype(loc.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(loc.dtype)).reshape(loc.shape)


class ShardWriter:
    """Writes one safetensors file whose tensor list is fixed in advance, tensor by tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        self.expected: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in entries:
            size = numel(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self.total = offset
        with naming_errors(path):
            self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
            self.file.write(struct.pack("<Q", len(raw)))
            self.file.write(raw)
        self.position = 0

    def _next(self, name: str, nbytes: int) -> None:
        want, size = self.expected[self.position]
        if want != name or size != nbytes:
            raise RuntimeError(f"shard writer expected {want} ({size} bytes), got {name} ({nbytes} bytes)")
        self.position += 1

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        t = tensor.detach().contiguous().cpu()
        self._next(name, t.numel() * t.element_size())
        if t.numel():
            with naming_errors(self.path):
                self.file.write(t.view(-1).view(torch.uint8).numpy().data)

    def copy_bytes(self, name: str, loc: TensorLoc) -> None:
        """Copy a tensor's bytes straight from its source file (in the kernel where possible)."""
        self._next(name, loc.nbytes)
        with naming_errors(self.path):
            self.file.flush()
            with open(loc.file, "rb") as src:
                copy_range(src.fileno(), self.file.fileno(), loc.offset, loc.nbytes)
            self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        with naming_errors(self.path):
            self.file.close()
        if self.position != len(self.expected):
            raise RuntimeError(f"{self.path}: {len(self.expected) - self.position} tensors were not written")

    def abort(self) -> None:
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass  # the write error that led here is the one to report


def copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int, chunk: int = 64 << 20) -> None:
    remaining, pos = nbytes, offset
    use_kernel = hasattr(os, "copy_file_range")
    while remaining:
        n = 0
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), pos)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO):
                    raise
                use_kernel = False  # not supported here: plain reads and writes
        if not use_kernel:
            data = os.pread(src_fd, min(remaining, chunk), pos)
            n = len(data)
            if n:
                view, written = memoryview(data), 0
                while written < n:
                    written += os.write(dst_fd, view[written:])
        if n == 0:
            raise OSError(f"unexpected end of file while copying {nbytes} bytes at offset {offset}")
        remaining -= n
        pos += n


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes (the Hugging Face convention)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    letter = unit[:1] if unit[:1] in "KMGT" and unit else ""
    base = 1024 if "I" in unit else 1000
    size = int(value * base ** powers[letter])
    if size <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return size


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. A plain sum is ~30x faster than isfinite().all() on CPU and is non-finite
    whenever an element is; only then (or on an overflowing sum) is the exact check run."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
