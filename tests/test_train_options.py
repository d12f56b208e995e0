"""`kimi-lora train`'s options are TrainConfig's fields: one list gives flags, YAML keys, switches and help;
learning-rate schedules are transformers' own."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import yaml

from kimi_lora_cli.training.config import IGNORED, TrainConfig, aliases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train_command():
    import typer.main

    from kimi_lora_cli.cli.app import app

    return typer.main.get_command(app).commands["train"]


def _long_flags(param) -> set[str]:
    spellings = [*param.opts, *param.secondary_opts]
    return {s[2:].replace("-", "_") for s in spellings if s.startswith("--") and not s.startswith("--no-")}


def test_flags_yaml_keys_and_fields_are_one_list():
    names = {f.name for f in fields(TrainConfig)}
    by_param = {p.name: _long_flags(p) for p in _train_command().params}
    command_own = {"config": {"config"}, "num_processes": {"num_processes", "nproc_per_node"}}
    # every field is a flag under its own name and its aliases; nothing else is, but the guide's ignored keys
    assert set(by_param) == names | set(IGNORED) | set(command_own)
    for name in names:
        assert by_param[name] == {name, *(a for a, n in aliases().items() if n == name)}, name
    # every flag spelling is a YAML key meaning the same field (dashes or underscores)
    for name in names:
        for spelling in by_param[name]:
            for key in (spelling, spelling.replace("_", "-")):
                assert TrainConfig.from_mapping({key: 1}) == {name: 1}, key
    for key in IGNORED:
        assert TrainConfig.from_mapping({key: "x"}) == {}
    # and the resolved file a run writes holds exactly the fields (less what to do with an old folder)
    cfg = TrainConfig.build({"data_path": "d.jsonl", "model_path": "m"})
    assert set(yaml.safe_load(cfg.to_yaml())) == names - {"overwrite_output_dir"}


def test_help_shows_each_fields_default():
    params = {p.name: p for p in _train_command().params}
    assert params["lora_rank"].help.endswith("[default: 8]")
    assert params["learning_rate"].help.endswith("[default: 0.0001]")
    assert params["output_dir"].help.endswith("[default: output/kimi-lora]")
    assert params["eval_steps"].help.endswith("[default: --save-steps]")
    assert "[default" not in params["use_lora"].help  # switches off by default say nothing
    assert params["adam_beta1"].hidden and not params["adam_beta2"].hidden
    assert "-o" in params["output_dir"].opts
    assert params["device"].help.startswith("cpu, cuda, cuda:1")  # the --device help every command shares


def test_every_switch_and_list_of_the_guide_is_understood():
    from kimi_lora_cli.cli.train import list_flags, normalise_args, switch_flags

    switches = {f.name.replace("_", "-") for f in fields(TrainConfig) if str(f.type).startswith("bool")}
    assert set(switch_flags()) == switches | {"lazy-preprocess", "remove-unused-columns", "ddp-find-unused-parameters"}
    assert set(list_flags()) == {"--lora-target", "--lora-target-modules", "--target", "--modules-to-save"}
    assert normalise_args(["--greater_is_better", "False", "--fsdp_cpu_offload=yes", "--target", "q_proj", "k_proj",
                           "--remove_unused_columns", "false", "--epochs", "2"]) == [
        "--no-greater-is-better", "--fsdp-cpu-offload", "--target", "q_proj,k_proj", "--no-remove-unused-columns",
        "--epochs", "2"]


def test_yaml_aliases_and_flag_aliases_agree(cli, tiny_dir, train_data, tmp_path):
    data = train_data(n=2, seed=3)
    conf = tmp_path / "t.yaml"
    conf.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_dir), "data_path": str(data), "use_lora": True,
                                    "epochs": 1, "batch_size": 2, "lr": 0.01, "lora_r": 2, "device": "cpu",
                                    "dataloader_num_workers": 4, "output_dir": str(tmp_path / "o")}))
    code, _, err = cli("train", "--config", conf)
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "o" / "train_config.yaml").read_text())
    assert (resolved["num_train_epochs"], resolved["per_device_train_batch_size"], resolved["learning_rate"],
            resolved["lora_rank"]) == (1.0, 2, 0.01, 2)
    assert "dataloader_num_workers" not in resolved


# -- learning-rate schedules: transformers.get_scheduler, values written out by hand --------------------
def _lrs(kind: str, total: int, warmup: int, kwargs=None) -> list[float]:
    import torch

    from kimi_lora_cli.training.optim import make_scheduler

    cfg = TrainConfig.build({"data_path": "d", "model_path": "m", "lr_scheduler_type": kind, "warmup_steps": warmup,
                             "learning_rate": 1.0, "lr_scheduler_kwargs": kwargs})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_are_transformers_own():
    # linear: warmup step/warmup, then (total - step) / (total - warmup)
    assert _lrs("linear", 6, 2) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    # constant ignores warmup; constant_with_warmup ramps step/warmup then stays
    assert _lrs("constant", 4, 2) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert _lrs("constant_with_warmup", 4, 2) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # cosine_with_min_lr: 0.1 + 0.9 * (1 + cos(pi * progress)) / 2, progress over 4 steps after 0 warmup
    assert _lrs("cosine_with_min_lr", 4, 0, {"min_lr_rate": 0.1}) == pytest.approx(
        [1.0, 0.1 + 0.9 * (1 + 0.5 ** 0.5) / 2, 0.55, 0.1 + 0.9 * (1 - 0.5 ** 0.5) / 2])
    # warmup_stable_decay: 1 warmup step, stable, then a cosine decay over the last 2 steps
    assert _lrs("warmup_stable_decay", 6, 1, '{"num_decay_steps": 2}') == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0, 0.5])


def test_schedule_errors_are_one_line_before_any_weight(cli, train_args, train_data, tmp_path):
    data = train_data(n=2, seed=3)
    base = train_args(data, tmp_path / "x")
    cases = [(["--lr-scheduler-type", "exp"], "--lr-scheduler-type must be one of linear, cosine"),
             (["--lr-scheduler-type", "reduce_lr_on_plateau"], "follows an evaluation metric"),
             (["--lr-scheduler-type", "cosine_with_min_lr"], "--lr-scheduler-kwargs"),
             (["--lr-scheduler-type", "linear", "--lr-scheduler-kwargs", "{nope"], "expected a JSON object"),
             (["--lr-scheduler-type", "linear", "--lr-scheduler-kwargs", '{"gamma": 2}'], "gamma")]
    for extra, words in cases:
        code, _, err = cli(*base, *extra)
        assert code == 1 and words in " ".join(err.split()), (extra, err)
        assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_a_run_follows_the_named_schedule(cli, train_args, train_data, tmp_path):
    data = train_data(n=2, seed=3)
    out = tmp_path / "o"
    code, _, err = cli(*train_args(data, out, "--max-steps", "4", "--logging-steps", "1", "--learning-rate", "0.01",
                       "--lr-scheduler-type", "polynomial", "--lr-scheduler-kwargs", '{"power": 2.0, "lr_end": 0.0}'))
    assert code == 0, err
    lrs = [json.loads(line)["learning_rate"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    # polynomial decay without warmup: 0.01 * (1 - step / 4) ** 2
    assert lrs == pytest.approx([0.01, 0.01 * 0.75 ** 2, 0.01 * 0.5 ** 2, 0.01 * 0.25 ** 2])
