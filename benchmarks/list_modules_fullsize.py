"""list-modules on the full-size release config.json (9.8B params, no weights) vs importing torch.

    python benchmarks/list_modules_fullsize.py

Targets (issue #2): wall time <= 1.5x `python -c "import torch, transformers"`, peak RSS < 1 GB,
no weight read (the folder holds config.json only). Also times `kimi-lora --help` (target < 0.3 s).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _util import run_measured  # noqa: E402

from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig  # noqa: E402


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "Kimi-Audio-7B-Instruct"
        folder.mkdir()
        cfg = KimiAudioConfig().to_dict()
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        imp_t, imp_rss = run_measured([sys.executable, "-c", "import torch, transformers"], repeat=repeat)
        lm_t, lm_rss = run_measured([sys.executable, "-m", "kimi_lora_cli", "list-modules", str(folder)],
                                    repeat=repeat)
        lmj_t, _ = run_measured([sys.executable, "-m", "kimi_lora_cli", "list-modules", str(folder), "--json"],
                                repeat=repeat)
        help_t, help_rss = run_measured([sys.executable, "-m", "kimi_lora_cli", "--help"], repeat=repeat)
        base_t, _ = run_measured([sys.executable, "-c", "pass"], repeat=repeat)
    print(f"python -c 'import torch, transformers': {imp_t:.2f} s, peak RSS {imp_rss:.0f} MB")
    print(f"kimi-lora list-modules (full-size config): {lm_t:.2f} s, peak RSS {lm_rss:.0f} MB "
          f"-> {lm_t / imp_t:.2f}x import time (target <= 1.5x), RSS {'<' if lm_rss < 1024 else '>='} 1 GB")
    print(f"kimi-lora list-modules --json: {lmj_t:.2f} s ({lmj_t / imp_t:.2f}x import time)")
    print(f"kimi-lora --help: {help_t:.3f} s (bare python start {base_t:.3f} s), peak RSS {help_rss:.0f} MB "
          f"(target < 0.3 s)")


if __name__ == "__main__":
    main()
