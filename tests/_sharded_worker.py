"""What the FSDP and DeepSpeed workers share (run under `torchrun` by their tests): train through the real
Trainer, collect each process's findings, and on rank 0 compare what was saved with the weights gathered
from the shards, writing the findings as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_and_compare(result_path: str, settings: str, describe: Callable[[Any, dict], dict],
                    gather: Callable[[dict], dict]) -> None:
    """`describe(trainer, params)`: this process's findings (every rank's go into "ranks");
    `gather(params)`: the full trainable weights by parameter name, gathered from the shards."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.trainer import Trainer

    cfg = TrainConfig.build({}, json.loads(settings))
    trainer = Trainer(cfg)
    trainer.setup()
    together = False
    try:
        trainer._run()
        params = dict(trainer._unwrapped().named_parameters())
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, describe(trainer, params))
        gathered = gather(params)
        if dist.get_rank() == 0:
            out = Path(cfg.output_dir)
            if cfg.lora_enabled:
                saved = load_file(str(out / "adapter_model.safetensors"))
                # peft's names in the file: without the adapter name (and modules_to_save's wrapper)
                expect = {n.replace(".modules_to_save.default.", ".").replace(".default.", "."): t
                          for n, t in gathered.items()}
            else:
                saved = {}
                for shard in sorted(out.glob("model-*.safetensors")):
                    saved.update(load_file(str(shard)))
                expect = gathered
            common = sorted(set(saved) & set(expect))
            result = {
                "ranks": everyone,
                "missing": sorted(set(expect) - set(saved)),
                "extra": sorted(set(saved) - set(expect)),
                "max_diff": max(float((saved[k].float() - expect[k].detach().float()).abs().max()) for k in common),
                "empty": [k for k, t in saved.items() if t.numel() == 0],
                "nonzero_lora_b": sum(int(bool(t.abs().sum() > 0)) for k, t in saved.items() if "lora_B" in k),
                "compared": len(common),
            }
            Path(result_path).write_text(json.dumps(result), encoding="utf-8")
        together = True
    finally:
        trainer._release(together=together)
