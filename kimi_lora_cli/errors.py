"""Error types raised by the core; only `cli/` turns them into messages."""


class KimiLoraError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""


class ModelLoadError(KimiLoraError):
    """A model folder, its config or its weights cannot be used."""


class TargetError(KimiLoraError):
    """A LoRA target specification selects nothing or is malformed."""


class DataError(KimiLoraError):
    """A data file (jsonl, audio, token list) is wrong."""


class AdapterError(KimiLoraError):
    """An adapter folder is missing, broken or incompatible with a base model."""


class ConfigError(KimiLoraError):
    """A command option or config file value is wrong."""


class OutputError(KimiLoraError):
    """An output could not be written; the message names the file, what was kept and how to finish."""
