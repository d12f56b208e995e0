"""Component map and LoRA target resolution (list-modules, train, inspect-adapter all call this).

Target specification (comma-separated terms, union of what each selects):
  all                      every linear layer except Whisper and the two output heads
  backbone|text|mimo|adaptor|heads
                           a component (Kimi-Audio): shared layers 0..N, text-only layers,
                           mimo audio layers, the vq_adaptor, lm_head + mimo_output
  q_proj  self_attn.q_proj dotted-suffix names (`layers.0` never matches `vq_adaptor.layers.0`
                           unless written `vq_adaptor.layers.0`)
  model.layers.{0-13}.self_attn.q_proj
                           patterns as list-modules prints them; `{a-b}` / `{a,b}` layer sets
  *.mlp.*  mimo_layers.*.self_attn.?_proj
                           globs over the full name (or a dotted suffix of it)
  re:REGEX                 a regular expression matching the whole name
  TERM:a-b                 restrict TERM to layer indices a..b of its stack (e.g. q_proj:0-13, mimo:0-2)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kimi_lora_cli.errors import TargetError

COMPONENTS = ("backbone", "text", "mimo", "adaptor", "layers", "other", "heads", "whisper")
COMPONENT_ALIASES = {"text_layers": "text", "audio": "mimo", "mimo_layers": "mimo", "vq_adaptor": "adaptor",
                     "shared": "backbone", "head": "heads"}
EXCLUDED_FROM_ALL = {
    "whisper": "Whisper: always frozen",
    "heads": "output head: name it to target it",
}
_LAYER_RE = re.compile(r"(?:^|\.)(layers|mimo_layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class ModuleEntry:
    name: str
    in_features: int
    out_features: int
    params: int
    component: str
    layer: int | None = None
    targeted: bool = False
    excluded_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModuleGroup:
    pattern: str
    component: str
    in_features: int
    out_features: int
    count: int
    params: int
    targeted: int
    excluded_reason: str | None
    layers: list[int] = field(default_factory=list)


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def kimi_component(name: str, mimo_from: int) -> str:
    if name.startswith("whisper."):
        return "whisper"
    if name.startswith("model.mimo_layers."):
        return "mimo"
    if name.startswith("model.vq_adaptor."):
        return "adaptor"
    if name in ("lm_head", "mimo_output"):
        return "heads"
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return "backbone" if int(m.group(1)) <= mimo_from else "text"
    return "other"


def generic_component(name: str, output_names: set[str]) -> str:
    if name in output_names:
        return "heads"
    return "layers" if layer_index(name) is not None else "other"


def linear_entries(model: Any, config: Any = None, whisper_config: Any = None) -> list[ModuleEntry]:
    """Every nn.Linear of `model` (meta or real) as a ModuleEntry, plus Whisper rows for Kimi-Audio."""
    from torch import nn

    from kimi_lora_cli.models.kimi_audio.modeling import KimiAudioForCausalLM

    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    is_kimi = isinstance(base, KimiAudioForCausalLM)
    output_names = set()
    if not is_kimi:
        out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        output_names = {n for n, m in base.named_modules() if out is not None and m is out}
    entries = []
    for name, module in base.named_modules():
        # peft wraps a Linear in a LoraLayer whose `base_layer` is the original.
        if not isinstance(module, nn.Linear) or ".lora_" in name or name.endswith(".base_layer"):
            continue
        comp = (kimi_component(name, base.config.kimia_mimo_transformer_from_layer_index) if is_kimi
                else generic_component(name, output_names))
        entries.append(ModuleEntry(
            name=name, in_features=module.in_features, out_features=module.out_features,
            params=module.weight.numel() + (module.bias.numel() if module.bias is not None else 0),
            component=comp, layer=layer_index(name),
            excluded_reason=EXCLUDED_FROM_ALL.get(comp),
        ))
    if is_kimi and whisper_config is not None:
        entries.extend(whisper_entries(whisper_config))
    return entries


def whisper_entries(wcfg: Any) -> list[ModuleEntry]:
    """Whisper encoder linear layers described from its config (no transformers model import)."""
    d, ffn = wcfg.d_model, wcfg.encoder_ffn_dim
    rows = []
    for i in range(wcfg.encoder_layers):
        for proj, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True), ("out_proj", True)):
            rows.append((f"whisper.layers.{i}.self_attn.{proj}", d, d, bias))
        rows.append((f"whisper.layers.{i}.fc1", d, ffn, True))
        rows.append((f"whisper.layers.{i}.fc2", ffn, d, True))
    return [ModuleEntry(name=n, in_features=i, out_features=o, params=i * o + (o if b else 0),
                        component="whisper", layer=layer_index(n), excluded_reason=EXCLUDED_FROM_ALL["whisper"])
            for n, i, o, b in rows]


# -------------------------------------------------------------------------------------------
# Resolution
# -------------------------------------------------------------------------------------------


def _range_set(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise TargetError(f"bad layer range {text!r}: use a-b, a or a,b,c (e.g. 0-13)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise TargetError(f"bad layer range {text!r}: {lo} > {hi}")
        out.update(range(lo, hi + 1))
    return out


def _term_regex(term: str) -> re.Pattern[str]:
    """Plain / glob / brace-range term -> regex over a full name or one of its dotted suffixes."""
    out, i = [], 0
    while i < len(term):
        c = term[i]
        if c == "{":
            j = term.find("}", i)
            if j < 0:
                raise TargetError(f"unclosed '{{' in target {term!r}")
            nums = sorted(_range_set(term[i + 1 : j]))
            out.append("(?:" + "|".join(str(n) for n in nums) + ")")
            i = j + 1
            continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile(r"(?:.*\.)?" + "".join(out))


def _split_terms(spec: str) -> list[str]:
    """Split on commas, except inside {...} and inside a `:a-b,c` layer list (comma + digit)."""
    terms, depth, cur = [], 0, ""
    for i, c in enumerate(spec):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        in_range = re.search(r":[\d,\-]*\d$", cur) and spec[i + 1 : i + 2].isdigit()
        if c == "," and depth == 0 and not in_range:
            terms.append(cur)
            cur = ""
        else:
            cur += c
    terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


def _match_term(term: str, entries: list[ModuleEntry]) -> list[ModuleEntry]:
    layers = None
    if ":" in term and not term.startswith("re:"):
        term, _, ranges = term.rpartition(":")
        layers = _range_set(ranges)
    key = COMPONENT_ALIASES.get(term, term)
    if key == "all":
        hits = [e for e in entries if e.component not in EXCLUDED_FROM_ALL]
    elif key in COMPONENTS:
        hits = [e for e in entries if e.component == key]
    elif term.startswith("re:"):
        try:
            rx = re.compile(term[3:])
        except re.error as err:
            raise TargetError(f"bad regular expression in target {term!r}: {err}") from None
        hits = [e for e in entries if rx.fullmatch(e.name)]
    else:
        rx = _term_regex(term)
        hits = [e for e in entries if rx.fullmatch(e.name)]
    if layers is not None:
        hits = [e for e in hits if e.layer in layers]
    return hits


def suggestions(term: str, entries: Iterable[ModuleEntry], n: int = 5) -> list[str]:
    entries = list(entries)
    vocab = {e.name.rsplit(".", 1)[-1] for e in entries}
    vocab |= {".".join(e.name.split(".")[-2:]) for e in entries}
    vocab |= {e.component for e in entries} | {"all"}
    bare = term.split(":")[0].removeprefix("re:")
    return difflib.get_close_matches(bare, sorted(vocab), n=n, cutoff=0.5)


@dataclass
class TargetSelection:
    spec: str
    names: list[str]
    per_term: dict[str, int]
    whisper_requested: bool = False


def resolve_targets(entries: list[ModuleEntry], spec: str) -> TargetSelection:
    """Mark `entries[i].targeted` and return the selected module names (sorted, Whisper never).

    Raises TargetError naming the closest module names when a term selects nothing."""
    terms = _split_terms(spec or "")
    if not terms:
        raise TargetError("empty --target; use 'all', component names or module names (see list-modules)")
    selected: dict[str, ModuleEntry] = {}
    per_term: dict[str, int] = {}
    whisper_requested = False
    for term in terms:
        hits = _match_term(term, entries)
        if not hits:
            close = suggestions(term, entries)
            hint = f"; closest names: {', '.join(close)}" if close else ""
            raise TargetError(
                f"target {term!r} matches no linear layer{hint}; run `kimi-lora list-modules MODEL` to see them"
            )
        usable = [e for e in hits if e.component != "whisper"]
        whisper_requested |= len(usable) < len(hits)
        if not usable:
            raise TargetError(f"target {term!r} selects only Whisper encoder layers; Whisper is frozen, never wrapped")
        per_term[term] = len(usable)
        for e in usable:
            selected[e.name] = e
    for e in entries:
        e.targeted = e.name in selected
    return TargetSelection(spec=spec, names=sorted(selected), per_term=per_term, whisper_requested=whisper_requested)


# -------------------------------------------------------------------------------------------
# Grouping for display (list-modules, inspect-adapter)
# -------------------------------------------------------------------------------------------


def _compress(nums: list[int]) -> str:
    nums = sorted(set(nums))
    if len(nums) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{{{nums[0]}-{nums[-1]}}}"
    return "{" + ",".join(str(n) for n in nums) + "}"


def group_entries(entries: list[ModuleEntry]) -> list[ModuleGroup]:
    """Collapse layer indices: `model.layers.{0-21}.self_attn.q_proj` x22, per component."""
    groups: dict[tuple, ModuleGroup] = {}
    for e in entries:
        m = _LAYER_RE.search(e.name)
        shape = m.group(0) if m else None
        key_name = e.name if m is None else e.name[: m.start(2)] + "#" + e.name[m.end(2):]
        key = (key_name, e.component, e.in_features, e.out_features, e.targeted)
        g = groups.get(key)
        if g is None:
            g = groups[key] = ModuleGroup(pattern=key_name, component=e.component, in_features=e.in_features,
                                          out_features=e.out_features, count=0, params=0, targeted=0,
                                          excluded_reason=e.excluded_reason)
        g.count += 1
        g.params += e.params
        g.targeted += int(e.targeted)
        if shape is not None:
            g.layers.append(e.layer)
    for g in groups.values():
        if g.layers:
            g.pattern = g.pattern.replace("#", _compress(g.layers))
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return sorted(groups.values(), key=lambda g: (order.get(g.component, 99), min(g.layers or [0]), g.pattern))


def lora_params(entries: Iterable[ModuleEntry], rank: int) -> int:
    return sum(rank * (e.in_features + e.out_features) for e in entries if e.targeted)


# -------------------------------------------------------------------------------------------
# The list-modules report (config only: the model is built on the meta device)
# -------------------------------------------------------------------------------------------


@dataclass
class ModuleReport:
    model_path: str
    kind: str
    entries: list[ModuleEntry]
    selection: TargetSelection
    rank: int
    base_params: int
    whisper_params: int

    @property
    def lora_params(self) -> int:
        return lora_params(self.entries, self.rank)

    @property
    def trainable_percent(self) -> float:
        total = self.base_params + self.lora_params
        return 100.0 * self.lora_params / total if total else 0.0


def whisper_shape(folder) -> Any:
    """d_model / encoder_layers / encoder_ffn_dim of `whisper-large-v3/config.json` (plain JSON read)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    cfg_file = Path(folder) / "whisper-large-v3" / "config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        return SimpleNamespace(d_model=data.get("d_model", 1280), encoder_layers=data.get("encoder_layers", 32),
                               encoder_ffn_dim=data.get("encoder_ffn_dim", 5120))
    return SimpleNamespace(d_model=1280, encoder_layers=32, encoder_ffn_dim=5120)  # large-v3


def module_report(path, target: str = "all", rank: int = 8, allow_pickle: bool = False) -> ModuleReport:
    from kimi_lora_cli.loading import load_model

    if rank < 1:
        raise TargetError(f"--rank must be at least 1 (got {rank})")
    loaded = load_model(path, weights=False, load_tokenizer_=False, allow_pickle=allow_pickle)
    wshape = whisper_shape(loaded.info.path) if loaded.info.is_kimi else None
    entries = linear_entries(loaded.model, whisper_config=wshape)
    selection = resolve_targets(entries, target)
    whisper_params = sum(e.params for e in entries if e.component == "whisper")
    return ModuleReport(model_path=str(loaded.info.path), kind=loaded.info.kind, entries=entries,
                        selection=selection, rank=rank, base_params=loaded.info.num_parameters,
                        whisper_params=whisper_params)
