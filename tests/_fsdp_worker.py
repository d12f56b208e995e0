"""Run under `torchrun` by tests/test_train_fsdp.py: trains with --fsdp through the real Trainer, then
checks from inside the processes that the model really is sharded and that what was saved equals
the weights gathered with DTensor.full_tensor(). Rank 0 writes the findings as JSON.

    torchrun --nproc_per_node 2 tests/_fsdp_worker.py RESULT.json '{"model_name_or_path": ..., ...}'
"""

from __future__ import annotations

import sys

from _sharded_worker import run_and_compare


def main(result_path: str, settings: str) -> None:
    from torch.distributed.tensor import DTensor

    def describe(trainer, params):
        return {"sharded": all(isinstance(p, DTensor) for p in params.values()),
                "local": sum(p.to_local().numel() for p in params.values()),
                "total": sum(p.numel() for p in params.values())}

    def gather(params):
        return {n: p.full_tensor() for n, p in params.items() if p.requires_grad}

    run_and_compare(result_path, settings, describe, gather)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
