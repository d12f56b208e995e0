"""`TrainConfig`: every training setting, readable from YAML, flags overriding the file.

Keys use the LoRA guide's (Hugging Face Trainer) names; a YAML file may spell them with dashes or
underscores (`lora-rank` = `lora_rank`), and a few guide aliases are understood (`lora_r`,
`lora_target_modules`). The resolved configuration is written next to the adapter as
`train_config.yaml`, so a run can be repeated with `--config OUTPUT/train_config.yaml`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kimi_lora_cli.devices import DEVICE_HELP
from kimi_lora_cli.errors import ConfigError

REPORT_TO = ("none", "all", "tensorboard", "wandb")
DECODE_BATCH = 16
EVAL_METRICS = ("eval_loss", "eval_text_loss", "eval_audio_loss", "eval_wer", "eval_cer")
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "off"})

# Help panels of `kimi-lora train --help`.
P_DATA = "Model and data"
P_LORA = "LoRA"
P_OPT = "Optimisation"
P_EVAL = "Evaluation and best model"
P_RUN = "Saving, logging, resuming, launching"

# Settings of the LoRA guide's command line that change nothing here (accepted as flags and YAML keys so
# its command can be pasted): name -> whether the flag is a switch.
IGNORED = {"lazy_preprocess": True, "save_strategy": False, "lora_bias_type": False,
           "dataloader_num_workers": False, "remove_unused_columns": True, "ddp_find_unused_parameters": True}


def option(default: Any = None, help: str = "", *, panel: str, aliases: tuple[str, ...] = (), short: str = "",
           shown: str | None = None, hidden: bool = False, many: bool = False) -> Any:
    """A setting and its command-line face, written once: `kimi-lora train`'s flag (`--name` from the field
    name, `aliases` as extra spellings of both the flag and the YAML key, `short` like `-o`), its help text
    and panel, the default shown in --help (`shown` when the value alone says too little; none for
    None/False), `hidden` flags, and `many` for lists the guide passes as separate words."""
    return field(default=default, metadata={"help": help, "panel": panel, "aliases": aliases, "short": short,
                                            "shown": shown, "hidden": hidden, "many": many})


@dataclass(frozen=True)
class TrainConfig:
    # -- model and data
    data_path: str | None = option(
        help="Training data: the official jsonl (audio messages with audio_tokens, see `kimi-lora prepare`, or "
        "without them given --speech-tokenizer), or any format `kimi-lora prepare` reads (NeMo, CSV/TSV, Kaldi, "
        "audio folder, LibriSpeech, HF dataset, chat JSON).", panel=P_DATA)
    data_format: str = option("auto", "Format of --data-path and --eval-data-path: auto, jsonl, nemo, csv, tsv, "
                              "kaldi, folder, librispeech, hf, chat.", panel=P_DATA, aliases=("format",))
    columns: str | None = option(help="Columns of a CSV/TSV, NeMo manifest or HF dataset: audio=COL,text=COL.",
                                 panel=P_DATA)
    task: str = option("asr", "What transcript-only data trains: asr (instruction + audio -> transcript) or tts "
                       "(transcript -> audio, audio loss).", panel=P_DATA)
    language: str = option("en", "en or zh: the official English or Chinese ASR instruction.", panel=P_DATA)
    instruction: str | None = option(help="Your own ASR instruction instead of the official one.", panel=P_DATA)
    max_audio_seconds: float | None = option(help="Clips longer than this are bad rows (refused, or left out with "
                                             "--skip-bad).", panel=P_DATA)
    skip_bad: bool = option(False, "Leave out rows the data source cannot read (unreadable audio, empty "
                            "transcripts, ...) instead of stopping.", panel=P_DATA)
    model_name_or_path: str | None = option(
        help="Kimi-Audio release folder (tokenizer, whisper-large-v3/, and the weights unless --model-path is "
        "given).", panel=P_DATA)
    model_path: str | None = option(
        help="Folder with the weights to train (e.g. a fine-tuned or exported model); tokenizer and Whisper come "
        "from --model-name-or-path when it lacks them.", panel=P_DATA)
    output_dir: str = option("output/kimi-lora", "Where the adapter, checkpoints and logs go.", panel=P_DATA,
                             short="-o")
    model_max_length: int | None = option(help="Longest sequence in tokens.", panel=P_DATA,
                                          shown="max_position_embeddings")
    too_long: str = option("error", "Samples over --model-max-length: error, skip or truncate.", panel=P_DATA)
    group_by_length: bool = option(False, "Batch samples of similar length (less padding).", panel=P_DATA)
    packing: bool = option(
        False, "Pack samples end to end into rows of --packing-length tokens (no compute on padding); each sample "
        "still attends only to itself and keeps its own loss. --per-device-train-batch-size then counts rows.",
        panel=P_DATA)
    packing_length: int | None = option(help="Tokens per packed row; longer samples follow --too-long.",
                                        panel=P_DATA, shown="--model-max-length")
    feature_cache_dir: str | None = option(
        help="Also keep Whisper features on disk here, reused by later runs; the folder `kimi-lora prepare "
        "--cache-features` filled is reused as is.", panel=P_DATA, aliases=("cache_features",))
    speech_tokenizer: str | None = option(
        help="Local glm-4-voice-tokenizer folder: audio messages without audio_tokens are tokenized on the fly "
        "(each file once; kept in --feature-cache-dir too).", panel=P_DATA)
    # -- evaluation and best model
    eval_data_path: str | None = option(help="Evaluation data (same format and checks as --data-path).",
                                        panel=P_EVAL)
    eval_ratio: float = option(0.0, "Or hold out this share of the training samples for evaluation.",
                               panel=P_EVAL)
    evaluation_strategy: str = option("steps", "no, steps or epoch; also once at the end.", panel=P_EVAL,
                                      aliases=("eval_strategy",))
    eval_steps: int | None = option(help="Evaluate every N steps.", panel=P_EVAL, shown="--save-steps")
    eval_generate: str | None = option(
        help="Greedy-decode N eval conversations (or all) at each evaluation with the infer engine under the "
        "current adapter; logs eval_wer / eval_cer.", panel=P_EVAL)
    eval_max_new_tokens: int | None = option(help="Decode budget per conversation.", panel=P_EVAL,
                                             shown="2 x longest reference + 16")
    metric_for_best_model: str | None = option(
        help="eval_wer, eval_cer or eval_loss (also eval_text_loss, eval_audio_loss): tracked in "
        "trainer_state.json; every evaluation then saves a checkpoint.", panel=P_EVAL)
    greater_is_better: bool | None = option(panel=P_EVAL, shown="no for loss, wer and cer")
    load_best_model_at_end: bool = option(
        False, "The final adapter is the best checkpoint's (by --metric-for-best-model, default eval_loss).",
        panel=P_EVAL)
    early_stopping_patience: int | None = option(help="Stop after N evaluations without improvement of the "
                                                 "metric.", panel=P_EVAL)
    early_stopping_threshold: float = option(0.0, "Least change that counts as an improvement.", panel=P_EVAL)
    per_device_eval_batch_size: int | None = option(help="Eval micro-batch.", panel=P_EVAL,
                                                    shown="the training one for the loss, 16 for decoding")
    # -- LoRA
    use_lora: bool = option(False, "Train a LoRA adapter (without it: full fine-tuning).", panel=P_LORA)
    lora_rank: int = option(8, panel=P_LORA, aliases=("lora_r",))
    lora_alpha: int = option(16, panel=P_LORA)
    lora_dropout: float = option(0.05, panel=P_LORA)
    lora_target: str = option(
        "all", "all, components (backbone,text,mimo,adaptor,heads), module names, globs, re:REGEX, TERM:a-b layer "
        "ranges - as `kimi-lora list-modules`.", panel=P_LORA, aliases=("lora_target_modules", "target"),
        many=True)
    lora_bias: str = option("none", "none, all or lora_only.", panel=P_LORA)
    use_dora: bool = option(False, "DoRA (weight-decomposed LoRA).", panel=P_LORA)
    use_rslora: bool = option(False, "rsLoRA scaling alpha/sqrt(r).", panel=P_LORA)
    modules_to_save: tuple[str, ...] = option((), "Modules trained in full next to the adapter (e.g. "
                                              "lm_head,mimo_output).", panel=P_LORA, many=True)
    train_embeddings: bool = option(False, "Train the token embeddings in full (excluded by default).",
                                    panel=P_LORA)
    quantization: str | None = option(
        help="QLoRA: keep the linear layers of both decoder stacks in nf4, fp4 or int8 (bitsandbytes: pip install "
        "'kimi-lora[qlora]') and train LoRA over them; Whisper, adaptor, embeddings and heads stay in the training "
        "dtype (--bf16 / --fp16, else float32: the 4-bit layers' compute dtype; int8 layers multiply in float16), norms "
        "in float32.", panel=P_LORA)
    double_quant: bool = option(False, "With --quantization nf4/fp4: quantize the 4-bit blocks' scales too (about "
                                "0.4 bit less per weight).", panel=P_LORA)
    # -- optimisation
    text_loss_weight: float = option(1.0, panel=P_OPT)
    audio_loss_weight: float = option(1.0, panel=P_OPT)
    num_train_epochs: float = option(3.0, panel=P_OPT, aliases=("epochs",))
    max_steps: int = option(-1, "Stop after N optimizer steps (overrides epochs); -1: train the epochs.",
                            panel=P_OPT)
    per_device_train_batch_size: int = option(1, "Micro-batch per process.", panel=P_OPT,
                                              aliases=("batch_size",))
    gradient_accumulation_steps: int = option(1, panel=P_OPT)
    learning_rate: float = option(1e-4, panel=P_OPT, aliases=("lr",))
    weight_decay: float = option(0.0, panel=P_OPT)
    adam_beta1: float = option(0.9, panel=P_OPT, hidden=True)
    adam_beta2: float = option(0.999, panel=P_OPT)
    adam_epsilon: float = option(1e-8, panel=P_OPT, hidden=True)
    max_grad_norm: float = option(1.0, "Gradient clipping, 0 = off.", panel=P_OPT)
    lr_scheduler_type: str = option(
        "cosine", "Any schedule of transformers' get_scheduler: linear, cosine, cosine_with_restarts, "
        "polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, "
        "cosine_warmup_with_min_lr, warmup_stable_decay.", panel=P_OPT)
    lr_scheduler_kwargs: dict[str, Any] | None = option(
        help='The schedule\'s own arguments as JSON, as the HF Trainer\'s (e.g. \'{"min_lr_rate": 0.1}\' for '
        'cosine_with_min_lr, \'{"num_decay_steps": 100}\' for warmup_stable_decay).', panel=P_OPT)
    warmup_ratio: float = option(0.0, panel=P_OPT)
    warmup_steps: int = option(0, "Overrides --warmup-ratio.", panel=P_OPT)
    seed: int = option(42, panel=P_OPT)
    bf16: bool = option(False, "bfloat16 weights (LoRA) and autocast.", panel=P_OPT)
    fp16: bool = option(False, panel=P_OPT, hidden=True)
    gradient_checkpointing: bool = option(False, "Recompute layers in the backward pass (less memory).",
                                          panel=P_OPT)
    device: str | None = option(help=DEVICE_HELP, panel=P_OPT)
    # -- saving, logging, resuming, launching
    save_steps: int = option(500, "Checkpoint every N steps.", panel=P_RUN)
    save_total_limit: int | None = option(help="Keep only the newest N checkpoints (and the best).", panel=P_RUN)
    logging_steps: int = option(10, panel=P_RUN)
    resume_from_checkpoint: str | None = option(
        help="latest (newest checkpoint in --output-dir) or a checkpoint-N folder; the run's settings must match "
        "the checkpoint's, except max_steps, num_train_epochs, learning_rate, save/logging/eval steps, "
        "save_total_limit, report_to, device and gradient_checkpointing.", panel=P_RUN)
    overwrite_output_dir: bool = option(
        False, "Start over in an --output-dir an earlier `kimi-lora train` wrote (its adapter, checkpoints and logs "
        "are removed; other folders are never touched).", panel=P_RUN)
    deepspeed: str | None = option(
        help='DeepSpeed ZeRO: zero2, zero3, zero2_offload or zero3_offload (shipped with kimi-lora; _offload keeps '
        'the optimizer state, and with zero3 the weights, in CPU memory) or a JSON path; "auto" values are '
        "filled from the flags. Needs `pip install 'kimi-lora[deepspeed]'`.", panel=P_RUN)
    fsdp: bool = option(
        False, "Shard weights, gradients and optimizer state over the processes (FSDP2): each holds 1/N of the "
        "model, for models past one GPU's memory. With --num-processes, torchrun or `accelerate launch "
        "--use_fsdp`.", panel=P_RUN)
    fsdp_cpu_offload: bool = option(False, "With --fsdp: keep the shards, gradients and optimizer state in CPU "
                                    "memory (slower; fits larger models).", panel=P_RUN)
    report_to: str = option("none", "Trackers: tensorboard, wandb (comma list), all (every installed one) or "
                            "none.", panel=P_RUN)
    run_name: str | None = option(help="Name of the run in the trackers.", panel=P_RUN)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def normalise_key(cls, key: str) -> str:
        key = key.strip().lstrip("-").replace("-", "_")
        return aliases().get(key, key)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """Validated field values from a mapping (YAML or flags); unknown keys are errors."""
        names = set(cls.field_names())
        out: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = cls.normalise_key(str(raw_key))
            if key in IGNORED:
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
        check_schedule_name(self.lr_scheduler_type)
        need(0.0 <= self.warmup_ratio <= 1.0, "--warmup-ratio must be in [0, 1]")
        need(self.warmup_steps >= 0, "--warmup-steps must not be negative")
        self.source_options().check()
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
        self._validate_quantization(need)
        if not self.lora_enabled:
            need(not self.modules_to_save and not self.train_embeddings,
                 "--modules-to-save / --train-embeddings are LoRA options; add --use-lora (full fine-tuning "
                 "trains every weight anyway)")

    def _validate_quantization(self, need: Any) -> None:
        """Combinations bitsandbytes cannot train, refused before anything is read."""
        from kimi_lora_cli.quantization import MODES

        q = self.quantization
        need(q is None or q in MODES, f"--quantization must be one of {', '.join(MODES)} (got {q!r})")
        need(not self.double_quant or q in ("nf4", "fp4"),
             "--double-quant quantizes the scales of 4-bit weights; add --quantization nf4 (or fp4)")
        if q is None:
            return
        need(self.lora_enabled, f"--quantization {q} trains LoRA over frozen {q} weights; add --use-lora (quantized "
             "weights cannot be fine-tuned in full)")
        need(not self.fsdp, f"--quantization {q} cannot be sharded with --fsdp (FSDP2 does not split bitsandbytes "
             "layers); drop --fsdp: with --num-processes N each process holds its own quantized copy (DDP)")
        need(not self.deepspeed, f"--quantization {q} cannot be partitioned by DeepSpeed ZeRO (its bitsandbytes "
             "layers are not DeepSpeed parameters); drop --deepspeed: with --num-processes N each process holds its "
             "own quantized copy (DDP)")

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

    def source_options(self) -> Any:
        """How --data-path / --eval-data-path are read (data.sources.SourceOptions); clips cut from
        recordings go under --feature-cache-dir when one is given."""
        from kimi_lora_cli.data.sources import SourceOptions

        clips = Path(self.feature_cache_dir).expanduser() / "clips" if self.feature_cache_dir else None
        return SourceOptions(format=self.data_format, columns=self.columns, task=self.task, language=self.language,
                             instruction=self.instruction, max_audio_seconds=self.max_audio_seconds, clip_dir=clips)

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
        from kimi_lora_cli.training.trainer_state import default_greater_is_better

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


# Schedules that follow a metric instead of the step count (the trainer steps its schedule once per
# optimizer step, so these cannot be driven).
METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")


def schedule_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType if s.value not in METRIC_DRIVEN]


def check_schedule_name(name: str) -> None:
    names = schedule_names()
    if name in METRIC_DRIVEN:
        raise ConfigError(f"--lr-scheduler-type {name} follows an evaluation metric, not the step count; pick one "
                          f"of {', '.join(names)}")
    if name not in names:
        raise ConfigError(f"--lr-scheduler-type must be one of {', '.join(names)} (got {name!r})")


def aliases() -> dict[str, str]:
    """Other spellings of settings (flags and YAML keys alike) -> the field name."""
    return {alias: f.name for f in fields(TrainConfig) for alias in f.metadata["aliases"]}


def lora_keys() -> tuple[str, ...]:
    """Settings that only mean something with LoRA on (given without --use-lora they are an error)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata["panel"] == P_LORA and f.name != "use_lora")


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
            if text in TRUE_WORDS:
                return True
            if text in FALSE_WORDS:
                return False
            raise ValueError("expected true or false")
        if value is None:
            if "None" in hint:
                return None
            raise ValueError("a value is required")
        if hint.startswith("dict"):
            if isinstance(value, str):
                import json

                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"expected a JSON object: {e.msg} at column {e.colno}") from None
            if not isinstance(value, dict):
                raise ValueError("expected a mapping of names to values, e.g. '{\"min_lr_rate\": 0.1}'")
            return {str(k): v for k, v in value.items()}
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
