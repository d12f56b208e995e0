"""The adapter's model card (`README.md`): peft's metadata header, then what the run did.

The YAML header carries the fields the Hugging Face Hub and peft read (`base_model`, `library_name:
peft`, tags); the body gives the command / configuration, data size, final and best
metrics and the loss curve, so the folder explains itself when shared.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_card(*, base_model: str, config: dict[str, Any], samples: int, eval_samples: int, steps: int,
                final: dict[str, Any], best: dict[str, Any] | None, best_metric: str | None, holds_best: bool,
                lora: bool, command: list[str] | None, plot: str | None, peft_version: str | None) -> str:
    """`final`: the last training and eval metrics; `best`: the eval record at the best step by
    `best_metric` (None without one); `holds_best`: the folder's weights are that step's."""
    import yaml

    tags = ["kimi-audio", "kimi-lora", "audio", "speech", "lora" if lora else "full-fine-tuning"]
    if lora and config.get("quantization"):
        tags.append("qlora")
    header = {"base_model": base_model, "library_name": "peft" if lora else "transformers", "tags": tags}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", ""]
    lines += [f"# {Path(str(config.get('output_dir', 'adapter'))).name}", ""]
    what = "LoRA adapter" if lora else "Fully fine-tuned model"
    lines += [f"{what} for [Kimi-Audio]({base_model}) trained with kimi-lora"
              + (f" (peft {peft_version})." if lora and peft_version else "."), ""]
    lines += ["## Training", "",
              f"- data: `{config.get('data_path')}`: {samples} training samples"
              + (f", {eval_samples} evaluation samples" if eval_samples else ""),
              f"- optimizer steps: {steps}"]
    if lora:
        lines.append(f"- LoRA: r={config.get('lora_rank')} alpha={config.get('lora_alpha')} "
                     f"dropout={config.get('lora_dropout')} targets `{config.get('lora_target')}`")
    quant = config.get("quantization")
    if lora and quant:
        dq = " with double quantization" if config.get("double_quant") else ""
        lines.append(f"- QLoRA: trained over the decoder weights (both stacks) in {quant}{dq}; the adapter is an ordinary "
                     f"peft adapter of the full-precision base above. Run it as trained with `kimi-lora infer "
                     f"--quantization {quant}`; `kimi-lora merge` adds it to the full-precision weights, which "
                     f"differ slightly from the dequantized {quant} ones it learned against (check with --verify).")
    lines.append(f"- learning rate {config.get('learning_rate')}, per-device batch "
                 f"{config.get('per_device_train_batch_size')} x accumulation "
                 f"{config.get('gradient_accumulation_steps')}, seed {config.get('seed')}")
    if command:
        lines += ["", "Command:", "", "```bash", " ".join(shlex.quote(a) for a in command), "```"]
    lines += ["", "The full configuration is in `train_config.yaml` (rerun with `kimi-lora train --config "
              "train_config.yaml`).", "", "## Results", ""]
    if final:
        lines += ["| metric | final |" + (" best |" if best else ""), "| --- | --- |" + (" --- |" if best else "")]
        for key in sorted(set(final) | set(best or {})):
            if key in ("step", "epoch"):
                continue
            row = f"| {key} | {_fmt(final.get(key, ''))} |"
            if best:
                row += f" {_fmt(best.get(key, ''))} |"
            lines.append(row)
        lines.append("")
    if best:
        which = "holds" if holds_best else "does not hold (the last step's weights are saved)"
        lines += [f"Best `{best_metric}` at step {best.get('step')}; this folder {which} that checkpoint.", ""]
    if plot:
        lines += [f"![loss curve]({plot})", ""]
    lines += ["## Use", "", "```bash",
              f"kimi-lora infer -m {shlex.quote(base_model)} --adapter . -d test.jsonl -o preds.jsonl"
              if lora else "kimi-lora infer -m . -d test.jsonl -o preds.jsonl", "```", ""]
    return "\n".join(lines)


CARD_MARK = "<!-- model card written by kimi-lora train -->"


def is_card(path: Path) -> bool:
    """True for a README.md this tool wrote (a user's own README is never replaced or removed)."""
    try:
        return CARD_MARK in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def write_card(folder: Path, text: str, tag: str | None = None) -> Path | None:
    """README.md in `folder`, unless a README.md that is not a kimi-lora card is there (then None).
    Written aside and renamed (`tag`: the run id in the temporary name)."""
    from kimi_lora_cli.fileops import write_atomic

    path = folder / "README.md"
    if path.exists() and not is_card(path):
        return None
    write_atomic(path, text + "\n" + CARD_MARK + "\n", tag=tag)
    return path
