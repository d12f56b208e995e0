"""Run under `torchrun` (or alone) by tests/test_train_deepspeed.py: trains with --deepspeed through the
real Trainer, stopping after `max_steps`, then checks from inside the processes what wraps the model
(a deepspeed.DeepSpeedEngine), that ZeRO-3 really partitioned it (each process stores about 1/world of
every weight) and that the saved adapter equals the weights gathered from the partitions. Rank 0
writes the findings as JSON.

    torchrun --nproc_per_node 2 tests/_deepspeed_worker.py RESULT.json '{"model_name_or_path": ..., ...}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(result_path: str, settings: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.engines import engine_name
    from kimi_lora_cli.training.trainer import Trainer

    cfg = TrainConfig.build({}, json.loads(settings))
    trainer = Trainer(cfg)
    trainer.setup()
    together = False
    try:
        trainer._run()
        model = trainer._unwrapped()
        params = dict(model.named_parameters())
        mine = {"engine": type(trainer.model).__module__ + "." + type(trainer.model).__name__,
                "is_engine": isinstance(trainer.model, deepspeed.DeepSpeedEngine),
                "banner": engine_name(trainer.model, trainer.engine, trainer.fsdp),
                "stage": trainer.engine.zero_optimization_stage(),
                "local": sum(p.ds_tensor.numel() for p in params.values()),
                "total": sum(p.ds_numel for p in params.values()),
                "empty_local": all(p.numel() == 0 for p in params.values())}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
            gathered = {n: p.detach().clone() for n, p in trainable}
        if dist.get_rank() == 0:
            saved = load_file(str(Path(cfg.output_dir) / "adapter_model.safetensors"))
            expect = {n.replace(".modules_to_save.default.", ".").replace(".default.", "."): t
                      for n, t in gathered.items()}
            common = sorted(set(saved) & set(expect))
            result = {
                "ranks": everyone,
                "missing": sorted(set(expect) - set(saved)),
                "extra": sorted(set(saved) - set(expect)),
                "max_diff": max(float((saved[k] - expect[k]).abs().max()) for k in common),
                "empty": [k for k, t in saved.items() if t.numel() == 0],
                "compared": len(common),
            }
            Path(result_path).write_text(json.dumps(result), encoding="utf-8")
        together = True
    finally:
        trainer._release(together=together)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
