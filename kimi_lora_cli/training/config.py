"""`TrainConfig`: every training setting, readable from YAML, flags overriding the file.

Keys use the LoRA guide's (Hugging Face Trainer) names; a YAML file may spell them with dashes or
underscores (`lora-rank` = `lora_rank`), and a few guide aliases are understood (`lora_r`,
`lora_target_modules`). The resolved configuration is written next to the adapter as
`train_config.yaml`, so a run can be repeated with `--config OUTPUT/train_config.yaml`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "all", "tensorboard", "wandb")
DECODE_BATCH = 16
EVAL_METRICS = ("eval_loss", "eval_text_loss", "eval_audio_loss", "eval_wer", "eval_cer")
ALIASES = {
    "lora_r": "lora_rank",
    "lora_target_modules": "lora_target",
    "target": "lora_target",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_strategy": "evaluation_strategy",
    "cache_features": "feature_cache_dir",  # prepare's name for the same folder
}
# Accepted for compatibility with the guide's command line; they change nothing here.
IGNORED_KEYS = ("lazy_preprocess", "save_strategy", "lora_bias_type", "dataloader_num_workers",
                "remove_unused_columns", "ddp_find_unused_parameters")
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "modules_to_save", "train_embeddings",
             "use_dora", "use_rslora")


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    data_path: str | None = None
    model_name_or_path: str | None = None  # release folder: tokenizer + whisper-large-v3/ (and weights)
    model_path: str | None = None  # weights to train, when they live elsewhere
    output_dir: str = "output/kimi-lora"
    eval_ratio: float = 0.0
    evaluation_strategy: str = "steps"  # no | steps | epoch (only with eval_ratio > 0)
    eval_steps: int | None = None  # default: every save_steps and at the end
    per_device_eval_batch_size: int | None = None
    eval_data_path: str | None = None  # evaluation jsonl (same format and checks as data_path)
    eval_generate: str | None = None  # N or "all": greedy-decode N eval conversations -> eval_wer / eval_cer
    eval_max_new_tokens: int | None = None  # default: twice the longest reference + 16
    metric_for_best_model: str | None = None  # eval_loss | eval_wer | eval_cer (...)
    greater_is_better: bool | None = None  # default: False for loss / wer / cer
    load_best_model_at_end: bool = False
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    # LoRA
    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = "all"
    lora_bias: str = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    train_embeddings: bool = False
    # loss
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    # optimisation
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    seed: int = 42
    # data
    model_max_length: int | None = None
    too_long: str = "error"  # error | skip | truncate
    group_by_length: bool = False
    packing: bool = False  # samples laid end to end in rows of packing_length tokens (no padding compute)
    packing_length: int | None = None  # default: model_max_length, else max_position_embeddings
    feature_cache_dir: str | None = None
    speech_tokenizer: str | None = None  # glm-4-voice-tokenizer folder: audio_tokens for messages lacking them
    # precision and memory
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    device: str | None = None  # default: the accelerator's (cuda if available)
    # saving, logging, resuming
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False  # replace a folder an earlier `kimi-lora train` wrote
    deepspeed: str | None = None
    fsdp: bool = False  # FSDP2: every process holds 1/world of the model
    fsdp_cpu_offload: bool = False  # FSDP shards, gradients and optimizer state in CPU memory
    report_to: str = "none"  # comma list of tensorboard, wandb; all; none
    run_name: str | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def normalise_key(cls, key: str) -> str:
        key = key.strip().lstrip("-").replace("-", "_")
        return ALIASES.get(key, key)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """Validated field values from a mapping (YAML or flags); unknown keys are errors."""
        names = set(cls.field_names())
        out: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = cls.normalise_key(str(raw_key))
            if key in IGNORED_KEYS:
                continue
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"{source}: unknown setting {raw_key!r}{hint}")
            out[key] = value
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        import yaml

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings (key: value)")
        return cls.from_mapping(data, str(path))

    @classmethod
    def build(cls, file_values: dict[str, Any] | None = None, flag_values: dict[str, Any] | None = None,
              source: str = "config") -> TrainConfig:
        """Defaults, then the file, then flags; types coerced and every value checked."""
        file_values = cls.from_mapping(file_values or {}, source)
        flag_values = cls.from_mapping({k: v for k, v in (flag_values or {}).items() if v is not None}, "flags")
        merged = {**file_values, **flag_values}
        typed = {}
        for f in fields(cls):
            if f.name in merged:
                typed[f.name] = _coerce(f.name, merged[f.name], getattr(cls, f.name, None), source)
        cfg = cls(**typed)
        cfg.validate()
        return cfg

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.data_path is not None, "no training data: pass --data-path FILE.jsonl (or data_path in --config)")
        need(self.model_name_or_path is not None or self.model_path is not None,
             "no model: pass --model-name-or-path (the Kimi-Audio release folder) or --model-path")
        need(self.lora_rank >= 1, f"--lora-rank must be at least 1 (got {self.lora_rank})")
        need(0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        need(self.lora_bias in ("none", "all", "lora_only"), f"--lora-bias must be none, all or lora_only "
             f"(got {self.lora_bias!r})")
        need(self.per_device_train_batch_size >= 1, "--per-device-train-batch-size must be at least 1")
        need(self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1")
        need(self.learning_rate >= 0, "--learning-rate must not be negative")
        need(self.max_steps == -1 or self.max_steps >= 1,
             f"--max-steps must be at least 1 (or -1 to train --num-train-epochs), not {self.max_steps}")
        need(self.num_train_epochs > 0 or self.max_steps > 0, "--num-train-epochs must be positive (or set --max-steps)")
        need(self.lora_alpha > 0, f"--lora-alpha must be positive (got {self.lora_alpha})")
        need(self.weight_decay >= 0, "--weight-decay must not be negative")
        need(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "--adam-beta1/--adam-beta2 must be in [0, 1)")
        need(self.adam_epsilon > 0, "--adam-epsilon must be positive")
        need(self.max_grad_norm >= 0, "--max-grad-norm must not be negative (0 turns clipping off)")
        need(self.eval_steps is None or self.eval_steps >= 1, "--eval-steps must be at least 1")
        need(self.per_device_eval_batch_size is None or self.per_device_eval_batch_size >= 1,
             "--per-device-eval-batch-size must be at least 1")
        need(bool(str(self.output_dir).strip()), "--output-dir must not be empty")
        need(0.0 <= self.eval_ratio < 1.0, f"--eval-ratio must be in [0, 1) (got {self.eval_ratio})")
        need(self.evaluation_strategy in ("no", "steps", "epoch"),
             f"--evaluation-strategy must be no, steps or epoch (got {self.evaluation_strategy!r})")
        need(self.lr_scheduler_type in SCHEDULERS,
             f"--lr-scheduler-type must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler_type!r})")
        need(0.0 <= self.warmup_ratio <= 1.0, "--warmup-ratio must be in [0, 1]")
        need(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        need(self.too_long in ("error", "skip", "truncate"), f"--too-long must be error, skip or truncate "
             f"(got {self.too_long!r})")
        need(self.model_max_length is None or self.model_max_length >= 8, "--model-max-length must be at least 8")
        need(self.packing_length is None or self.packing_length >= 8, "--packing-length must be at least 8")
        need(not (self.packing and self.group_by_length), "--packing and --group-by-length both cut padding; "
             "pick one (--packing leaves almost none)")
        need(self.save_steps >= 1 and self.logging_steps >= 1, "--save-steps and --logging-steps must be at least 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "--save-total-limit must be at least 1")
        need(not (self.bf16 and self.fp16), "pick one of --bf16 and --fp16")
        need(not (self.fsdp and self.deepspeed), "pick one of --fsdp and --deepspeed (both shard the model)")
        need(self.fsdp or not self.fsdp_cpu_offload, "--fsdp-cpu-offload needs --fsdp")
        need(not (self.fsdp and self.fp16), "--fsdp trains in bfloat16 or float32: use --bf16 instead of --fp16")
        trackers = [t.strip() for t in self.report_to.replace(" ", ",").split(",") if t.strip()]
        need(all(t in REPORT_TO for t in trackers),
             f"--report-to takes a comma list of {', '.join(REPORT_TO)} (got {self.report_to!r})")
        self._validate_evaluation(need)
        need(self.text_loss_weight >= 0 and self.audio_loss_weight >= 0, "loss weights must not be negative")
        need(self.text_loss_weight + self.audio_loss_weight > 0, "at least one loss weight must be positive")
        from kimi_lora_cli.devices import check_device

        check_device(self.device)
        if not self.lora_enabled:
            need(not self.modules_to_save and not self.train_embeddings,
                 "--modules-to-save / --train-embeddings are LoRA options; add --use-lora (full fine-tuning "
                 "trains every weight anyway)")

    def _validate_evaluation(self, need: Any) -> None:
        gen = self.eval_generate
        need(gen is None or gen == "all" or (gen.isdigit() and int(gen) >= 0),
             f"--eval-generate takes a number of conversations or 'all' (got {gen!r})")
        need(self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1, "--eval-max-new-tokens must be at least 1")
        need(self.eval_steps is None or self.eval_steps >= 1, "--eval-steps must be at least 1")
        metric = self.best_metric_name
        if metric is not None:
            need(metric in EVAL_METRICS, f"--metric-for-best-model must be one of {', '.join(EVAL_METRICS)} "
                 f"(got {self.metric_for_best_model!r})")
            need(metric in ("eval_loss", "eval_text_loss", "eval_audio_loss") or self.eval_generate_count != 0,
                 f"--metric-for-best-model {metric} is measured by decoding; add --eval-generate N (or all)")
            need(self.has_eval_set and self.evaluation_strategy != "no",
                 f"--metric-for-best-model {metric} needs evaluations: pass --eval-data-path FILE or --eval-ratio, "
                 "and an --eval-strategy other than no")
        need(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "--early-stopping-patience must be at least 1")
        need(self.early_stopping_threshold >= 0, "--early-stopping-threshold must not be negative")
        need(self.eval_generate_count == 0 or self.has_eval_set,
             "--eval-generate decodes evaluation conversations: pass --eval-data-path FILE or --eval-ratio")
        need(not (self.eval_data_path and self.eval_ratio > 0), "pick one of --eval-data-path and --eval-ratio")

    @property
    def has_eval_set(self) -> bool:
        return bool(self.eval_data_path) or self.eval_ratio > 0

    @property
    def eval_generate_count(self) -> int:
        """0 = no decoding, -1 = every eval conversation, else at most that many."""
        if self.eval_generate in (None, "0"):
            return 0
        return -1 if self.eval_generate == "all" else int(self.eval_generate)

    @property
    def best_metric_name(self) -> str | None:
        """The watched metric (HF names: `wer` means `eval_wer`); eval_loss when only
        --load-best-model-at-end or --early-stopping-patience asks for one."""
        metric = self.metric_for_best_model
        if metric is None and (self.load_best_model_at_end or self.early_stopping_patience):
            metric = "eval_loss"
        if metric is not None and not metric.startswith("eval_"):
            metric = f"eval_{metric}"
        return metric

    @property
    def best_greater_is_better(self) -> bool:
        from kimi_lora_cli.training.state import default_greater_is_better

        if self.greater_is_better is not None:
            return self.greater_is_better
        return default_greater_is_better(self.best_metric_name or "eval_loss")

    @property
    def lora_enabled(self) -> bool:
        return self.use_lora or self.use_dora or self.use_rslora

    def row_length(self, max_position_embeddings: int) -> int | None:
        """Tokens per packed row (None without --packing)."""
        if not self.packing:
            return None
        return self.packing_length or self.model_max_length or max_position_embeddings

    def sample_limit(self, max_position_embeddings: int) -> tuple[int, str]:
        """(longest sample in tokens, the flag that sets it): what --too-long applies to. A packed
        sample must also fit in one row."""
        limit, flag = self.model_max_length or max_position_embeddings, "--model-max-length"
        rows = self.row_length(max_position_embeddings)
        if rows is not None and rows < limit:
            return rows, "--packing-length"
        return limit, flag

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def decode_batch_size(self) -> int:
        # Decoding is step-bound: a wide batch costs little more than one sample (greedy outputs do
        # not depend on the batch), so it gets its own, larger default.
        return self.per_device_eval_batch_size or DECODE_BATCH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules_to_save"] = list(self.modules_to_save)
        return d

    def to_yaml(self) -> str:
        """The settings to repeat this run (what to do with an existing folder is not one of them)."""
        import yaml

        d = self.to_dict()
        d.pop("overwrite_output_dir")
        return yaml.safe_dump(d, sort_keys=False)


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    """Turn YAML / flag values into the field's type (bools accept true/false/1/0/yes/no)."""
    hint = {f.name: f.type for f in fields(TrainConfig)}[name]
    try:
        if hint.startswith("bool"):
            if value is None and "None" in hint:
                return None
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if value is None:
            if "None" in hint:
                return None
            raise ValueError("a value is required")
        if hint.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(x).strip() for x in items if str(x).strip())
        if hint.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected a whole number")
            return int(value)
        if hint.startswith("float"):
            return float(value)
        if hint.startswith("str"):
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {name} = {value!r} is not valid ({e})") from None
    return value
