"""kimi-lora: LoRA fine-tuning toolkit for Kimi-Audio (version only, keeps `--help` light)."""

from kimi_lora_cli.quantization import guard_bitsandbytes_import

__version__ = "0.1.0"

# Whoever imports bitsandbytes (peft does on `import peft`), it must not fetch kernels from the Hub
# nor advise trusting remote code; installing the guard imports nothing.
guard_bitsandbytes_import()
