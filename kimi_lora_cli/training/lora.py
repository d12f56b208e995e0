"""peft wrapping (LoRA / DoRA / rsLoRA) with targets from `targets.resolve_targets`, and the
trainable-parameter report per component."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.targets import TargetSelection, kimi_component, linear_entries, resolve_targets
from kimi_lora_cli.training.config import TrainConfig

_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
EMBEDDING_NAMES = ("embed_tokens",)


def lora_config(cfg: TrainConfig, selection: TargetSelection):
    from peft import LoraConfig

    modules_to_save = list(cfg.modules_to_save)
    if cfg.train_embeddings:
        modules_to_save += [n for n in EMBEDDING_NAMES if n not in modules_to_save]
    clash = sorted(set(modules_to_save) & {n.rsplit(".", 1)[-1] for n in selection.names})
    if clash:
        raise ConfigError(f"{', '.join(clash)} cannot be both a LoRA target and fully trained (--modules-to-save)")
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(selection.names),
        bias=cfg.lora_bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=modules_to_save or None,
    )


def check_modules_to_save(model: Any, names: tuple[str, ...] | list[str]) -> None:
    """Every --modules-to-save entry names a module of `model` (peft matches the full name or its
    dotted tail); checked on the meta skeleton, before any weight is read."""
    modules = [n for n, _ in model.named_modules() if n]
    for want in names:
        if not any(n == want or n.endswith("." + want) for n in modules):
            tails = sorted({n.rsplit(".", 1)[-1] for n in modules if "." not in n or n.count(".") <= 1})
            raise ConfigError(f"--modules-to-save {want!r} matches no module of the model; use a module name "
                              f"such as {', '.join(t for t in tails if not t.isdigit())[:200]} "
                              "(`kimi-lora list-modules` lists them)")


def check_quantized_training(model: Any, cfg: TrainConfig, world: int) -> None:
    """With --quantization, what bitsandbytes cannot train is refused on the meta skeleton, before
    any weight is read: modules trained in full that hold quantized decoder layers (DeepSpeed is
    refused with the other option combinations in TrainConfig.validate)."""
    if not cfg.quantization:
        return
    from kimi_lora_cli.quantization import import_bitsandbytes, is_decoder_linear

    q = cfg.quantization
    import_bitsandbytes()  # not installed: one line naming the extra to install
    linears = [n for n, m in model.named_modules() if is_decoder_linear(n) and type(m).__name__ == "Linear"]
    for want in cfg.modules_to_save:
        held = [n for n in linears if n == want or n.endswith("." + want) or f".{want}." in f".{n}"]
        if held:
            raise ConfigError(f"--modules-to-save {want} would train {held[0]} in full, but --quantization {q} stores "
                              "it in 4/8 bits; target it with LoRA instead (--lora-target) or drop --quantization")


def prepare_quantized(model: Any, gradient_checkpointing: bool) -> None:
    """What peft's k-bit preparation does, for the Kimi model (on the meta device, before the fill):
    RMSNorms in float32 (their statistics are taken in float32 anyway; Whisper, adaptor, embeddings
    and heads keep the training dtype), and with gradient checkpointing the embedding output
    requires grad, so recomputed layers see an input that carries gradients."""
    import torch

    from kimi_lora_cli.models.kimi_audio.modeling import KimiRMSNorm

    for module in model.modules():
        if isinstance(module, KimiRMSNorm):
            module.to(torch.float32)
    if gradient_checkpointing:
        def make_inputs_require_grad(_module: Any, _inputs: Any, output: Any) -> None:
            output.requires_grad_(True)

        model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)


def wrap_lora(model: Any, cfg: TrainConfig, base_path: str | None = None) -> tuple[Any, TargetSelection]:
    """Freeze the base model and add adapters on the modules `cfg.lora_target` selects."""
    from kimi_lora_cli.quantization import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports it to pick its layer kinds: without its Hub-kernel warning
    from peft import get_peft_model

    entries = linear_entries(model)
    selection = resolve_targets(entries, cfg.lora_target)
    model.requires_grad_(False)
    if base_path:
        model.name_or_path = base_path  # peft records it as base_model_name_or_path
    peft_model = get_peft_model(model, lora_config(cfg, selection))
    return peft_model, selection


def init_adapter_weights(model: Any, seed: int, within: Any = None) -> set[int]:
    """Give every LoRA layer its starting weights, the same for any number of processes and any
    sharding (the model may be built on the meta device and FSDP-sharded): lora_A ~ U(-b, b) with
    b = 1/sqrt(in_features) (peft's default, kaiming-uniform with a = sqrt(5)) drawn from a generator
    seeded by `seed` and the module's name, lora_B = 0, and DoRA's magnitude = the row norms of the
    base weight (what peft computes while B is 0). `within`: only these LoRA layers (modules of
    `model`; their values do not change: they depend on the layer's name in `model`). Returns the ids
    of the parameters it set."""
    import math
    import zlib

    import torch
    from peft.tuners.lora import LoraLayer

    from kimi_lora_cli.quantization import dequantized_weight, is_quantized_weight
    from kimi_lora_cli.sharded import copy_full_, local, local_rows

    done: set[int] = set()
    inside = {id(m) for m in within} if within is not None else None
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or (inside is not None and id(module) not in inside):
            continue
        for adapter, a_layer in module.lora_A.items():
            a, b = a_layer.weight, module.lora_B[adapter].weight
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}:{adapter}".encode())) % 2**63)
            bound = 1.0 / math.sqrt(a.shape[1])
            copy_full_(a, torch.empty(tuple(a.shape), dtype=torch.float32).uniform_(-bound, bound, generator=g))
            with torch.no_grad():
                local(b).zero_()
                if module.lora_B[adapter].bias is not None:
                    local(module.lora_B[adapter].bias).zero_()
                    done.add(id(module.lora_B[adapter].bias))
            done |= {id(a), id(b)}
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and adapter in magnitudes:
                m = magnitudes[adapter].weight
                base = module.get_base_layer()
                w = base.weight
                if is_quantized_weight(w):  # the weight the layer computes with
                    w = dequantized_weight(base)
                elif local_rows(m) != local_rows(w):
                    raise RuntimeError(f"{name}: DoRA magnitude and base weight are sharded differently")
                with torch.no_grad():
                    local(m).copy_(torch.linalg.norm(local(w), dim=1).to(local(m).dtype))
                done.add(id(m))
    return done


def base_name(param_name: str) -> str:
    """Module path of a parameter in the unwrapped model (peft prefixes and adapter parts removed)."""
    out, skip = [], False
    for part in _PEFT_PREFIX.sub("", param_name).split("."):
        if skip:  # the adapter name after lora_A / modules_to_save
            skip = False
        elif part.startswith("lora_") or part == "modules_to_save":
            skip = True
        elif part not in ("base_layer", "original_module"):
            out.append(part)
    return ".".join(out[:-1])


def component_of(param_name: str, mimo_from: int) -> str:
    module = base_name(param_name)
    if module.split(".")[-1] in EMBEDDING_NAMES:
        return "embeddings"
    comp = kimi_component(module, mimo_from)
    return "norms" if comp == "other" and module.endswith("norm") else comp


@dataclass
class ParamRow:
    component: str
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def parameter_rows(model: Any, mimo_from: int, whisper_params: int = 0) -> list[ParamRow]:
    """Trainable / total parameters per component (adapter weights counted with their module's)."""
    from kimi_lora_cli.quantization import logical_numel

    rows: dict[str, ParamRow] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else logical_numel(p)
        comp = component_of(name, mimo_from)
        row = rows.setdefault(comp, ParamRow(comp, 0, 0))
        row.total += n
        if p.requires_grad:
            row.trainable += n
    order = ["embeddings", "adaptor", "backbone", "text", "mimo", "norms", "heads", "other"]
    out = sorted(rows.values(), key=lambda r: order.index(r.component) if r.component in order else 99)
    if whisper_params:
        out.append(ParamRow("whisper (frozen)", 0, whisper_params))
    return out
