"""`kimi-lora --help` stays light; list-modules output and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "soundfile", "pyarrow")


def _modules_after(code: str, env_extra: dict | None = None) -> tuple[set[str], str]:
    env = {**os.environ, **(env_extra or {})}
    probe = code + "\nimport sys, json; print('\\n@@' + json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout
    mods = set(json.loads(out.rsplit("@@", 1)[1])) if "@@" in out else set()
    return mods, out + proc.stderr


def test_help_lists_commands_without_heavy_imports():
    code = ("import sys\nsys.argv=['kimi-lora','--help']\nfrom kimi_lora_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    mods, out = _modules_after(code)
    assert "list-modules" in out
    for name in HEAVY:
        assert name not in mods, f"--help imported {name}"


def test_completion_request_is_light():
    code = ("import sys\nsys.argv=['kimi-lora']\nfrom kimi_lora_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    mods, out = _modules_after(code, {"_KIMI_LORA_COMPLETE": "complete_bash", "COMP_WORDS": "kimi-lora li",
                                      "COMP_CWORD": "1"})
    assert "list-modules" in out
    for name in HEAVY:
        assert name not in mods


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("kimi-lora ")


def test_list_modules_table(cli, tiny_dir):
    code, out, _ = cli("list-modules", tiny_dir, "--target", "q_proj,v_proj", "--rank", "4")
    assert code == 0
    assert "model.layers.{0-2}.self_attn.q_proj" in out and "model.mimo_layers.{0-1}.self_attn.v_proj" in out
    assert "12 modules" in out and "Whisper" in out


def test_list_modules_json(cli, tiny_dir, tiny):
    code, out, _ = cli("list-modules", tiny_dir, "--json", "-t", "mimo", "-r", "2")
    assert code == 0
    data = json.loads(out)
    targeted = [m for m in data["modules"] if m["targeted"]]
    assert {m["component"] for m in targeted} == {"mimo"}
    assert data["lora_params"] == sum(2 * (m["in_features"] + m["out_features"]) for m in targeted)
    assert data["base_params"] == sum(p.numel() for p in tiny.model.parameters())
    for m in data["modules"]:
        assert {"name", "in_features", "out_features", "params", "component", "targeted"} <= m.keys()


def test_errors_are_one_line_without_traceback(tmp_path, tiny_dir):
    cases = [
        ([str(tmp_path / "missing")], "no such folder"),
        ([str(tmp_path)], "config.json: not found"),
        ([str(tiny_dir), "-t", "q_prj"], "closest names: q_proj"),
    ]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "list-modules", *args],
                              capture_output=True, text=True, env={**os.environ, "KIMI_LORA_DEBUG": "0"})
        assert proc.returncode != 0
        assert needle in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_debug_env_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "list-modules", str(tmp_path / "missing")],
                          capture_output=True, text=True, env={**os.environ, "KIMI_LORA_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_list_modules_at_80_columns_never_breaks_a_name(cli, tiny_dir, monkeypatch):
    from kimi_lora_cli.cli._output import out as console

    code, payload, _ = cli("list-modules", tiny_dir, "--json")
    names = {m["name"] for m in json.loads(payload)["modules"]}
    monkeypatch.setattr(console, "width", 80)
    code, out, _ = cli("list-modules", tiny_dir)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    cells = {line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")}
    patterns = {c for c in cells if c}
    # every pattern cell is a whole module pattern (one line), covering the module names
    assert "model.mimo_layers.{0-1}.self_attn.k_proj" in patterns and "lm_head" in patterns
    assert all(c.startswith(("model.", "whisper.")) or c in ("lm_head", "mimo_output") for c in patterns)
    assert len(patterns) < len(names) and "--json has them" in " ".join(out.split())
