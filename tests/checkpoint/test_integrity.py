"""Fault corpus, checkpoints: every way a saved checkpoint's bytes can go bad is detected, named, and
skipped by ``--resume auto`` for the newest one that verifies; nothing older is touched."""

from __future__ import annotations

import json
import logging
import os

import pytest

from delta_megatron.checkpoint import CheckpointError, CheckpointManager, resolve_resume, verify
from delta_megatron.checkpoint.manifest import MANIFEST
from delta_megatron.config import CheckpointConfig, ModelConfig, load_config
from delta_megatron.utils.configs import ConfigError

SHARD = "actor/__0_0.distcp"


def _write(step: int):
    """A checkpoint shaped like the trainer's: a 16 KB shard with step-dependent bytes, small files."""
    def write(d):
        (d / "actor").mkdir()
        (d / SHARD).write_bytes(bytes((step * 7 + i) % 251 for i in range(16384)))
        (d / "actor" / "schedule.pt").write_bytes(b"sched" + bytes([step]))
        (d / "trainer.pt").write_text(json.dumps({"step": step}))
    return write


def _saved(tmp_path, steps=(1, 2, 3), keep=5):
    mgr = CheckpointManager(tmp_path, keep=keep)
    for s in steps:
        mgr.save(s, _write(s), model=ModelConfig())
    return mgr


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)


def _zero_4k(path):  # a lost page: same size, 4 KB of zeros in the middle
    with open(path, "r+b") as fh:
        fh.seek(8192)
        fh.write(b"\0" * 4096)


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(data)


def _empty(path):
    path.write_bytes(b"")


# (name, damage(ckpt_dir), file the error must name, words it must contain)
DAMAGE = [
    ("truncated shard", lambda d: _truncate(d / SHARD), SHARD, "truncated"),
    ("4 KB zeroed shard", lambda d: _zero_4k(d / SHARD), SHARD, "SHA-256 differs"),
    ("bit flip in trainer state", lambda d: _flip_bit(d / "trainer.pt"), "trainer.pt", "SHA-256 differs"),
    ("emptied schedule", lambda d: _empty(d / "actor" / "schedule.pt"), "actor/schedule.pt", "bytes"),
    ("deleted shard", lambda d: (d / SHARD).unlink(), SHARD, "missing"),
    ("stray file", lambda d: (d / "actor" / "extra.bin").write_bytes(b"x"), "actor/extra.bin",
     "not in manifest.json"),
    ("no manifest", lambda d: (d / MANIFEST).unlink(), MANIFEST, "never finished"),
    ("torn manifest", lambda d: (d / MANIFEST).write_text('{"files": {"trai'), MANIFEST, "unreadable"),
]


@pytest.mark.parametrize("name,damage,bad_file,words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_newest_is_skipped_and_named(tmp_path, caplog, name, damage, bad_file, words):
    mgr = _saved(tmp_path)
    newest, older = mgr.step_dir(3), mgr.step_dir(2)
    before = {p: p.read_bytes() for p in older.rglob("*") if p.is_file()}
    damage(newest)

    with pytest.raises(CheckpointError) as err:  # --resume PATH fails naming the file
        resolve_resume(str(newest), tmp_path)
    assert str(newest / bad_file) in str(err.value) and words in str(err.value)

    with caplog.at_level(logging.WARNING, logger="delta_megatron.checkpoint.manager"):
        assert resolve_resume("auto", tmp_path) == older  # auto falls back to the newest good one
    assert f"skipping {newest.name}" in caplog.text and str(newest / bad_file) in caplog.text
    assert {p: p.read_bytes() for p in older.rglob("*") if p.is_file()} == before  # nothing lost
    assert newest.is_dir()  # the bad one is kept for inspection, not deleted


def test_every_file_is_in_the_manifest(tmp_path):
    mgr = _saved(tmp_path, steps=(4,))
    manifest = json.loads((mgr.step_dir(4) / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["actor/__0_0.distcp", "actor/schedule.pt", "trainer.pt"]
    assert manifest["files"][SHARD]["size"] == 16384 and manifest["step"] == 4
    assert manifest["model"]["vocab_size"] == ModelConfig().vocab_size
    assert verify(mgr.step_dir(4))["files"] == manifest["files"]
    assert not list(tmp_path.rglob("*.tmp"))  # manifest written atomically, nothing left behind


def test_all_damaged_refuses_to_restart_from_zero(tmp_path):
    mgr = _saved(tmp_path, steps=(1, 2))
    for s in (1, 2):
        _zero_4k(mgr.step_dir(s) / SHARD)
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies"):
        resolve_resume("auto", tmp_path)
    assert resolve_resume("auto", tmp_path / "fresh") is None  # an empty directory: a new run


def test_unfinished_save_is_ignored(tmp_path):
    mgr = _saved(tmp_path, steps=(1,))
    killed = tmp_path / "step_00000002.tmp"  # a kill between the shards and the manifest
    killed.mkdir()
    _write(2)(killed)
    assert resolve_resume("auto", tmp_path) == mgr.step_dir(1)


@pytest.mark.parametrize("field,value", [("vocab_size", 40), ("hidden_size", 64), ("num_layers", 2),
                                         ("tie_word_embeddings", False), ("arch", "llama")])
def test_other_model_shape_is_refused(tmp_path, field, value):
    _saved(tmp_path, steps=(1,))
    model = ModelConfig(**{field: value})
    with pytest.raises(CheckpointError) as err:
        resolve_resume("auto", tmp_path, model=model)
    assert f"model.{field}: checkpoint {getattr(ModelConfig(), field)!r}, this run {value!r}" in str(err.value)
    assert resolve_resume("auto", tmp_path, model=ModelConfig(init_std=0.5)) is not None  # not a shape


def test_prune_keeps_newest_finished_checkpoint(tmp_path):
    mgr = _saved(tmp_path, steps=(1, 2, 3), keep=1)
    assert mgr.complete_steps() == [3]
    unfinished = mgr.step_dir(4)  # e.g. copied in by hand without a manifest
    unfinished.mkdir()
    mgr._prune()
    assert mgr.complete_steps() == [3, 4]  # the newest *finished* one survives, the other is not ours
    mgr.save(5, _write(5), model=ModelConfig())
    assert mgr.complete_steps() == [5]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_rejected(tmp_path, keep):
    with pytest.raises(ConfigError, match=rf"checkpoint.keep: {keep} — must be >= 1"):
        load_config(overrides=[f"checkpoint.keep={keep}"])
    with pytest.raises(ValueError, match="checkpoint.keep"):
        CheckpointManager(tmp_path, keep=keep)
    assert CheckpointConfig().keep >= 1


def test_every_below_zero_is_rejected():
    with pytest.raises(ConfigError, match=r"checkpoint.every: -1 — must be >= 0"):
        load_config(overrides=["checkpoint.every=-1"])


def test_manifest_is_checked_before_rename(tmp_path, monkeypatch):
    """A save that dies while hashing leaves no step directory (the previous one stays newest)."""
    mgr = _saved(tmp_path, steps=(1,))
    import delta_megatron.checkpoint.manager as manager

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(manager, "write_manifest", boom)
    with pytest.raises(OSError):
        mgr.save(2, _write(2), model=ModelConfig())
    assert mgr.complete_steps() == [1] and resolve_resume("auto", tmp_path) == mgr.step_dir(1)
    assert os.path.isdir(tmp_path / "step_00000002.tmp")
