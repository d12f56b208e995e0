"""`merge --verify`: the same probe through base + adapters (peft, unmerged) and the merged folder."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import AdapterError, ConfigError

# Allowed max |logit difference|, relative to max(1, largest |reference logit|). Unmerged LoRA rounds
# x@A@B separately from x@W, so 16-bit models differ by a few units in their last place per layer.
RELATIVE_TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class VerifyResult:
    dtype: str
    diffs: dict[str, float]  # head -> max |merged - reference|
    tolerances: dict[str, float]  # head -> allowed max difference

    @property
    def ok(self) -> bool:
        return all(self.diffs[h] <= self.tolerances[h] for h in self.diffs)


def probe_inputs(loaded: Any, seed: int = 0, length: int = 16) -> dict[str, Any]:
    """A fixed random probe: both token streams plus a Whisper-feature span for Kimi-Audio."""
    import torch

    g = torch.Generator().manual_seed(seed)
    device = next(loaded.model.parameters()).device
    if loaded.info.is_kimi:
        cfg = loaded.config
        vocab, dim = cfg.vocab_size, cfg.kimia_adaptor_input_dim
        cont = torch.zeros(1, length, dtype=torch.bool)
        cont[0, length // 4 : length // 2] = True
        return {
            "input_ids": torch.randint(0, vocab, (1, length), generator=g).to(device),
            "text_input_ids": torch.randint(0, vocab, (1, length), generator=g).to(device),
            "is_continuous_mask": cont.to(device),
            "continuous_features": torch.randn(1, length, dim, generator=g).to(device),
        }
    vocab = getattr(loaded.config, "vocab_size", None) or loaded.model.get_input_embeddings().num_embeddings
    return {"input_ids": torch.randint(0, vocab, (1, length), generator=g).to(device)}


def _logits(loaded: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = loaded.model.eval()
    with torch.no_grad():
        out = model(**inputs)
    if loaded.info.is_kimi:
        return {"text_logits": out.text_logits.float().cpu(), "audio_logits": out.audio_logits.float().cpu()}
    return {"logits": out.logits.float().cpu()}


def _weight_adapters(model: Any, names: list[str], weights: list[float]) -> None:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= w
    model.base_model.set_adapter(names)


def verify_merged(base: str | Path, adapters: list[Path], weights: list[float], merged: str | Path, *,
                  dtype: str = "auto", device: str = "cpu", allow_pickle: bool = False) -> VerifyResult:
    """Max logit difference per head between base+adapters (peft) and the merged folder.

    The two models are loaded one after the other, so peak memory is one model, not two."""
    import torch

    from kimi_lora_cli.adapters.reading import read_adapter
    from kimi_lora_cli.loading import load_model

    for path, w in zip(adapters, weights):
        a = read_adapter(path, allow_pickle=allow_pickle)
        if w != 1.0 and (a.replacements or a.token_adapters):
            raise ConfigError(f"--verify: {path} saves whole tensors (modules_to_save / trainable tokens), "
                              "which peft cannot weight; verify without --weights")
    names = [f"adapter{i}" for i in range(len(adapters))]
    ref = load_model(base, dtype=dtype, device=device, adapters=list(zip(names, adapters)), load_whisper=False,
                     load_tokenizer_=False, allow_pickle=allow_pickle)
    try:
        if len(adapters) > 1 or any(w != 1.0 for w in weights):
            _weight_adapters(ref.model, names, weights)
    except (ValueError, RuntimeError) as e:
        raise AdapterError(f"--verify: peft cannot activate these adapters together ({e})") from None
    inputs = probe_inputs(ref)
    expected = _logits(ref, inputs)
    dtype_name = str(next(ref.model.parameters()).dtype).replace("torch.", "")
    del ref
    gc.collect()
    merged_model = load_model(merged, dtype=dtype, device=device, load_whisper=False, load_tokenizer_=False)
    got = _logits(merged_model, inputs)
    del merged_model
    gc.collect()
    rel = RELATIVE_TOLERANCE.get(dtype_name, 5e-2)
    diffs, tols = {}, {}
    for head, ref_logits in expected.items():
        diff = (got[head] - ref_logits).abs().max()
        diffs[head] = float(diff) if torch.isfinite(diff) else float("inf")
        tols[head] = rel * max(1.0, float(ref_logits.abs().max()))
    return VerifyResult(dtype=dtype_name, diffs=diffs, tolerances=tols)
