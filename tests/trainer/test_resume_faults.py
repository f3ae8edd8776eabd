"""Resume through faults, end to end: the newest checkpoint has a 4 KB zeroed region in a dist-ckpt shard
and ``metrics.jsonl`` ends in a torn line (a full disk). ``--resume auto`` names the bad shard, falls back
to the previous checkpoint, redoes the lost step with the same numbers, and leaves every older
checkpoint as it was; a resume into another vocabulary is refused before any step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from delta_megatron.checkpoint import verify
from delta_megatron.tracking import read_metrics

STEPS = 2
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "delta_megatron.train", "--recipe", "pipelines.tiny_arith_cpu:smoke_config",
           f"logging.dir={out}", f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=5",
           "data.synthetic_digits=1", "logging.progress=false", *extra]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=600,
                          capture_output=True, text=True)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "reward/seconds"} for r in rows]


@pytest.mark.slow
def test_resume_skips_zeroed_shard_and_repairs_torn_metrics(tmp_path):
    out = tmp_path / "run"
    assert _run(out).returncode == 0
    ckpts = out / "checkpoints"
    before = _comparable(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in before] == [0, 1]
    older = {1: json.loads((ckpts / "step_00000001" / "manifest.json").read_text())}

    shard = max((ckpts / "step_00000002" / "actor").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as fh:  # a lost page: same size, 4 KB of zeros
        fh.seek(shard.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "rollout/rew')  # torn by a full disk

    resumed = _run(out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping step_00000002: {shard}: SHA-256 differs" in resumed.stderr
    after = _comparable(read_metrics(out / "metrics.jsonl"))
    assert after == before  # step 1 redone from step 1's checkpoint: the same numbers, torn line gone
    assert (out / "metrics.jsonl").read_text().endswith("}\n")
    for s, manifest in older.items():  # nothing already saved was lost or changed
        assert verify(ckpts / f"step_{s:08d}") == manifest
    verify(ckpts / "step_00000002")  # re-saved, good again

    other = _run(out, "model.vocab_size=18", "--resume", "auto")
    assert other.returncode != 0
    assert "saved for a different model shape — model.vocab_size: checkpoint 17, this run 18" in other.stderr
    assert _comparable(read_metrics(out / "metrics.jsonl")) == before  # the refused run wrote nothing
