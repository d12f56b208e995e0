"""Streaming LoRA merge: base shards read tensor by tensor, only adapted tensors recomputed.

For each adapted module X with adapters i (weights w_i), in float32:
    X.weight += sum_i w_i * scaling_i * B_i @ A_i      (transposed for fan_in_fan_out / embeddings)
    X.bias   += sum_i w_i * scaling_i * lora_B_i.bias  (lora_bias)
DoRA (one adapter, weight 1): X.weight = m / ||W + dW||_row * (W + dW), as peft merges it.
Whole tensors an adapter saved (modules_to_save, trained biases) and trainable-token rows
replace the base values (weighted: W + sum_i w_i * (R_i - W)). Every other tensor is copied
byte for byte. Peak memory: the adapters, two adapted tensors (one merging, one being written)
and a 64 MB float32 work block - never a whole shard, whatever the model size.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.adapters.compat import BaseCheckpoint, check_against_base, read_base, summarize_problems
from kimi_lora_cli.adapters.reading import Adapter, LoraModule, read_adapter
from kimi_lora_cli.errors import AdapterError, ConfigError
from kimi_lora_cli.fileops import link_or_copy, naming_errors, remove_tree
from kimi_lora_cli.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    ShardWriter,
    TensorLoc,
    all_finite,
    numel,
    read_tensor,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
# Rows per matmul block: keeps the float32 work buffer small for huge matrices (embeddings, heads).
BLOCK_ELEMENTS = 1 << 24
MIN_BLOCK_ROWS = 64


@dataclass(frozen=True)
class MergeSpec:
    model: Path
    adapters: tuple[Path, ...]
    output: Path
    weights: tuple[float, ...] | None = None
    dtype: str = "auto"
    max_shard_size: int = 5_000_000_000
    overwrite: bool = False
    allow_pickle: bool = False
    verify: bool = False  # compare logits with base + adapters (peft) before the folder is put in place
    device: str = "cpu"  # where --verify runs the two models
    link_files: bool = False  # hard-link the base's other weight files (e.g. Whisper) instead of copying


@dataclass
class MergeResult:
    output: Path
    shards: list[str]
    tensors: int
    changed: list[str]
    total_bytes: int
    linked_files: int
    copied_files: int
    seconds: float
    dtype: str
    verify: Any = None


@dataclass
class _Ops:
    """What the adapters do to one base tensor, in adapter order."""

    lora: list[tuple[float, LoraModule, Adapter]] = field(default_factory=list)
    bias: list[tuple[float, LoraModule, Adapter]] = field(default_factory=list)
    replace: list[tuple[float, str, Adapter]] = field(default_factory=list)
    tokens: list[tuple[float, list[int], str, Adapter]] = field(default_factory=list)


def _resolve_out_dtype(dtype: str) -> str | None:
    """safetensors dtype name for --dtype, or None for auto (each tensor keeps its dtype)."""
    if dtype in (None, "", "auto"):
        return None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(dtype, dtype).replace("torch.", "")
    from kimi_lora_cli.safetensors_io import TORCH_TO_ST

    if name not in TORCH_TO_ST:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return TORCH_TO_ST[name]


def _check_output(spec: MergeSpec, base: BaseCheckpoint) -> Path:
    """The output is no input, and only an absent, empty or merge-written folder is replaced."""
    from kimi_lora_cli.outputs import check_output, replaceable, user_entries

    out = check_output(spec.output, [("base model folder", base.path),
                                     *(("adapter folder", a) for a in spec.adapters)], flag="--output")
    if user_entries(out):
        if not spec.overwrite:
            raise ConfigError(f"--output {spec.output} is not empty; pass --overwrite to replace it (only a "
                              "folder `kimi-lora merge` wrote), or choose another folder")
        replaceable(out, "merge", flag="--output")
    return out


def prepare_merge(spec: MergeSpec) -> tuple[BaseCheckpoint, list[Adapter], list[float], str | None, Path]:
    """Every check that can fail before anything is written."""
    if not spec.adapters:
        raise ConfigError("no --adapter given; pass at least one adapter folder")
    weights = list(spec.weights) if spec.weights else [1.0] * len(spec.adapters)
    if len(weights) != len(spec.adapters):
        raise ConfigError(f"--weights has {len(weights)} values for {len(spec.adapters)} adapters; "
                          "give one weight per --adapter, e.g. --weights 0.7,0.3")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"--weights {','.join(str(w) for w in weights)}: {bad[0]} is not a finite number; give "
                          "one finite weight per --adapter, e.g. --weights 0.7,0.3")
    out_dtype = _resolve_out_dtype(spec.dtype)
    base = read_base(spec.model)
    adapters = [read_adapter(p, allow_pickle=spec.allow_pickle) for p in spec.adapters]
    for a, w in zip(adapters, weights):
        where = a.path / a.weights_file.name
        if a.problems:
            raise AdapterError(f"{where}: {summarize_problems(a.problems)}; run `kimi-lora inspect-adapter "
                               f"{a.path}` for details")
        blocked = a.unmergeable()
        if blocked:
            raise AdapterError(f"{a.path / 'adapter_config.json'}: uses {blocked[0]}, which kimi-lora merge "
                               "cannot merge; use the adapter unmerged (kimi-lora infer --adapter)")
        problems = check_against_base(a, base)
        if problems:
            raise AdapterError(f"{a.path} does not fit {base.path}: {summarize_problems(problems)}; "
                               "merge it into the model it was trained on")
        dora = [m for m in a.modules.values() if m.magnitude_key]
        if dora and (len(adapters) > 1 or w != 1.0):
            raise AdapterError(f"{a.path}: DoRA rescales whole weight rows, so it merges exactly only on its "
                               "own with weight 1; merge DoRA adapters one at a time (output of one as the "
                               "base of the next)")
        if any(m.kind == "embedding" for m in dora):
            raise AdapterError(f"{a.path}: DoRA on an embedding layer is not supported by kimi-lora merge")
    out = _check_output(spec, base)
    return base, adapters, weights, out_dtype, out


def _plan_ops(adapters: list[Adapter], weights: list[float]) -> dict[str, _Ops]:
    ops: dict[str, _Ops] = {}
    for a, w in zip(adapters, weights):
        for m in a.modules.values():
            ops.setdefault(f"{m.name}.weight", _Ops()).lora.append((w, m, a))
            if m.bias_key:
                ops.setdefault(f"{m.name}.bias", _Ops()).bias.append((w, m, a))
        for name, key in a.replacements.items():
            ops.setdefault(name, _Ops()).replace.append((w, key, a))
        for tok in a.token_adapters.values():
            ops.setdefault(f"{tok.name}.weight", _Ops()).tokens.append((w, tok.indices, tok.key, a))
    return ops


def _check_finite(adapters: list[Adapter]) -> None:
    for a in adapters:
        for key, t in a.load().items():
            if not all_finite(t):
                raise AdapterError(f"{a.weights_file}: tensor {key} holds NaN/Inf; the training diverged - "
                                   "use an earlier checkpoint")


def apply_ops(name: str, base: torch.Tensor, ops: _Ops) -> torch.Tensor:
    """The merged float32 value of one base tensor.

    Saved whole tensors and token rows first (they are the trained base values), then LoRA deltas
    and LoRA biases on top, in the order peft's merge_and_unload applies them."""
    import torch

    w32 = base.to(torch.float32)
    if ops.replace or ops.tokens:
        orig = w32.clone()
        exact = len(ops.replace) + len(ops.tokens) == 1
        for w, key, a in ops.replace:
            saved = a.load()[key].to(torch.float32)
            if exact and w == 1.0:
                w32 = saved.clone()
            else:
                w32 += (saved - orig) * w
        for w, indices, key, a in ops.tokens:
            idx = torch.tensor(indices, dtype=torch.long)
            rows = a.load()[key].to(torch.float32)
            if exact and w == 1.0:
                w32.index_copy_(0, idx, rows)
            else:
                w32.index_add_(0, idx, (rows - orig.index_select(0, idx)) * w)
        del orig
    for w, m, a in ops.lora:
        tensors = a.load()
        lora_a = tensors[m.a_key].to(torch.float32)
        lora_b = tensors[m.b_key].to(torch.float32)
        coef = m.scaling * w
        view = w32.T if m.transposed else w32  # [out, in]
        if m.magnitude_key:
            delta = (lora_b @ lora_a) * coef
            combined = view + delta
            norm = torch.linalg.norm(combined, dim=1)
            factor = tensors[m.magnitude_key].to(torch.float32) / norm
            view.copy_(factor.view(-1, 1) * combined)
            continue
        view += (lora_b @ lora_a) * coef
    for w, m, a in ops.bias:
        w32 += a.load()[m.bias_key].to(torch.float32) * (m.scaling * w)
    return w32


def _lora_only(ops: _Ops) -> bool:
    return not (ops.replace or ops.tokens or ops.bias) and not any(m.magnitude_key for _, m, _ in ops.lora)


def merge_tensor(name: str, base: torch.Tensor, ops: _Ops, out_dtype: torch.dtype) -> torch.Tensor:
    """The merged tensor in `out_dtype`; raises AdapterError on a non-finite result.

    The arithmetic is peft's, W + (B @ A) * scaling in float32, so the result is bit-identical to
    merge_and_unload (float32 bases; 16-bit bases with peft's default float32 adapter weights,
    where peft also adds a float32 delta and rounds once). Several adapters on a 16-bit base are
    summed in float32 and rounded once, where peft rounds after each. Plain LoRA updates go a block of rows
    at a time (about 64 MB of float32), so even a merged embedding or head costs little more than
    its own bytes; blocks are balanced and never under MIN_BLOCK_ROWS rows, because BLAS sums a
    very thin slice differently from the whole product."""
    import math

    import torch

    if not _lora_only(ops):
        value = apply_ops(name, base, ops)
        _require_finite(name, value)
        return value.to(out_dtype)
    out = base if base.dtype == out_dtype else torch.empty(base.shape, dtype=out_dtype)
    prepared = []
    for w, m, a in ops.lora:
        tensors = a.load()
        prepared.append((m.transposed, tensors[m.a_key].to(torch.float32), tensors[m.b_key].to(torch.float32),
                         m.scaling * w))
    n_rows, n_cols = base.shape
    cap = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, n_cols))
    rows = math.ceil(n_rows / math.ceil(n_rows / cap))
    product = torch.empty((min(rows, n_rows), n_cols), dtype=torch.float32)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        block = base[r0:r1].to(torch.float32, copy=True)
        prod = product[: r1 - r0]
        for transposed, lora_a, lora_b, coef in prepared:
            # Stored rows are output features, or input features when the weight is stored [in, out].
            if transposed:
                torch.mm(lora_a[:, r0:r1].T, lora_b.T, out=prod)
            else:
                torch.mm(lora_b[r0:r1], lora_a, out=prod)
            block += prod.mul_(coef)
        _require_finite(name, block)
        out[r0:r1] = block
    return out


def _require_finite(name: str, value: torch.Tensor) -> None:
    if not all_finite(value):
        raise AdapterError(f"merging into {name} gives NaN/Inf (the base tensor or the adapter overflows); "
                           "check both with `kimi-lora inspect-adapter --stats`")


def _shard_plan(base: BaseCheckpoint, out_dtype: str | None, max_bytes: int) -> list[list[tuple[TensorLoc, str]]]:
    """Output shards as lists of (source, output dtype), in base file and offset order."""
    rank = {f: i for i, f in enumerate(base.files)}
    ordered = sorted(base.tensors.values(), key=lambda t: (rank.get(t.file, 0), t.offset))
    shards: list[list[tuple[TensorLoc, str]]] = [[]]
    size = 0
    for loc in ordered:
        dtype = out_dtype if out_dtype and loc.dtype in FLOAT_DTYPES else loc.dtype
        nbytes = numel(loc.shape) * DTYPES[dtype][1]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((loc, dtype))
        size += nbytes
    return shards


def _is_weight_file(path: Path, base: BaseCheckpoint) -> bool:
    name = path.name
    if path in base.files or name == INDEX_NAME:
        return True
    return (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
            or (name.startswith("pytorch_model") and (name.endswith(".bin") or name.endswith(".bin.index.json"))))


def _write_config(base: BaseCheckpoint, tmp: Path, out_dtype: str | None, counts: dict[str, int]) -> None:
    src = base.path / "config.json"
    if out_dtype is None:
        link_or_copy(src, tmp / "config.json", counts)  # always a copy: editing it must not touch the base
        return
    cfg = dict(base.config)
    name = DTYPES[out_dtype][0]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = name
    else:
        cfg["torch_dtype"] = name
    with naming_errors(tmp / "config.json"):
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _write_shards(tmp: Path, names: list[str], shards, ops: dict[str, _Ops], say):
    """Stream every tensor into its output shard. Writing runs on a second thread, so the disk
    works on tensor i while tensor i+1 is merged (at most one tensor waits in memory)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    changed: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    pending: Future | None = None
    writer: ShardWriter | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-lora-writer") as pool:

        def submit(fn, *args) -> None:
            nonlocal pending
            if pending is not None:
                pending.result()
            pending = pool.submit(fn, *args)

        try:
            for i, (shard_name, shard) in enumerate(zip(names, shards)):
                writer = ShardWriter(tmp / shard_name, [(loc.name, dt, loc.shape) for loc, dt in shard])
                for loc, dt in shard:
                    op = ops.get(loc.name)
                    if op is None and dt == loc.dtype:
                        submit(writer.copy_bytes, loc.name, loc)
                    else:
                        target = torch_dtype(dt)
                        value = read_tensor(loc)
                        if op is not None:
                            value = merge_tensor(loc.name, value, op, target)
                            changed.append(loc.name)
                        submit(writer.write_tensor, loc.name, value.to(target))
                        del value
                    weight_map[loc.name] = shard_name
                submit(writer.close)
                pending.result()
                total += writer.total
                writer = None
                say(f"wrote {shard_name} ({i + 1}/{len(names)})")
        except BaseException:
            if pending is not None:
                pending.cancel()
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
            if writer is not None:
                writer.abort()
            raise
    return changed, weight_map, total


def merge_adapters(spec: MergeSpec, progress: Callable[[str], None] | None = None) -> MergeResult:
    """Write base + adapters as a complete model folder at spec.output (see module docstring)."""
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    base, adapters, weights, out_dtype, out = prepare_merge(spec)
    _check_finite(adapters)
    ops = _plan_ops(adapters, weights)
    shards = _shard_plan(base, out_dtype, spec.max_shard_size)
    n = len(shards)
    names = [f"model-{i + 1}-of-{n}.safetensors" for i in range(n)]

    from kimi_lora_cli.outputs import FolderLock

    with naming_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock.beside(out, "merge") as lock:
        if lock.note:
            say(lock.note)
        _check_output(spec, base)  # again under the lock: a run that just finished may have written it
        dead = [int(lock.previous["pid"])] if lock.previous else []
        changed, weight_map, total, counts, checked = _write_folder(spec, base, weights, out, names, shards, ops,
                                                                    out_dtype, say, dead)
    say(f"merged {len(changed)} tensors, copied {len(weight_map) - len(changed)} unchanged")
    return MergeResult(output=out, shards=names, tensors=len(weight_map), changed=changed, total_bytes=total,
                       linked_files=counts["linked"], copied_files=counts["copied"] + counts["cloned"],
                       seconds=time.perf_counter() - start,
                       dtype=DTYPES[out_dtype][0] if out_dtype else (base.info.dtype or "auto"), verify=checked)


def _write_folder(spec: MergeSpec, base: BaseCheckpoint, weights: list[float], out: Path, names: list[str],
                  shards, ops: dict[str, _Ops], out_dtype: str | None, say, dead_pids: list[int]):
    """Everything into `.<out>.partial-<pid>`, then renamed to `out` (under the output's lock)."""
    from kimi_lora_cli.outputs import clean_dead_partials, write_marker

    clean_dead_partials(out.parent, out.name, "merge", say, dead_pids)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        remove_tree(tmp)
    with naming_errors(tmp):
        tmp.mkdir()
    counts = {"linked": 0, "copied": 0, "cloned": 0}
    try:
        # The marker first: a killed run's folder is then recognisable as ours and removed by the next.
        write_marker(tmp, "merge", base=str(base.path), adapters=[str(a) for a in spec.adapters])
        changed, weight_map, total = _write_shards(tmp, names, shards, ops, say)
        missing = sorted(set(ops) - set(changed))
        if missing:  # cannot happen after check_against_base; a guard against silent no-ops
            raise AdapterError(f"adapter tensors {missing[:3]} were not applied")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with naming_errors(tmp / INDEX_NAME):
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_config(base, tmp, out_dtype, counts)
        for entry in sorted(base.path.iterdir()):
            if entry.name.startswith(".") or entry.name == "config.json" or _is_weight_file(entry, base):
                continue
            link_or_copy(entry, tmp / entry.name, counts, say, link_weights=spec.link_files)
        checked = _verify(spec, base, weights, tmp, say) if spec.verify else None
        _swap_into_place(tmp, out)
    except OSError as e:
        remove_tree(tmp)
        if e.errno == errno.EFBIG:
            from kimi_lora_cli.fileops import describe_os_error

            raise ConfigError(f"{describe_os_error(e)}, or pass a smaller --max-shard-size") from e
        raise
    except BaseException:
        remove_tree(tmp)
        raise
    return changed, weight_map, total, counts, checked


def _verify(spec: MergeSpec, base: BaseCheckpoint, weights: list[float], folder: Path, say) -> Any:
    from kimi_lora_cli.adapters.verify import verify_merged

    say("verifying: probe through base + adapters (peft) and through the merged weights")
    result = verify_merged(base.path, list(spec.adapters), weights, folder, dtype=spec.dtype, device=spec.device,
                           allow_pickle=spec.allow_pickle)
    if not result.ok:
        head = max(result.diffs, key=lambda h: result.diffs[h] / result.tolerances[h])
        raise AdapterError(f"--verify: merged {head} differ from base + adapter by {result.diffs[head]:.3g} "
                           f"(tolerance {result.tolerances[head]:.3g} for {result.dtype}); nothing was written "
                           "- please report this with `kimi-lora inspect-adapter --stats` output")
    return result


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` is removed only after that succeeded."""
    with naming_errors(out):
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            remove_tree(old)  # its marker last: a kill here leaves a folder the next run knows as ours
        else:
            tmp.rename(out)
