"""Packed rows: several samples side by side in one row, each attending only to itself.

`sequence_ids` [B, L] names the sample of every position; a row's samples sit in contiguous runs
(a new run starts wherever the id changes, so ids may repeat across rows, and the padding after the
last sample is one more run of its own). From it come positions that restart at 0 with every run
(what each sample would see alone) and a block-diagonal causal attention, computed by one of:

  split  causal SDPA on each sample's slice, one call per sample (the CPU default: a varlen path
         in plain torch, attention costs sum(n_i^2), not L^2 per row)
  sdpa   SDPA with a boolean [B, 1, L, L] block mask (any device; one call, computes masked blocks)
  eager  the same mask, written out (attn_implementation="eager")
  flex   torch.nn.attention.flex_attention with a block mask (compiled on CUDA; skips masked blocks)
  flash  flash-attn's varlen kernel over cu_seqlens (CUDA, fp16/bf16, when flash-attn is installed)

"auto" picks flash, then flex, then sdpa on CUDA, split elsewhere. flex runs on CPU for inference only
(torch has no CPU backward for it), which is how the tests check it against the others.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

BACKENDS = ("auto", "split", "sdpa", "eager", "flex", "flash")
_compiled_flex: Any = None
_flex_failed = False


def runs(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a run (a sample, or the trailing padding) starts."""
    new = torch.ones_like(sequence_ids, dtype=torch.bool)
    new[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return new


def packed_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] positions counted from the start of each run: 0, 1, ... for every sample."""
    idx = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    start = torch.where(runs(sequence_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(requested: str, attn_implementation: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"packed attention {requested!r} is unknown; use one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if attn_implementation == "eager":
        return "eager"
    if device.type == "cuda":
        if flash_available():
            return "flash"
        if flex_available() and not _flex_failed:
            return "flex"
        return "sdpa"
    return "split"


class PackedRows:
    """What every attention layer of one forward pass needs to keep samples apart (built lazily, once)."""

    def __init__(self, sequence_ids: torch.Tensor, backend: str) -> None:
        self.sequence_ids = sequence_ids
        self.backend = backend
        self.auto = False  # set when "auto" chose the backend: a flex failure then falls back to sdpa
        self.run_index = runs(sequence_ids).long().cumsum(dim=1)  # run number within each row, from 1
        self._dense: torch.Tensor | None = None
        self._block: Any = None
        self._cu: tuple[torch.Tensor, int] | None = None
        self._spans: list[list[tuple[int, int]]] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.sequence_ids.shape

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, L, L] bool, True = attend: same run and not in the future."""
        if self._dense is None:
            r = self.run_index
            length = r.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=r.device).tril()
            self._dense = ((r[:, :, None] == r[:, None, :]) & causal)[:, None]
        return self._dense

    def spans(self) -> list[list[tuple[int, int]]]:
        """Per row, the (start, end) of every run, covering the row."""
        if self._spans is None:
            length = self.sequence_ids.shape[1]
            self._spans = []
            for starts in runs(self.sequence_ids).cpu().tolist():
                cuts = [j for j, new in enumerate(starts) if new] + [length]
                self._spans.append(list(zip(cuts[:-1], cuts[1:])))
        return self._spans

    def block_mask(self) -> Any:
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            r = self.run_index

            def same_run_causal(b, h, q, k):
                return (r[b, q] == r[b, k]) & (k <= q)

            bsz, length = r.shape
            self._block = create_block_mask(same_run_causal, B=bsz, H=None, Q_LEN=length, KV_LEN=length,
                                            device=r.device)
        return self._block

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Run boundaries over the rows laid end to end (int32 [runs + 1]) and the longest run."""
        if self._cu is None:
            flat = runs(self.sequence_ids).reshape(-1)
            starts = flat.nonzero().squeeze(1)
            total = torch.tensor([flat.numel()], device=starts.device)
            cu = torch.cat([starts, total]).to(torch.int32)
            self._cu = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._cu


def _flex(device: torch.device):
    """flex_attention, compiled on CUDA (the fused kernel); eager elsewhere (CPU forward only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows, groups: int,
                  eager: Any) -> torch.Tensor:
    """Block-diagonal causal attention of q [B, H, L, D] over k, v [B, Hkv, L, D] -> [B, H, L, D]."""
    global _flex_failed
    backend = rows.backend
    if backend == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_varlen_func

        bsz, heads, length, dim = q.shape
        cu, longest = rows.cu_seqlens()

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(bsz * length, x.shape[1], dim)

        out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, causal=True)
        return out.reshape(bsz, length, heads, dim).transpose(1, 2)
    if backend in ("flash", "flex") and not (rows.auto and _flex_failed):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return _flex(q.device)(q, k, v, block_mask=rows.block_mask(), enable_gqa=groups > 1)
        except Exception as e:  # only an automatic choice falls back
            if not rows.auto:
                raise
            _flex_failed = True
            warnings.warn(f"flex_attention failed ({type(e).__name__}: {e}); packed rows use SDPA with a "
                          "mask instead", stacklevel=2)
    if backend == "split":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return torch.cat([
            torch.cat([sdpa(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], is_causal=True,
                            enable_gqa=groups > 1) for s, e in row], dim=2)
            for b, row in enumerate(rows.spans())
        ])
    if backend == "eager":
        return eager(q, k, v, rows.dense_mask())
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=rows.dense_mask(),
                                                            enable_gqa=groups > 1)
