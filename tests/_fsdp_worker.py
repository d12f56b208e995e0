"""Run under `torchrun` by tests/test_train_fsdp.py: trains with --fsdp through the real Trainer, then
checks from inside the processes that the model really is sharded and that what was saved equals
the weights gathered with DTensor.full_tensor(). Rank 0 writes the findings as JSON.

    torchrun --nproc_per_node 2 tests/_fsdp_worker.py RESULT.json '{"model_name_or_path": ..., ...}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(result_path: str, settings: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.trainer import Trainer

    cfg = TrainConfig.build({}, json.loads(settings))
    trainer = Trainer(cfg)
    trainer.setup()
    together = False
    try:
        trainer._run()
        model = trainer._unwrapped()
        params = dict(model.named_parameters())
        mine = {"sharded": all(isinstance(p, DTensor) for p in params.values()),
                "local": sum(p.to_local().numel() for p in params.values()),
                "total": sum(p.numel() for p in params.values())}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        gathered = {n: p.full_tensor() for n, p in params.items() if p.requires_grad}
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
