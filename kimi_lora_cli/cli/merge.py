"""`kimi-lora merge`: base model + LoRA adapter(s) -> a complete model folder in the release layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.cli._options import AllowPickleOpt, DtypeOpt


def merge(
    model: Annotated[Path, typer.Option("--model", "-m", metavar="DIR", help="Base model folder (the Kimi-Audio release "
                                        "folder, or any Hugging Face causal LM folder).", show_default=False)],
    adapter: Annotated[list[Path], typer.Option("--adapter", "-a", metavar="DIR", help="Adapter folder; repeat for a "
                                                "weighted sum of several.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Folder to write (must be empty or absent "
                                         "unless --overwrite).", show_default=False)],
    weights: Annotated[str | None, typer.Option("--weights", "-w", metavar="W1,W2", help="One weight per --adapter, "
                                                "comma-separated (default 1 each), e.g. 0.7,0.3.",
                                                show_default=False)] = None,
    dtype: DtypeOpt = "auto",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Largest output shard, e.g. 5GB, "
                                                "500MB, 2GiB.")] = "5GB",
    verify: Annotated[bool, typer.Option("--verify", help="Run a probe through base + adapters (peft) and "
                                         "through the merged weights; fail if the logits differ beyond the "
                                         "dtype's tolerance. Loads the model twice, one after the other.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where --verify runs: auto (cuda if available), "
                                        "cpu, cuda, cuda:1, ...")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --output folder that an earlier "
                                            "`kimi-lora merge` wrote (only after the new folder is complete); "
                                            "other folders are never replaced.")] = False,
    link_files: Annotated[bool, typer.Option("--link-files", help="Hard-link the base's other weight files "
                                             "(whisper-large-v3/*.safetensors, ...) instead of copying them: "
                                             "saves space, but the two folders then share those files.")] = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Merge LoRA adapter(s) into the base weights and write a complete model folder.

    Streams the base one tensor at a time (memory: about the adapter plus the largest adapted
    tensor), rewrites only the tensors the adapter changes, and copies everything else
    (whisper-large-v3/, tokenizer, configs; a copy-on-write clone where the file system has one,
    hard links for weight files with --link-files). The result loads like the release folder.

    [bold]Examples[/]

      $ kimi-lora merge -m ./Kimi-Audio-7B-Instruct -a ./runs/asr/adapter -o ./Kimi-Audio-asr

      $ kimi-lora merge -m ./Kimi-Audio-7B-Instruct -a ./a1 -a ./a2 --weights 0.7,0.3 -o ./mix --verify

    A QLoRA adapter (`train --quantization nf4`) merges into the full-precision base like any other:
    its update was learned against the dequantized nf4 weights, so the merged model is close to, not
    equal to, base in nf4 + adapter; --verify compares it with the full-precision base + adapter.
    """
    from rich.markup import escape

    from kimi_lora_cli.adapters.merge import MergeSpec, merge_adapters
    from kimi_lora_cli.cli._output import err, human_bytes, out
    from kimi_lora_cli.errors import ConfigError
    from kimi_lora_cli.safetensors_io import parse_size

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"--max-shard-size: {e}") from None
    parsed_weights = None
    if weights is not None:
        try:
            parsed_weights = tuple(float(w) for w in weights.split(",") if w.strip())
        except ValueError:
            raise ConfigError(f"--weights {weights!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    from kimi_lora_cli.devices import check_device

    check_device(device)
    if device == "auto":
        device = "cpu"
        if verify:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = MergeSpec(model=model, adapters=tuple(adapter), output=output, weights=parsed_weights, dtype=dtype,
                     max_shard_size=shard_bytes, overwrite=overwrite, allow_pickle=allow_pickle, verify=verify,
                     device=device, link_files=link_files)
    from kimi_lora_cli.quantization import trained_over

    for a in adapter:
        mode = trained_over(a)
        if mode:
            err.print(f"[yellow]Note:[/] {escape(str(a))} was trained over {mode} weights (QLoRA): its update is "
                      f"added to the full-precision base, which differs slightly from the dequantized {mode} weights it "
                      f"learned against; compare with `kimi-lora infer --quantization {mode} -a ...`", highlight=False)
    result = merge_adapters(spec, progress=lambda msg: err.print(escape(msg), highlight=False))
    n = len(adapter)
    out.print(f"Merged {n} adapter{'s' if n > 1 else ''} into [bold]{escape(str(result.output))}[/]: "
              f"{len(result.shards)} shards, {len(result.changed)} of {result.tensors} tensors changed, "
              f"{human_bytes(result.total_bytes)} ({result.dtype}), {result.linked_files + result.copied_files} "
              f"other files ({result.linked_files} hard-linked), {result.seconds:.1f} s.", soft_wrap=True)
    if result.verify is not None:
        v = result.verify
        for head, diff in v.diffs.items():
            out.print(f"verify {head}: max |merged - base+adapter| = {diff:.3g} "
                      f"(tolerance {v.tolerances[head]:.3g}, {v.dtype}) [green]ok[/]")
