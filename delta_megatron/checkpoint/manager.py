"""Atomic, verified checkpoints: write everything into ``step_N.tmp``, fsync, write the manifest
(sizes and SHA-256 of every file, see :mod:`~delta_megatron.checkpoint.manifest`), then rename and
update ``latest``.

A killed run therefore leaves either a complete ``step_N`` directory or an ignorable ``.tmp`` one,
never a half-written checkpoint that ``--resume auto`` would pick; a checkpoint whose bytes changed
later (truncated, zeroed, bit rot) fails verification, and ``--resume auto`` falls back to the newest
one that verifies. With several ranks, every rank writes its part into the temporary directory
(megatron dist-ckpt shards), a barrier follows, every rank hashes a share of the files, and rank 0
writes the manifest, renames and prunes.
"""

from __future__ import annotations

import logging
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

from delta_megatron.checkpoint.manifest import (
    CheckpointError,
    check_model,
    has_manifest,
    verify,
    write_manifest,
)
from delta_megatron.parallel import broadcast_object

log = logging.getLogger(__name__)
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
    _fsync_dir(root)


def _fsync_dir(root: Path) -> None:
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
    """``keep``: how many finished checkpoints to keep (>= 1; the newest one is never pruned)."""

    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"checkpoint.keep: {keep!r} — must be >= 1 (0 would delete every checkpoint)")
        self.root = Path(root)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, step: int, write: Callable[[Path], None], model: Any = None) -> Path:
        """Collective: every rank calls it; ``write(tmp_dir)`` writes this rank's part. ``model`` (the
        ModelConfig) is recorded in the manifest so a resume into another shape is refused."""
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
        write_manifest(tmp, model=model, step=step)  # last (every rank hashes a share, rank 0 writes):
        if _rank() == 0:  # a checkpoint without a manifest is unfinished
            _fsync_dir(tmp)
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
        """Delete checkpoints older than the ``keep`` newest finished ones (those with a manifest).
        Unfinished directories newer than those are left alone, so pruning never removes the newest
        finished checkpoint, whatever else the directory holds."""
        steps = self.complete_steps()
        finished = [s for s in steps if has_manifest(self.step_dir(s))]
        if finished:
            oldest_kept = finished[-min(self.keep, len(finished)):][0]
            for step in steps:
                if step < oldest_kept:
                    shutil.rmtree(self.step_dir(step), ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def newest_verified(self) -> Path | None:
        """The newest checkpoint that passes :func:`verify`; each one skipped is logged with why."""
        for step in reversed(self.complete_steps()):
            path = self.step_dir(step)
            try:
                verify(path)
            except CheckpointError as err:
                log.warning("checkpoint.resume=auto: skipping %s: %s", path.name, err)
                continue
            return path
        return None


def _select(resume: str, root: str | Path, model: Any) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        path = CheckpointManager(root).newest_verified()
        if path is None:
            if CheckpointManager(root).complete_steps():
                raise CheckpointError(f"checkpoint.resume=auto: no checkpoint under {root} verifies (see "
                                      "the warnings above); refusing to restart silently from step 0 — "
                                      "set checkpoint.resume=none to start over")
            return None
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume: {resume!r} is not a checkpoint directory")
    manifest = verify(path)
    if model is not None:
        check_model(path, manifest, model)
    return path


def resolve_resume(resume: str, root: str | Path, model: Any = None) -> Path | None:
    """``none`` → None; ``auto`` → the newest checkpoint under ``root`` that verifies (None when there
    is none yet); anything else is a checkpoint directory that must exist and verify.

    Rank 0 verifies (reads every file once) and every rank receives its answer, or its error.
    ``model`` (the ModelConfig) must match the shape the checkpoint recorded."""
    result: Any = None
    if _rank() == 0:
        try:
            result = _select(resume, root, model)
        except (CheckpointError, FileNotFoundError) as err:
            result = err
    result = broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


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
