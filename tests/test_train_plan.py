"""The batch plan: the same global batches for any number of processes, every sample once per epoch."""

from __future__ import annotations

import pytest

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.plan import epoch_order, split_eval, steps_for_epoch, steps_per_epoch, total_steps


@pytest.mark.parametrize("n", [16, 17, 19])
def test_ranks_share_out_the_global_batch_of_one_process(n):
    order = epoch_order(list(range(n)), seed=3, epoch=1)
    single = steps_for_epoch(order, 1, world=1, rank=0, per_device=4, accumulation=1)
    split = [steps_for_epoch(order, 1, world=2, rank=r, per_device=2, accumulation=1) for r in range(2)]
    assert len(split[0]) == len(split[1]) == steps_per_epoch(n, 2, 2, 1)
    # a last step smaller than the number of processes is dropped there (one sample cannot be shared)
    assert len(single) - len(split[0]) == (1 if n % 4 == 1 else 0)
    for k, step in enumerate(single[: len(split[0])]):
        both = sorted(i for r in range(2) for mb in split[r][k].micro for i in mb)
        assert both == sorted(i for mb in step.micro for i in mb)
        assert split[0][k].total_samples == split[1][k].total_samples == step.total_samples
        assert len(split[0][k].micro) == len(split[1][k].micro)  # ranks stay in lockstep
    seen = sorted(i for s in single for mb in s.micro for i in mb)
    assert seen == list(range(n))


def test_accumulation_and_epochs():
    order = list(range(10))
    steps = steps_for_epoch(order, 0, world=1, rank=0, per_device=2, accumulation=2)
    assert [s.micro for s in steps] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]
    assert total_steps(10, 2.5, -1, 1, 2, 2) == 8 and total_steps(10, 2.5, 5, 1, 2, 2) == 5
    fixed = steps_for_epoch(order, 0, world=1, rank=0, per_device=2, accumulation=2, fixed_micro_count=True)
    assert len(fixed) == 2  # DeepSpeed: every step has exactly `accumulation` micro-batches


def test_group_by_length_keeps_every_sample_and_cuts_padding():
    lengths = [10 + (i * 37) % 200 for i in range(64)]
    plain = epoch_order(list(range(64)), 0, 0, lengths, False, 8)
    grouped = epoch_order(list(range(64)), 0, 0, lengths, True, 8)
    assert sorted(grouped) == list(range(64))

    def padding(order):
        return sum(max(lengths[i] for i in order[k : k + 8]) * 8 - sum(lengths[i] for i in order[k : k + 8])
                   for k in range(0, 64, 8))

    assert padding(grouped) < padding(plain) / 2
    assert epoch_order(list(range(64)), 0, 1, lengths, True, 8) != grouped  # reshuffled each epoch


def test_eval_split_is_seeded_and_disjoint():
    train, held = split_eval(20, 0.1, seed=5)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(20))
    assert split_eval(20, 0.1, seed=5) == (train, held)
    assert split_eval(20, 0.0, seed=5) == (list(range(20)), [])


def test_config_values_are_checked_and_coerced():
    cfg = TrainConfig.build({"lora-r": "4", "bf16": "True", "modules_to_save": "lm_head, mimo_output",
                             "use_lora": 1},
                            {"data_path": "d.jsonl", "model_path": "m"})
    assert cfg.lora_rank == 4 and cfg.bf16 is True and cfg.modules_to_save == ("lm_head", "mimo_output")
    with pytest.raises(ConfigError, match="lora_rank = 'four' is not valid"):
        TrainConfig.build({"lora_rank": "four"}, {"data_path": "d", "model_path": "m"})
    with pytest.raises(ConfigError, match="no training data"):
        TrainConfig.build({}, {"model_path": "m"})
    with pytest.raises(ConfigError, match="--lr-scheduler-type must be one of"):
        TrainConfig.build({"lr_scheduler_type": "exp"}, {"data_path": "d", "model_path": "m"})


def test_deepspeed_config_autos_are_filled_from_the_flags(tmp_path):
    import json

    from kimi_lora_cli.training.distributed import deepspeed_config

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                              "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": "auto"}}))
    cfg = TrainConfig.build({}, {"data_path": "d", "model_path": "m", "deepspeed": str(ds), "bf16": True,
                                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    out = deepspeed_config(cfg, world=8)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["gradient_accumulation_steps"] == 4
    assert out["train_batch_size"] == 64 and out["gradient_clipping"] == 1.0 and out["bf16"]["enabled"] is True
    assert out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "reduce_bucket_size" not in out["zero_optimization"]
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match='remove the "optimizer" section'):
        deepspeed_config(cfg, world=1)


@pytest.mark.parametrize(("name", "stage"), [("zero2", 2), ("zero3", 3), ("ds_zero3.json", 3)])
def test_shipped_deepspeed_configs_by_name(name, stage):
    from kimi_lora_cli.training.distributed import deepspeed_config

    cfg = TrainConfig.build({}, {"data_path": "d", "model_path": "m", "deepspeed": name, "bf16": True,
                                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3})
    out = deepspeed_config(cfg, world=4)
    assert out["zero_optimization"]["stage"] == stage
    assert out["train_batch_size"] == 24 and out["bf16"]["enabled"] is True
