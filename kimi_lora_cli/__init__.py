"""kimi-lora: LoRA fine-tuning toolkit for Kimi-Audio (version only, keeps `--help` light)."""

__version__ = "0.1.0"
