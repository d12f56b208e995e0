"""`AdapterSummary`: what inspect-adapter reports (config, header, grouping, base check, update norms)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.adapters.compat import check_against_base, read_base
from kimi_lora_cli.adapters.reading import Adapter, component_of, looks_like_kimi, read_adapter
from kimi_lora_cli.safetensors_io import all_finite
from kimi_lora_cli.targets import ModuleEntry, group_entries, layer_index


@dataclass
class Issue:
    level: str  # "error" | "warning"
    message: str


@dataclass
class ModuleStat:
    name: str
    norm: float  # ||scaling * B @ A||_F
    flags: list[str] = field(default_factory=list)  # "nan/inf", "zero", "empty"


@dataclass
class GroupRow:
    pattern: str
    component: str
    count: int
    in_features: int
    out_features: int
    ranks: list[int]
    params: int


@dataclass
class AdapterSummary:
    adapter: Adapter
    kind: str  # "kimi-audio" | "causal-lm"
    mimo_from: int | None
    groups: list[GroupRow]
    issues: list[Issue]
    base_path: str | None = None
    base_problems: list[str] | None = None
    stats: list[ModuleStat] | None = None

    @property
    def ok(self) -> bool:
        return not any(i.level == "error" for i in self.issues)

    @property
    def scaling_rule(self) -> str:
        return "alpha/sqrt(r) (rsLoRA)" if self.adapter.use_rslora else "alpha/r"

    @property
    def scaling(self) -> float:
        a = self.adapter
        return a.scaling_for(a.r, a.alpha) if a.r else 0.0

    @property
    def scalings(self) -> list[float]:
        return sorted({round(m.scaling, 6) for m in self.adapter.modules.values()})

    def to_json(self) -> dict[str, Any]:
        a = self.adapter
        cfg = a.config
        return {
            "adapter": str(a.path),
            "peft_type": a.peft_type,
            "peft_version": a.peft_version,
            "kind": self.kind,
            "r": a.r,
            "lora_alpha": a.alpha,
            "lora_dropout": cfg.get("lora_dropout"),
            "use_rslora": a.use_rslora,
            "scaling": self.scaling,
            "scaling_rule": self.scaling_rule,
            "scalings_in_use": self.scalings,
            "rank_pattern": a.rank_pattern,
            "alpha_pattern": a.alpha_pattern,
            "use_dora": a.use_dora,
            "lora_bias": bool(cfg.get("lora_bias")),
            "bias": cfg.get("bias", "none"),
            "fan_in_fan_out": a.fan_in_fan_out,
            "modules_to_save": a.modules_to_save,
            "trainable_token_indices": cfg.get("trainable_token_indices"),
            "base_model_recorded": a.base_model,
            "format": a.format,
            "dtypes": a.dtypes,
            "tensor_count": len(a.tensors),
            "parameter_count": a.num_parameters,
            "size_on_disk": a.size_on_disk(),
            "modules": [
                {"name": m.name, "kind": m.kind, "component": component_of(m.name, self.mimo_from, self.kind == "kimi-audio"),
                 "r": m.r, "alpha": m.alpha, "scaling": m.scaling, "in_features": m.in_features,
                 "out_features": m.out_features, "params": m.params, "dora": m.magnitude_key is not None,
                 "lora_bias": m.bias_key is not None}
                for m in a.modules.values()
            ],
            "groups": [asdict(g) for g in self.groups],
            "replaced_tensors": sorted(a.replacements),
            "trainable_tokens": {t.name: len(t.indices) for t in a.token_adapters.values()},
            "not_mergeable": a.unmergeable(),
            "base": None if self.base_path is None else {
                "path": self.base_path, "compatible": not self.base_problems, "problems": self.base_problems,
            },
            "stats": None if self.stats is None else [asdict(s) for s in self.stats],
            "issues": [asdict(i) for i in self.issues],
            "ok": self.ok,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def _recorded_base_config(adapter: Adapter) -> dict[str, Any] | None:
    """config.json of the base the adapter names, when that is a local folder (a hint only)."""
    if not adapter.base_model:
        return None
    cfg = Path(str(adapter.base_model)).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _groups(adapter: Adapter, kimi: bool, mimo_from: int | None) -> list[GroupRow]:
    entries = [
        ModuleEntry(name=m.name, in_features=m.in_features, out_features=m.out_features, params=m.params,
                    component=component_of(m.name, mimo_from, kimi), layer=layer_index(m.name), targeted=True)
        for m in adapter.modules.values()
    ]
    rows = []
    for g in group_entries(entries):
        members = [re.sub(r"\{[^}]*\}", str(i), g.pattern, count=1) for i in g.layers] if g.layers else [g.pattern]
        ranks = sorted({adapter.modules[n].r for n in members if n in adapter.modules})
        rows.append(GroupRow(pattern=g.pattern, component=g.component, count=g.count, in_features=g.in_features,
                             out_features=g.out_features, ranks=ranks, params=g.params))
    return rows


def update_norms(adapter: Adapter) -> list[ModuleStat]:
    """||scaling * B @ A||_F per module, via r x r Gram matrices (never the full out x in product);
    tensors are read one module at a time, so memory stays at one module's A and B."""
    import torch

    stats = []
    for m in adapter.modules.values():
        a, b = adapter.tensor(m.a_key), adapter.tensor(m.b_key)
        flags = []
        if a.numel() == 0 or b.numel() == 0:
            stats.append(ModuleStat(m.name, 0.0, ["empty"]))
            continue
        # ||B A||_F^2 = trace(A^T B^T B A) = sum((A A^T) * (B^T B)) for the symmetric r x r Grams:
        # r^2 (in + out) work instead of r * in * out. Grams in float32, their product in float64.
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        gram_a, gram_b = (a32 @ a32.T).double(), (b32.T @ b32).double()
        extra = [adapter.tensor(k) for k in (m.bias_key, m.magnitude_key) if k]
        # A NaN/Inf anywhere in A or B reaches its Gram's diagonal; the exact check runs only then.
        suspect = not (bool(torch.isfinite(gram_a).all()) and bool(torch.isfinite(gram_b).all()))
        if (suspect and not (all_finite(a) and all_finite(b))) or not all(all_finite(t) for t in extra):
            stats.append(ModuleStat(m.name, math.nan, ["nan/inf"]))
            continue
        sq = float((gram_a * gram_b).sum())
        norm = abs(m.scaling) * math.sqrt(max(sq, 0.0))
        if norm == 0.0:
            flags.append("zero")
        stats.append(ModuleStat(m.name, norm, flags))
    for key in [*adapter.replacements.values(), *(t.key for t in adapter.token_adapters.values())]:
        t = adapter.tensor(key)
        if not all_finite(t):
            stats.append(ModuleStat(key, math.nan, ["nan/inf"]))
    stats.sort(key=lambda s: (-(s.norm if not math.isnan(s.norm) else math.inf), s.name))
    return stats


def summarize_adapter(path: str | Path, *, base: str | Path | None = None, stats: bool = False,
                      allow_pickle: bool = False) -> AdapterSummary:
    adapter = read_adapter(path, allow_pickle=allow_pickle)
    issues = [Issue("error", p) for p in adapter.problems]
    base_ckpt = read_base(base) if base is not None else None
    if base_ckpt is not None:
        kimi, mimo_from = base_ckpt.is_kimi, base_ckpt.mimo_from
    else:
        hint = _recorded_base_config(adapter)
        from kimi_lora_cli.models.kimi_audio.configuration import is_kimi_config

        kimi = looks_like_kimi(adapter) or bool(hint and is_kimi_config(hint))
        mimo_from = hint.get("kimia_mimo_transformer_from_layer_index") if hint and kimi else None
    summary = AdapterSummary(adapter=adapter, kind="kimi-audio" if kimi else "causal-lm", mimo_from=mimo_from,
                             groups=_groups(adapter, kimi, mimo_from), issues=issues)
    if base_ckpt is not None:
        summary.base_path = str(base_ckpt.path)
        summary.base_problems = check_against_base(adapter, base_ckpt)
        if summary.base_problems:
            issues.append(Issue("error", f"does not fit {base_ckpt.path}: {len(summary.base_problems)} "
                                         f"mismatch{'es' if len(summary.base_problems) != 1 else ''}"))
    if stats:
        summary.stats = update_norms(adapter)
        bad = [s.name for s in summary.stats if "nan/inf" in s.flags]
        zero = [s.name for s in summary.stats if "zero" in s.flags]
        if bad:
            issues.append(Issue("error", f"{len(bad)} tensors hold NaN/Inf (e.g. {bad[0]}): training diverged; "
                                         "use an earlier checkpoint or a lower learning rate"))
        lora_stats = [s for s in summary.stats if s.name in adapter.modules]
        if lora_stats and len(zero) == len(lora_stats):
            issues.append(Issue("error", "every LoRA update is zero (lora_B all zeros): the adapter was never "
                                         "trained or its weights were lost when saving"))
        elif zero:
            text = f"{len(zero)} modules have a zero update (e.g. {zero[0]})"
            if summary.kind == "kimi-audio" and all(_in_mimo(n) for n in zero):
                text += ("; all are mimo (audio output) layers, which get no loss from training data without "
                         "spoken answers (ASR and other task_type \"understanding\" lines): expected there, and "
                         "--lora-target backbone,text,adaptor leaves them out")
            issues.append(Issue("warning", text))
    for desc in adapter.unmergeable():
        issues.append(Issue("warning", f"uses {desc}: `kimi-lora merge` cannot merge it"))
    return summary


def _in_mimo(name: str) -> bool:
    """A module of the mimo (audio output) branch: its layers or its head."""
    return ".mimo_layers." in f".{name}" or name.rsplit(".", 1)[-1] == "mimo_output"
