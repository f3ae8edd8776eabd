"""Checkpoint manifests: the size and SHA-256 of every file, and the model shape the weights belong to.

Why: an atomic rename guarantees a checkpoint directory is *complete*, not that its bytes are still the
ones written. A truncated shard used to surface as a bare ``EOFError`` deep in torch, and a 4 KB zeroed
region in a dist-ckpt shard loaded without complaint and resumed with different numbers. The manifest
is written last (after every rank's files are on disk, before the directory is renamed into place),
atomically, so a checkpoint without one was never finished; :func:`verify` re-reads every file and
names the first one that disagrees.

The manifest also records the model config the checkpoint was saved with: a resumed run with a
different shape (``vocab_size`` included, which megatron pads and would otherwise load silently) is
refused with the fields that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "CheckpointError", "write_manifest", "read_manifest", "verify", "has_manifest",
           "check_model", "SHAPE_FIELDS"]

MANIFEST = "manifest.json"
_FORMAT = 1
_CHUNK = 8 << 20

SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_attention_heads", "num_key_value_heads", "kv_channels", "tie_word_embeddings",
                "use_qk_norm", "use_qkv_bias")
"""Model-config values that fix parameter shapes (properties resolve ``head_dim``/``qk_norm``/bias
defaults): a checkpoint loads only into a model that agrees on all of them."""


class CheckpointError(RuntimeError):
    """A checkpoint is unusable; the message names the checkpoint file and what is wrong with it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def _digests(root: Path, files: list[Path]) -> list[str]:
    """SHA-256 of each file; threads overlap the reads (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return list(pool.map(_sha256, files))


def _shared_digests(root: Path, files: list[Path], sizes: list[int]) -> list[str]:
    """:func:`_digests`, the files dealt out over every rank (largest first, round robin) and the
    results all-gathered: a save's shards are read back by as many nodes as wrote them. Collective;
    every rank must list the same files (one shared checkpoint directory, after a barrier). Nothing
    may touch the files after it returns on a rank other than 0: rank 0 may already be renaming them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _digests(root, files)
    rank, world = dist.get_rank(), dist.get_world_size()
    order = sorted(range(len(files)), key=lambda i: (-sizes[i], files[i].as_posix()))
    mine = order[rank::world]
    local = dict(zip(mine, _digests(root, [files[i] for i in mine])))
    parts: list[dict[int, str]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, local)
    merged = {i: h for part in parts for i, h in part.items()}
    return [merged[i] for i in range(len(files))]


def model_record(model: Any) -> dict[str, Any]:
    """The shape-fixing values of a ModelConfig (duck-typed: any object with those attributes)."""
    return {name: getattr(model, name) for name in SHAPE_FIELDS}


def write_manifest(root: str | Path, model: Any = None, **extra: Any) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``root/manifest.json`` atomically (tmp + fsync + rename).

    Call it after every file of the checkpoint is written and fsynced. ``model``: the run's ModelConfig,
    recorded for :func:`check_model`; ``extra`` goes into the manifest as is (JSON values). With
    torch.distributed initialised it is collective: every rank hashes a share, rank 0 writes."""
    import torch.distributed as dist

    root = Path(root)
    files = _files(root)
    sizes = [p.stat().st_size for p in files]
    entries = {p.relative_to(root).as_posix(): {"size": n, "sha256": h}
               for p, n, h in zip(files, sizes, _shared_digests(root, files, sizes))}
    data = {"format": _FORMAT, "files": entries, **extra}
    if model is not None:
        data["model"] = model_record(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return data
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST)
    return data


def has_manifest(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The parsed manifest, or CheckpointError saying why there is none (never finished, unreadable)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing — the checkpoint was never finished (or predates "
                              "manifests); it cannot be verified")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' table)")
    return data


def verify(root: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check that ``root`` holds exactly the manifest's files with their sizes (and SHA-256 unless
    ``checksums=False``); returns the manifest. Raises CheckpointError naming the first bad file."""
    root = Path(root)
    data = read_manifest(root)
    listed: dict[str, dict] = data["files"]
    present = {p.relative_to(root).as_posix(): p for p in _files(root)}
    for rel in sorted(listed):
        if rel not in present:
            raise CheckpointError(f"{root / rel}: missing (listed in {MANIFEST})")
        size = present[rel].stat().st_size
        if size != listed[rel]["size"]:
            raise CheckpointError(f"{root / rel}: {size} bytes, the manifest says {listed[rel]['size']} "
                                  "(truncated or overwritten)")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise CheckpointError(f"{root / extra[0]}: not in {MANIFEST} (written after the checkpoint "
                              f"was finished{f', and {len(extra) - 1} more' if len(extra) > 1 else ''})")
    if checksums:
        names = sorted(listed)
        for rel, digest in zip(names, _digests(root, [present[n] for n in names])):
            if digest != listed[rel]["sha256"]:
                raise CheckpointError(f"{root / rel}: SHA-256 differs from {MANIFEST} (the file's bytes "
                                      "changed after it was saved: disk or copy corruption)")
    return data


def check_model(root: str | Path, manifest: dict[str, Any], model: Any) -> None:
    """Refuse to load a checkpoint saved for another model shape, listing every field that differs."""
    recorded = manifest.get("model")
    if recorded is None:
        raise CheckpointError(f"{Path(root) / MANIFEST}: records no model config; cannot check that "
                              "the checkpoint fits this model")
    current = model_record(model)
    diffs = [f"model.{k}: checkpoint {recorded.get(k)!r}, this run {current[k]!r}"
             for k in SHAPE_FIELDS if recorded.get(k) != current[k]]
    if diffs:
        raise CheckpointError(f"{root}: saved for a different model shape — " + "; ".join(diffs)
                              + ". A checkpoint loads only into the model it was saved from; resume with "
                              "the original model settings or start a new run (checkpoint.resume=none).")
