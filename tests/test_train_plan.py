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
    assert out["zero_optimization"]["reduce_bucket_size"] == "auto"  # sized from the model, once it is known
    from kimi_lora_cli.training.distributed import fill_model_sizes

    class Shape:
        hidden_size, num_key_value_heads, num_attention_heads, head_dim, intermediate_size = 64, 2, 4, 16, 128

    assert fill_model_sizes(out, Shape)["zero_optimization"]["reduce_bucket_size"] == 64 * 64
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


def _naive_ffd(lengths, capacity):
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
        if j is None:
            rows.append([])
            free.append(capacity)
            j = len(rows) - 1
        rows[j].append(i)
        free[j] -= lengths[i]
    return rows


def test_pack_rows_is_first_fit_decreasing():
    import random

    from kimi_lora_cli.training.plan import pack_rows

    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(300)]
    rows = pack_rows(list(range(300)), lengths, 512)
    assert rows == _naive_ffd(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.95  # almost no padding left
    with pytest.raises(ValueError, match="more than the packing length 512"):
        pack_rows([0, 1], [10, 513], 512)


def test_packing_plan_is_deterministic_and_covers_every_sample_once_per_epoch():
    from kimi_lora_cli.training.plan import BatchPlan, PackedMicro, packed_epoch_rows

    lengths = [10 + (i * 37) % 200 for i in range(101)]
    indices = list(range(1, 101))  # sample 0 is held out
    rows0 = packed_epoch_rows(indices, lengths, 256, seed=3, epoch=0)
    assert rows0 == packed_epoch_rows(indices, lengths, 256, seed=3, epoch=0)
    rows1 = packed_epoch_rows(indices, lengths, 256, seed=3, epoch=1)
    assert rows1 != rows0 and len(rows1) == len(rows0)  # reshuffled, same number of rows
    assert packed_epoch_rows(indices, lengths, 256, seed=4, epoch=0) != rows0

    def plan(world, rank, per_device, accumulation=1):
        return BatchPlan(indices, lengths, 3, world, rank, per_device, accumulation, packing_length=256)

    one = plan(1, 0, 4)
    n_steps = one.steps_per_epoch()
    assert n_steps == -(-len(rows0) // 4)
    stream = one.steps()
    epochs = [[next(stream) for _ in range(n_steps)] for _ in range(2)]
    for e, steps in enumerate(epochs):
        assert all(s.epoch == e for s in steps) and steps[-1].step_in_epoch == n_steps - 1
        seen = [i for s in steps for mb in s.micro for i in mb]
        assert sorted(seen) == indices  # every sample exactly once per epoch
        for s in steps:
            assert all(isinstance(mb, PackedMicro) and len(mb.rows) <= 4 for mb in s.micro)
            assert s.total_samples == sum(len(mb) for mb in s.micro)
    # resume: a fresh plan gives the very same steps, so skipping the done ones continues exactly
    again = plan(1, 0, 4).steps()
    assert [next(again).micro for _ in range(n_steps + 2)] == [s.micro for s in epochs[0] + epochs[1][:2]]


@pytest.mark.parametrize("world, per_device, accumulation", [(2, 1, 1), (3, 1, 2), (2, 2, 1)])
def test_packing_plan_shares_each_step_among_processes(world, per_device, accumulation):
    from kimi_lora_cli.training.plan import BatchPlan

    lengths = [10 + (i * 53) % 230 for i in range(77)]
    indices = list(range(77))
    single = BatchPlan(indices, lengths, 0, 1, 0, world * per_device * accumulation, 1, packing_length=256)
    ranks = [BatchPlan(indices, lengths, 0, world, r, per_device, accumulation, packing_length=256)
             for r in range(world)]
    n_steps = ranks[0].steps_per_epoch()
    assert n_steps == single.steps_per_epoch()
    per_rank = [[next(s) for _ in range(n_steps)] for s in (p.steps() for p in ranks)]
    alone = single.steps()
    seen = []
    for k in range(n_steps):
        one = next(alone)
        steps = [per_rank[r][k] for r in range(world)]
        assert len({len(s.micro) for s in steps}) == 1  # ranks stay in lockstep
        assert len({s.total_samples for s in steps}) == 1
        assert all(1 <= len(mb.rows) <= per_device for s in steps for mb in s.micro)  # never above the ask
        step_samples = [i for s in steps for mb in s.micro for i in mb]
        assert len(step_samples) == steps[0].total_samples
        # the same samples as one process taking the whole global batch (so the same gradient)
        assert sorted(step_samples) == sorted(i for mb in one.micro for i in mb)
        seen += step_samples
    assert sorted(seen) == indices


def test_packed_eval_batches_cover_the_held_out_samples_on_every_rank():
    from kimi_lora_cli.training.plan import BatchPlan

    lengths = [10 + (i * 53) % 230 for i in range(40)]
    held = list(range(0, 39, 3))
    plans = [BatchPlan(list(range(40)), lengths, 0, 2, r, 1, 1, packing_length=256) for r in range(2)]
    batches = [p.eval_batches(held, 2) for p in plans]
    assert len(batches[0]) == len(batches[1])
    got = sorted(i for b in batches for mb in b for i in mb)
    assert got == held
    assert all(len(mb.rows) <= 2 for b in batches for mb in b if mb)
    padded = BatchPlan(list(range(40)), lengths, 0, 2, 1, 1, 1).eval_batches(held, 3)
    assert [len(mb) for mb in padded] == [3, 3, 0]  # 7 + 6 samples: rank 1 runs a third, empty pass


@pytest.mark.parametrize("samples, packing_length, fixed, words", [
    (3, 256, True, "the training data gives 2 packed rows, and one step needs at least 4 (DeepSpeed takes full "
                   "steps only: 2 processes x --per-device-train-batch-size 2 x --gradient-accumulation-steps 1)"),
    (1, None, False, "the training data gives 1 samples, and one step needs at least 2 (one per process)"),
    (3, None, True, "the training data gives 3 samples, and one step needs at least 4 (DeepSpeed takes full steps "
                    "only: 2 processes x --per-device-train-batch-size 2 x --gradient-accumulation-steps 1)"),
])
def test_data_too_small_for_one_step_is_one_line(samples, packing_length, fixed, words):
    """Too little data for one optimizer step is a one-line error (was a ValueError, "unexpected")."""
    from kimi_lora_cli.errors import ConfigError
    from kimi_lora_cli.training.plan import BatchPlan

    plan = BatchPlan(list(range(samples)), [20] * samples, 0, 2, 0, 2, 1, fixed_micro_count=fixed,
                     packing_length=packing_length)
    with pytest.raises(ConfigError) as e:
        next(iter(plan.steps()))
    assert str(e.value).startswith(f"no optimizer step fits in an epoch: {words}"), str(e.value)
