"""What a run tells the user: parameter table, progress (rich bar on a terminal, plain lines
otherwise), logs/metrics.jsonl, optional TensorBoard / W&B, and the loss-curve PNG. Rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, write_atomic
from kimi_lora_cli.formatting import human_count


class Reporter:
    """Console output of a training run. `enabled=False` (ranks > 0) makes every call a no-op."""

    def __init__(self, console: Any = None, rich_progress: bool | None = None, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self.enabled = enabled
        self.rich = self.console.is_terminal if rich_progress is None else rich_progress
        self._progress = None
        self._task = None
        self._start = time.perf_counter()

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def parameter_table(self, rows: list[Any], title: str) -> None:
        if not self.enabled:
            return
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        table.add_column("Component")
        table.add_column("Trainable", justify="right")
        table.add_column("Total", justify="right")
        table.add_column("%", justify="right")
        trainable = total = 0
        for r in rows:
            table.add_row(r.component, human_count(r.trainable), human_count(r.total), f"{r.percent:.3f}")
            trainable += r.trainable
            total += r.total
        table.add_section()
        table.add_row("[bold]all[/]", f"[bold]{human_count(trainable)}[/]", f"[bold]{human_count(total)}[/]",
                      f"[bold]{100.0 * trainable / total if total else 0:.3f}[/]")
        self.console.print(table)

    def start(self, total_steps: int, first_step: int) -> None:
        self._start = time.perf_counter()
        if not self.enabled or not self.rich:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=first_step, info="")

    def step(self, step: int, metrics: dict[str, Any], logged: bool) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            info = (f"epoch {metrics['epoch']:.2f} loss {metrics['loss']:.4f} (text {metrics['text_loss']:.4f} "
                    f"audio {metrics['audio_loss']:.4f}) lr {metrics['learning_rate']:.2e} "
                    f"{metrics.get('tokens_per_second', 0):.0f} tok/s")
            self._progress.update(self._task, completed=step, info=info)
        elif logged:
            self.console.print(
                f"step {step}/{metrics['total_steps']} epoch {metrics['epoch']:.2f} loss {metrics['loss']:.4f} "
                f"text_loss {metrics['text_loss']:.4f} audio_loss {metrics['audio_loss']:.4f} "
                f"lr {metrics['learning_rate']:.3e} tokens/s {metrics.get('tokens_per_second', 0):.0f}",
                soft_wrap=True,
            )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class MetricsLog:
    """logs/metrics.jsonl (one object per logging step or evaluation) + optional trackers."""

    def __init__(self, output_dir: Path, enabled: bool, report_to: str = "none", resume_step: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = output_dir / "logs" / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            # Keep what was logged up to the checkpoint; later lines belong to the interrupted tail.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(rec)
            self.records = kept
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--report-to tensorboard needs the tensorboard package: "
                                  "pip install 'kimi-lora[tensorboard]'") from None
            self._tb = SummaryWriter(str(output_dir / "logs" / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report-to wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(config=config or {}, dir=str(output_dir / "logs"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with naming_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path | None:
    """loss / text_loss / audio_loss (and eval loss) against step; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("loss", "-"), ("text_loss", "--"), ("audio_loss", ":")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts and (key == "loss" or any(v for _, v in pts)):
            ax.plot(*zip(*pts), style, label=key)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
