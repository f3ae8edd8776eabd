"""Metrics sinks (jsonl, TensorBoard, optional W&B) and progress bars, written by rank 0 only.

Every sink receives the same flat ``{name: float}`` dict per step; names use ``/`` to group
(``train/pg_loss``, ``credit/lambda_bar_std``). The jsonl file is the source of truth for plots and
tests; it is appended line by line and flushed so a killed run loses at most the current step. A kill
or a full disk mid-write leaves a torn last line: readers skip it, and a resumed run repairs the file
(drops it, and the steps it will redo) before appending.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from delta_megatron.utils.configs import Section, fail, option

log = logging.getLogger(__name__)


@dataclass
class LoggingConfig(Section):
    dir: str = option("runs/default", "run directory: config.yaml, metrics.jsonl, samples, TensorBoard, "
                                      "checkpoints")
    jsonl: bool = option(True, "write metrics.jsonl (the source of truth for plots and tests)")
    tensorboard: bool = option(True, "write TensorBoard event files")
    wandb_project: str | None = option(None, "Weights & Biases project; null = off")
    progress: bool = option(True, "show a progress bar with a one-line step summary")
    log_every: int = option(1, "steps between sample/credit records (samples.jsonl)", ge=1)
    entropy: bool = option(True, "log the old policy's mean token entropy (one more reduction over the "
                                 "logits; methods that need entropy capture it regardless)")

    def validate(self) -> None:
        if not self.dir.strip():
            fail("dir", self.dir, "a run directory (an empty path would write into the working directory)")
        if self.wandb_project == "":
            fail("wandb_project", "", "a project name or null")


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


class MetricsLogger:
    def __init__(self, log_dir: str | Path, jsonl: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, run_name: str | None = None,
                 config: dict | None = None, resume_step: int | None = None,
                 companions: tuple[str, ...] = ()):
        """``resume_step``: drop records of steps >= it (the resumed run redoes them) from
        ``metrics.jsonl`` and the ``companions`` (other per-step jsonl files in ``log_dir``)."""
        self.dir = Path(log_dir)
        self.enabled = _is_rank0()
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in companions:
                repair_jsonl(self.dir / name, resume_step)
        if jsonl:
            path = self.dir / "metrics.jsonl"
            if resume_step is not None:
                repair_jsonl(path, resume_step)  # drop steps the resumed run will redo
            self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step)
        if wandb_project:
            import wandb  # optional dependency

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                     dir=str(self.dir), resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        flat = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        if not self.enabled:
            return flat
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(flat, step=step)
        return flat

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, record) of every parsable line, and the 1-based numbers of the lines that are not."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(record, dict):
                rows.append((line.rstrip("\n"), record))
            else:
                bad.append(lineno)
    return rows, bad


def repair_jsonl(path: str | Path, before_step: int) -> int:
    """Keep the records of ``path`` with ``step < before_step`` and drop the rest, plus any line that
    does not parse (a torn last line after a kill or a full disk); atomic. Returns lines dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    rows, bad = _parse_lines(path)
    keep = [line for line, rec in rows if rec.get("step", -1) < before_step]
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (line %s%s): torn by a kill or a full disk",
                    path, len(bad), bad[0], ", ..." if len(bad) > 1 else "")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in keep))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(rows) + len(bad) - len(keep)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a metrics jsonl file. A torn last line (a run killed mid-write, or one still
    writing) is skipped; an unreadable line anywhere else is an error naming it."""
    rows, bad = _parse_lines(Path(path))
    if bad:
        with open(path, encoding="utf-8", errors="replace") as fh:
            last = sum(1 for _ in fh)
        if bad != [last]:
            raise ValueError(f"{path}:{bad[0]}: not a JSON object (a metrics file has one per line)")
    return [rec for _, rec in rows]


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar (no-op object when disabled or not rank 0)."""
    if not (enabled and _is_rank0()):
        yield _NullBar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield _Bar(bar, task)


class _Bar:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def advance(self, n: int = 1, summary: str | None = None) -> None:
        """Advance; ``summary`` is printed above the bar (a one-line step report)."""
        if summary:
            self.bar.console.print(summary, highlight=False)
        self.bar.advance(self.task, n)


class _NullBar:
    def advance(self, n: int = 1, summary: str | None = None) -> None:
        pass


def quiet_third_party_warnings() -> None:
    """Silence megatron-core's start-up notices that repeat on every CPU run (no Apex / TE, fallbacks
    it takes by design here); everything else still warns."""
    import warnings

    for pattern in (r".*Apex is not installed.*", r".*Transformer Engine and Apex are not installed.*",
                    r".*full scope is deprecated.*", r".*Implicit initialization of Rerun.*"):
        warnings.filterwarnings("ignore", message=pattern)
