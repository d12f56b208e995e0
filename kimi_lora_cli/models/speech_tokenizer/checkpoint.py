"""Reading a local `glm-4-voice-tokenizer` folder: config.json checked, the safetensors header matched
against the encoder the config builds (tensor names bare or under `model.encoder.`; the decoder and
other unused tensors ignored), then only the encoder's tensors read. `loading.load_speech_tokenizer`
is the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.model_files import read_json_object, read_safetensors_header
from kimi_lora_cli.tensor_files import match_state, open_safetensors

PREFIXES = ("model.encoder.", "encoder.")
FIX = "pass the glm-4-voice-tokenizer folder (config.json + model.safetensors of THUDM/glm-4-voice-tokenizer)"


@dataclass
class SpeechTokenizerFiles:
    folder: Path
    weights: Path
    config: Any  # SpeechTokenizerConfig
    raw: dict[str, Any]
    chosen: dict[str, str]  # encoder parameter name -> key in the file

    def load(self, dtype: Any, device: Any) -> Any:
        from kimi_lora_cli.models.speech_tokenizer.modeling import SpeechTokenizer, build_encoder

        with open_safetensors(self.weights) as f:
            state = {name: f.get_tensor(key) for name, key in self.chosen.items()}
        return SpeechTokenizer(build_encoder(self.config, state, dtype, device), source=str(self.folder))


def read_speech_tokenizer(path: str | Path) -> SpeechTokenizerFiles:
    """The folder's files, checked without reading a tensor."""
    from kimi_lora_cli.models.speech_tokenizer.configuration import SpeechTokenizerConfig
    from kimi_lora_cli.models.speech_tokenizer.modeling import expected_state_shapes

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder; {FIX}")
    cfg_file, wfile = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: not found; {FIX}")
    data = read_json_object(cfg_file)
    try:
        cfg = SpeechTokenizerConfig.from_dict(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{cfg_file}: {e}; {FIX}") from None
    if not wfile.is_file():
        raise ModelLoadError(f"{wfile}: not found; {FIX}")
    header = read_safetensors_header(wfile)
    expected = expected_state_shapes(cfg)
    chosen: dict[str, str] = {}
    for key in header:
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        if name in expected:
            chosen.setdefault(name, key)
    found = {name: tuple(header[key]["shape"]) for name, key in chosen.items()}
    # unused tensors (the decoder, ...) are allowed: only shapes and missing encoder tensors count
    match_state(expected, found, wfile, fix=f"the file does not match config.json (quantize_position "
                f"{cfg.quantize_position}, d_model {cfg.d_model}): {FIX}")
    return SpeechTokenizerFiles(folder=folder, weights=wfile, config=cfg, raw=data, chosen=chosen)
