"""Atomic checkpoints: write everything into ``step_N.tmp``, fsync, then rename and update ``latest``.

A killed run therefore leaves either a complete ``step_N`` directory or an ignorable ``.tmp`` one,
never a half-written checkpoint that ``--resume auto`` would pick. With several ranks, every rank
writes its part into the temporary directory (megatron dist-ckpt shards), a barrier follows, and
rank 0 alone renames and prunes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root`` and the directory itself (before an atomic rename)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it; ``write(tmp_dir)`` writes this rank's part."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        write(tmp)
        _barrier()
        if _rank() == 0:
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune()
        _barrier()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint (``latest`` pointer, else the highest complete step dir)."""
        pointer = self.root / "latest"
        if pointer.exists():
            candidate = self.root / pointer.read_text(encoding="utf-8").strip()
            if candidate.is_dir():
                return candidate
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if p.is_dir() and (m := _STEP_DIR.match(p.name)))

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """``none`` → None; ``auto`` → the latest complete checkpoint under ``root`` (or None);
    anything else is a path that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        return CheckpointManager(root).latest()
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume: {resume!r} is not a checkpoint directory")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
