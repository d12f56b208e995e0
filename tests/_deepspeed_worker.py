"""Run under `torchrun` (or alone) by tests/test_train_deepspeed.py: trains with --deepspeed through the
real Trainer, stopping after `max_steps`, then checks from inside the processes what wraps the model
(a deepspeed.DeepSpeedEngine), that ZeRO-3 really partitioned it (each process stores about 1/world of
every weight) and that the saved adapter equals the weights gathered from the partitions. Rank 0
writes the findings as JSON.

    torchrun --nproc_per_node 2 tests/_deepspeed_worker.py RESULT.json '{"model_name_or_path": ..., ...}'
"""

from __future__ import annotations

import sys

from _sharded_worker import run_and_compare


def main(result_path: str, settings: str) -> None:
    import deepspeed

    from kimi_lora_cli.training.engines import engine_name

    def describe(trainer, params):
        return {"engine": type(trainer.model).__module__ + "." + type(trainer.model).__name__,
                "is_engine": isinstance(trainer.model, deepspeed.DeepSpeedEngine),
                "banner": engine_name(trainer.model, trainer.engine, trainer.fsdp),
                "stage": trainer.engine.zero_optimization_stage(),
                "local": sum(p.ds_tensor.numel() for p in params.values()),
                "total": sum(p.ds_numel for p in params.values()),
                "empty_local": all(p.numel() == 0 for p in params.values())}

    def gather(params):
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
            return {n: p.detach().clone() for n, p in trainable}

    run_and_compare(result_path, settings, describe, gather)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
