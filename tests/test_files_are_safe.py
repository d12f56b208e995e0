"""A user's files are safe: train's output folder (used folders, --overwrite-output-dir, resume
settings, rotation, stale entries, locks), no code from checkpoint files, OS errors named with
nothing half-written, SIGTERM exits 143, audio paths found through the current folder."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A two-step run that saves a checkpoint after each step.
SMALL_RUN = ("--lora-rank", "2", "--lora-target", "q_proj", "--logging-steps", "1", "--max-steps", "2",
             "--save-steps", "1")


@pytest.fixture(scope="module")
def finished_run(train_args, tmp_path_factory, tiny_dir, data):
    """A train output folder with checkpoint-1, checkpoint-2 and the adapter (copy it before use)."""
    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    out = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(app, [str(a) for a in train_args(data, out, *SMALL_RUN)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def _series(folder: Path) -> str:
    return json.loads((folder / ".kimi-lora.json").read_text())["series"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -------------------------------------------------------------------------------------------
# train's output folder (items 4, 5, 6)
# -------------------------------------------------------------------------------------------


def test_overwrite_output_dir_removes_only_the_previous_runs_files(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    (out / "mine.txt").write_text("a user's notes")
    foreign = shutil.copytree(out / "checkpoint-1", out / "checkpoint-9")  # another run's checkpoint
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "series": "0ther0series"}))
    old_adapter = load_file(str(out / "adapter_model.safetensors"))
    old_series = _series(out)

    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--overwrite-output-dir", "--max-steps", "1",
                                      "--save-steps", "5"))
    assert code == 0, stderr
    assert not (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    assert (out / "checkpoint-9").is_dir() and (out / "mine.txt").read_text() == "a user's notes"
    assert "kept checkpoint-9, mine.txt" in " ".join(stderr.split())
    new_adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(old_adapter[k], new_adapter[k]) for k in old_adapter)  # 1 step, not 2
    assert _series(out) != old_series and not (out / ".kimi-lora.lock").exists()
    steps = [json.loads(x)["step"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_a_resume_may_change_steps_and_learning_rate_and_says_so(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest", "--max-steps", "3",
                                      "--learning-rate", "5e-4"))
    assert code == 0, stderr
    text = " ".join(stderr.split())
    assert "Resuming with max_steps 2 -> 3" in text and "Resuming with learning_rate 0.0001 -> 0.0005" in text
    records = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["learning_rate"] != records[-2]["learning_rate"]


def test_rotation_and_start_up_remove_only_this_runs_entries(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    foreign = shutil.copytree(out / "checkpoint-1", out / "checkpoint-7")
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "series": "another0run0"}))
    host = socket.gethostname()
    killed = out / ".tmp-checkpoint-5-0123456789ab"  # a killed run of this tool: name + marker
    killed.mkdir()
    (killed / ".kimi-lora.json").write_text(json.dumps({"tool": "kimi-lora", "command": "train", "host": host}))
    (killed / "optimizer.pt").write_bytes(b"x" * 100)
    (out / ".train_config.yaml.0123456789ab.tmp").write_text("half")
    unmarked = out / ".tmp-final-abcdefabcdef"  # the name matches, but nothing says kimi-lora wrote it
    unmarked.mkdir()
    (out / ".tmp-notes").write_text("a user's file")

    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", out / "checkpoint-2",
                                      "--max-steps", "4", "--save-total-limit", "1"))
    assert code == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-4" in names and "checkpoint-7" in names  # another run's checkpoint is never rotated
    assert not {"checkpoint-1", "checkpoint-2", "checkpoint-3"} & set(names)
    assert not killed.exists() and not (out / ".train_config.yaml.0123456789ab.tmp").exists()
    assert unmarked.is_dir() and (out / ".tmp-notes").read_text() == "a user's file"
    assert "removed 2 unfinished entries of an interrupted run" in " ".join(stderr.split())


def test_a_lock_stops_a_second_run_and_a_dead_runs_lock_is_taken_over(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    lock = out / ".kimi-lora.lock"
    resume = train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest", "--max-steps", "3")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        body = json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "command": "train", "started": "t"})
        lock.write_text(body)
        code, _, stderr = cli(*resume)
    finally:
        sleeper.kill()
        sleeper.wait()
    text = " ".join(stderr.split())
    assert code == 1 and f"is in use by `kimi-lora train` (pid {sleeper.pid}" in text and f"delete {lock}" in text
    assert lock.read_text() == body and not (out / "checkpoint-3").exists()

    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "command": "train"}))
    code, _, stderr = cli(*resume)
    assert code == 1 and "locked by a `kimi-lora train` run on host elsewhere" in " ".join(stderr.split())

    dead = _dead_pid()
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train"}))
    code, _, stderr = cli(*resume)
    assert code == 0, stderr
    assert f"took over the lock of an earlier `kimi-lora train` (pid {dead})" in " ".join(stderr.split())
    assert not lock.exists() and (out / "checkpoint-3").is_dir()


@pytest.mark.slow
def test_two_runs_on_one_folder_and_sigterm(train_args, tmp_path, tiny_dir, data, cli):
    """A second train on a folder a live run writes is refused; SIGTERM stops the first at a step
    boundary with a checkpoint and exit 143."""
    out = tmp_path / "live"
    cmd = [sys.executable, "-m", "kimi_lora_cli", *map(str, train_args(data, out, *SMALL_RUN, "--max-steps", "100000",
                                                                        "--save-steps", "100000"))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stderr:
            if line.startswith("step 2/"):
                break
        code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--overwrite-output-dir"))
        assert code == 1 and f"is in use by `kimi-lora train` (pid {proc.pid}" in " ".join(stderr.split())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    found = sorted(out.glob("checkpoint-*"))
    assert len(found) == 1 and (found[0] / "trainer_state.json").is_file()
    assert not (out / ".kimi-lora.lock").exists() and (out / "logs" / "metrics.jsonl").is_file()


# -------------------------------------------------------------------------------------------
# No code from checkpoint files (item 10)
# -------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.mkdir(path): the proof that a loader ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(train_args, cli, tiny_dir, data, finished_run, tmp_path, victim):
    out = shutil.copytree(finished_run, tmp_path / "run")
    proof = tmp_path / "code-ran"
    if victim == "rng_state_0.pt":  # the file name of earlier versions, still read when there is no .json
        (out / "checkpoint-2" / "rng_state_0.json").unlink()
    torch.save({"state": RunsCode(str(proof))}, out / "checkpoint-2" / victim)
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest", "--max-steps", "3"))
    text = " ".join(stderr.split())
    assert code == 1 and not proof.exists()
    assert f"{out / 'checkpoint-2' / victim}: refused" in text and "could run code" in text
    assert not (out / "checkpoint-3").exists() and not (out / ".kimi-lora.lock").exists()


def test_checkpoints_hold_no_pickled_objects(finished_run):
    """Every .pt file of a checkpoint loads with weights_only=True; the RNG state is JSON."""
    ck = finished_run / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt"):
        assert isinstance(torch.load(ck / name, weights_only=True), dict)
    assert set(json.loads((ck / "rng_state_0.json").read_text())) >= {"python", "numpy", "torch"}
    assert not list(ck.glob("rng_state_*.pt"))


def test_old_rng_pickles_still_resume_without_code(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    """rng_state_N.pt of earlier versions (numpy arrays inside) load with weights_only=True."""
    import random

    import numpy as np

    out = shutil.copytree(finished_run, tmp_path / "run")
    ck = out / "checkpoint-2"
    (ck / "rng_state_0.json").unlink()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               ck / "rng_state_0.pt")
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest", "--max-steps", "3"))
    assert code == 0, stderr


# -------------------------------------------------------------------------------------------
# OS errors are named, nothing half-written (item 11)
# -------------------------------------------------------------------------------------------


def test_file_size_limit_during_merge_is_one_line_and_leaves_nothing(tiny_dir, tmp_path):
    """A real EFBIG: the merge runs with RLIMIT_FSIZE below its shard size."""
    from adapter_helpers import make_adapter

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    out = tmp_path / "merged"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    proc = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "merge", "-m", str(tiny_dir), "-a", str(adapter),
                           "-o", str(out)], env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr
    assert "file too large" in text and "(EFBIG)" in text and ".safetensors" in text and "Traceback" not in text
    assert proc.stderr.count("Error:") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_no_space_while_saving_a_checkpoint(train_args, cli, tiny_dir, data, tmp_path, monkeypatch):
    """ENOSPC as safetensors reports it (its own exception type, errno in the text)."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN))
    text = " ".join(stderr.split())
    assert code == 1 and "no space left on the device (ENOSPC)" in text and "trainable.safetensors" in text
    assert "unexpected" not in text and "Traceback" not in stderr
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-*"))
    assert not (out / ".kimi-lora.lock").exists()


@pytest.mark.parametrize("code_, cause", [(errno.EROFS, "read-only file system (EROFS)"),
                                          (errno.EACCES, "permission denied (EACCES)")])
def test_read_only_or_forbidden_output_is_named(cli, tiny_dir, data, tmp_path, monkeypatch, code_, cause):
    """prepare and infer writing where they may not (the OS refuses at open)."""
    import builtins

    import kimi_lora_cli.data.prepare as prepare_mod
    import kimi_lora_cli.inference.predictions as predictions_mod

    def refusing_open(path, mode="r", *args, **kwargs):
        if any(m in mode for m in "wa+"):
            raise OSError(code_, os.strerror(code_), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "open", refusing_open, raising=False)
    monkeypatch.setattr(predictions_mod, "open", refusing_open, raising=False)
    out = tmp_path / "ro" / "out.jsonl"
    code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", data, "-o", out)
    text = " ".join(stderr.split())
    assert code == 1 and f"{out}.partial: {cause}" in text and not out.exists()
    preds = tmp_path / "ro" / "preds.jsonl"
    code, _, stderr = cli("infer", "-m", tiny_dir, "-d", data, "-o", preds, "--max-new-tokens", "2")
    assert code == 1 and f"{preds}.partial: {cause}" in " ".join(stderr.split()) and not preds.exists()


# -------------------------------------------------------------------------------------------
# SIGTERM (item 14)
# -------------------------------------------------------------------------------------------


def test_sigterm_exits_143_and_a_merge_leaves_no_partial(cli, tiny_dir, tmp_path, monkeypatch):
    from adapter_helpers import make_adapter

    import kimi_lora_cli.adapters.merge as merge_mod
    from kimi_lora_cli.cli._output import on_sigterm

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    real = merge_mod._write_shards

    def killed_midway(tmp, *args, **kwargs):
        (tmp / "model-1-of-1.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(merge_mod, "_write_shards", killed_midway)
    previous = signal.signal(signal.SIGTERM, on_sigterm)  # what main() installs
    try:
        code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "out")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "Terminated." in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -------------------------------------------------------------------------------------------
# Audio paths through the current folder (item 14)
# -------------------------------------------------------------------------------------------


def test_cwd_fallback_paths_are_said_once_and_written_resolved(train_args, cli, tiny_dir, data, tmp_path, monkeypatch):
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "lines.jsonl"  # its audio paths now resolve only from data's folder
    moved.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(data.parent)
    out = tmp_path / "prepared.jsonl"
    code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", moved, "-o", out)
    assert code == 0, stderr
    text = " ".join(stderr.split())
    assert text.count("were found relative to the current folder") == 1 and f"{len(rows)} audio paths" in text
    for line in out.read_text().splitlines():
        for m in json.loads(line)["conversation"]:
            if m["message_type"] == "audio":
                assert Path(m["content"]).is_absolute() and Path(m["content"]).is_file()
    code, _, stderr = cli(*train_args(moved, tmp_path / "t", *SMALL_RUN, "--max-steps", "1"))
    assert code == 0, stderr
    assert " ".join(stderr.split()).count("were found relative to the current folder") == 1


def test_feature_cache_drops_only_dead_runs_temporary_files(tiny, tmp_path):
    from kimi_lora_cli.data.features import FeatureStore

    digest = "ab" * 32
    dead = tmp_path / f".{digest}.safetensors.{_dead_pid()}.tmp"
    mine = tmp_path / f".{digest}.safetensors.{os.getpid()}.tmp"
    other = tmp_path / f".{digest}.safetensors.notes.tmp"  # not our name pattern
    for f in (dead, mine, other):
        f.write_bytes(b"partial")
    FeatureStore(tiny.feature_encoder, cache_dir=tmp_path)
    assert not dead.exists() and mine.exists() and other.exists()


# -------------------------------------------------------------------------------------------
# Issue 22: concurrent runs, kills at named moments, full disks, crafted pickles
# -------------------------------------------------------------------------------------------

PAUSE = REPO / "tests" / "_pause_at.py"


def _paused(where: Path, call: str, pattern: str, *args) -> tuple[subprocess.Popen, dict]:
    """A real `kimi-lora` process stopped for good at the first `call` on a path matching `pattern`
    (see tests/_pause_at.py); returns it once it got there."""
    import time

    ready = where / "paused.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(PAUSE), str(ready), call, pattern, *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(6000):  # a bound, not a timing: the run normally gets there in seconds
        if ready.exists():
            return proc, json.loads(ready.read_text())
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {call} {pattern}: {proc.communicate()[1]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run never reached {call} {pattern}")


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture()
def spare(tmp_path):
    """A folder for the pause marker, outside every output."""
    (tmp_path / "spare").mkdir()
    return tmp_path / "spare"


def test_two_prepares_into_one_output(cli, tiny_dir, data, tmp_path, spare):
    """The second run is refused in one line naming the first; after the first is killed, the
    second takes over and the output is all its own lines (no torn or foreign line)."""
    out = tmp_path / "out" / "prep.jsonl"
    other = shutil.copytree(data.parent, tmp_path / "b-data") / "b.jsonl"  # the same clips, 2 lines
    other.write_text("".join(line + "\n" for line in data.read_text().splitlines()[:2]))
    first, _ = _paused(spare, "open", f"{out}.partial*", "prepare", "-m", tiny_dir, "-d", data, "-o", out)
    try:
        code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", other, "-o", out)
        text = " ".join(stderr.split())
        assert code == 1 and f"{out} is in use by `kimi-lora prepare` (pid {first.pid}" in text, text
    finally:
        _kill(first)
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "-d", other, "-o", out)
    assert code == 0, stderr
    assert f"took over the lock of an earlier `kimi-lora prepare` (pid {first.pid})" in " ".join(stderr.split())
    assert len(_lines(out)) == 2 and "Wrote" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == [".prep.jsonl.kimi-lora.json", "prep.jsonl"]


def test_two_infers_into_one_output(cli, tiny_dir, data, tmp_path, spare):
    out = tmp_path / "preds.jsonl"
    args = ("infer", "-m", tiny_dir, "-d", data, "-o", out, "--max-new-tokens", "2", "--device", "cpu")
    first, _ = _paused(spare, "open", f"{out}*", *args)
    try:
        code, _, stderr = cli(*args, "--seed", "3")
        text = " ".join(stderr.split())
        assert code == 1 and f"{out} is in use by `kimi-lora infer` (pid {first.pid}" in text, text
        assert not out.exists()
    finally:
        _kill(first)
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    records = _lines(out)
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    assert not list(tmp_path.glob("preds.jsonl.*")) and not list(tmp_path.glob(".preds.jsonl.*"))


def test_two_merges_into_one_output(cli, tiny_dir, tmp_path, spare):
    from adapter_helpers import make_adapter

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    out = tmp_path / "merged"
    args = ("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--overwrite")
    first, _ = _paused(spare, "mkdir", str(tmp_path / ".merged.partial-*"), *args)
    try:
        code, _, stderr = cli(*args)
        text = " ".join(stderr.split())
        assert code == 1 and f"{out} is in use by `kimi-lora merge` (pid {first.pid}" in text, text
    finally:
        _kill(first)
    code, _, stderr = cli(*args)
    assert code == 0, stderr and (out / "config.json").is_file()


def test_a_merge_killed_while_removing_the_old_output_is_cleaned(cli, tiny_dir, tmp_path, spare):
    from adapter_helpers import make_adapter

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    out = tmp_path / "merged"
    args = ("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--overwrite")
    assert cli(*args)[0] == 0
    proc, at = _paused(spare, "rmdir", str(tmp_path / ".merged.old-*"), *args)  # its files are gone already
    _kill(proc)
    left = Path(at["path"])
    assert left.is_dir() and not (left / ".kimi-lora.json").exists()
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert not left.exists() and f"removed{left}" in "".join(stderr.split())  # rich may wrap inside the path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_merge_killed_right_after_creating_its_partial_folder_is_cleaned(cli, tiny_dir, tmp_path, spare):
    from adapter_helpers import make_adapter

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    out = tmp_path / "merged"
    args = ("merge", "-m", tiny_dir, "-a", adapter, "-o", out)
    proc, _ = _paused(spare, "open", str(tmp_path / ".merged.partial-*" / "*kimi-lora.json*"), *args)
    _kill(proc)
    left = tmp_path / f".merged.partial-{proc.pid}"
    assert left.is_dir() and not (left / ".kimi-lora.json").exists()
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert not left.exists() and f"removed{left}" in "".join(stderr.split()) and (out / "config.json").is_file()


def test_a_train_killed_while_starting_a_checkpoint_is_cleaned_by_the_resume(train_args, cli, tiny_dir, data, tmp_path, spare):
    out = tmp_path / "run"
    args = train_args(data, out, *SMALL_RUN)
    proc, _ = _paused(spare, "open", str(out / ".tmp-checkpoint-2-*" / "*kimi-lora.json*"), *args)
    _kill(proc)
    left = list(out.glob(".tmp-checkpoint-2-*"))
    assert len(left) == 1 and not (left[0] / ".kimi-lora.json").exists()
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest"))
    assert code == 0, stderr
    assert not left[0].exists() and "removed 1 unfinished entries of an interrupted run" in " ".join(stderr.split())
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


class _FullDisk:
    """A file whose writes fail as a full disk does: OSError ENOSPC without a file name."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full_for(monkeypatch, name: str) -> None:
    """Every open-for-writing of a file whose path starts with `name` gets a full disk."""
    import builtins
    import io

    real = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if any(m in mode for m in "wax+") and os.fspath(file).startswith(name):
            return _FullDisk(f)
        return f

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)


def test_full_disk_after_the_final_adapter_names_the_file_and_says_it_is_complete(train_args, cli, tiny_dir, data, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    _disk_full_for(monkeypatch, str(out / ".README.md"))  # the card, written aside first
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--save-steps", "1000"))
    text = " ".join(stderr.split())
    assert code == 1 and "Traceback" not in stderr and text.count("Error") == 1, text
    assert f"{out / 'README.md'}: no space left on the device (ENOSPC)" in text
    assert "the adapter in" in text and "is complete and loads (step 2)" in text
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / ".kimi-lora.lock").exists()
    assert load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("save_steps", ["1", "1000"])
def test_full_disk_in_the_final_save_says_how_to_finish_and_that_works(train_args, cli, tiny_dir, data, tmp_path, monkeypatch,
                                                                       save_steps):
    """With a checkpoint: resume from it. Without (the run died before its first checkpoint): the
    same command starts over in the folder - and a resume says so instead of sending the user
    back and forth (item 5)."""
    import peft.peft_model

    out = tmp_path / "run"
    real = peft.peft_model.safe_save_file

    def full_for_the_final(tensors, filename, *args, **kwargs):  # as safetensors reports it
        if ".tmp-final-" in str(filename):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_for_the_final)
    args = train_args(data, out, *SMALL_RUN, "--save-steps", save_steps)
    code, _, stderr = cli(*args)
    text = " ".join(stderr.split())
    assert code == 1 and "(ENOSPC)" in text and "adapter_model.safetensors" in text and "Traceback" not in stderr
    assert "the final adapter was not saved" in text
    assert not list(out.glob(".tmp-*")) and not (out / ".kimi-lora.lock").exists()
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)  # space freed
    if save_steps == "1":
        assert "--resume-from-checkpoint latest (continues from checkpoint-2)" in text
        code, _, stderr = cli(*args, "--resume-from-checkpoint", "latest")
    else:
        assert "rerun the same command" in text
        code, _, stderr = cli(*args, "--resume-from-checkpoint", "latest")
        text = " ".join(stderr.split())
        assert code == 1 and "drop --resume-from-checkpoint to start over in this folder" in text, text
        code, _, stderr = cli(*args)
        assert "stopped before its first checkpoint; starting over" in " ".join(stderr.split())
        assert list((out / "logs").glob("metrics.*.jsonl"))  # the earlier run's metrics kept aside
    assert code == 0, stderr
    assert load_file(str(out / "adapter_model.safetensors"))


def test_a_real_full_disk_is_named(train_args, tiny_dir, data, tmp_path):
    """A 16 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = mnt / "run"
        proc = subprocess.run([sys.executable, "-m", "kimi_lora_cli", *map(str, train_args(data, out, *SMALL_RUN))],
                              env=ENV, capture_output=True, text=True, timeout=300)
        text = " ".join(proc.stderr.split())
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and text.count("Error:") == 1, text
        assert ": no space left on the device (ENOSPC)" in text and f"Error: {mnt}" in text
        assert "unexpected" not in text and not (out / ".kimi-lora.lock").exists()
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_crafted_pickle_gets_the_same_refusal_in_every_command(cli, tiny_dir, tmp_path):
    from adapter_helpers import make_adapter

    proof = tmp_path / "code-ran"
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**state, "x": RunsCode(str(proof))}, adapter / "adapter_model.bin")
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    for f in [*model.glob("model-*.safetensors"), model / "model.safetensors.index.json"]:
        f.unlink()
    torch.save({"x": RunsCode(str(proof))}, model / "pytorch_model.bin")
    runs = {
        "infer-adapter": (adapter / "adapter_model.bin", ["infer", "-m", tiny_dir, "-a", adapter, "--prompt", "hi",
                                                          "--max-new-tokens", "1", "--allow-pickle"]),
        "merge": (adapter / "adapter_model.bin", ["merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "m",
                                                  "--allow-pickle"]),
        "inspect-adapter": (adapter / "adapter_model.bin", ["inspect-adapter", adapter, "--allow-pickle"]),
        "infer-model": (model / "pytorch_model.bin", ["infer", "-m", model, "--prompt", "hi", "--max-new-tokens", "1",
                                                      "--allow-pickle"]),
    }
    for name, (path, argv) in runs.items():
        code, _, stderr = cli(*argv)
        text = " ".join(stderr.split())
        assert code == 1 and not proof.exists(), (name, text)
        assert f"{path}: refused - it holds Python objects (posix.mkdir), which could run code" in text, (name, text)
        assert "weights_only=False" not in text and "unexpected" not in text, (name, text)


def test_a_resume_mismatch_points_at_the_folder_in_use(train_args, cli, tiny_dir, data, finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "moved")
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, "--resume-from-checkpoint", "latest", "--lora-rank", "4"))
    text = " ".join(stderr.split())
    assert code == 1 and f"--config {out / 'train_config.yaml'}" in text, text


def test_a_train_failing_before_it_starts_leaves_no_folder(train_args, cli, tiny_dir, data, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])  # the header reads, the tensors do not
    out = tmp_path / "run"
    code, _, stderr = cli(*train_args(data, out, *SMALL_RUN, model=model))
    assert code == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_copy_errors_name_the_file_that_could_not_be_written():
    from kimi_lora_cli.fileops import describe_os_error

    text = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/src/a.bin", None, "/dst/a.bin"))
    assert text.startswith("/dst/a.bin: no space left on the device (copying /src/a.bin) (ENOSPC)")
    assert "--max-shard-size" not in describe_os_error(OSError(errno.EFBIG, "File too large", "/x"))


def test_prepare_prints_no_empty_progress_line(cli, tiny_dir, data, tmp_path):
    code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", data, "-o", tmp_path / "p.jsonl")
    assert code == 0, stderr
    assert "prepare: 0/" not in stderr


def test_prepare_overwrite_replaces_only_its_own_files(cli, tiny_dir, data, tmp_path):
    out = tmp_path / "p.jsonl"
    assert cli("prepare", "-m", tiny_dir, "-d", data, "-o", out)[0] == 0
    code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", data, "-o", out)
    assert code == 1 and "written by an earlier `kimi-lora prepare`); pass --overwrite" in " ".join(stderr.split())
    assert cli("prepare", "-m", tiny_dir, "-d", data, "-o", out, "--overwrite")[0] == 0
    out.write_text(out.read_text() + "\n")  # edited by the user since: no longer prepare's file
    code, _, stderr = cli("prepare", "-m", tiny_dir, "-d", data, "-o", out, "--overwrite")
    assert code == 1 and "is not a file `kimi-lora prepare` wrote" in " ".join(stderr.split())
    assert out.read_text().endswith("\n\n")
