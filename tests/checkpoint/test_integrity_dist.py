"""Checkpoint manifests with several ranks (torchrun, gloo): every rank's shard is in the manifest with
its own checksum (the ranks hash shares of the files), and every rank resumes from the same, verified
checkpoint or gets the same error naming the bad shard."""

import hashlib
import json

import pytest

from delta_megatron.checkpoint import verify
from tests.dist.mg_common import torchrun


@pytest.mark.slow
@pytest.mark.dist
def test_manifest_and_resume_agree_over_ranks(tmp_path):
    world = 3
    torchrun("checkpoint_worker.py", world, ["--root", str(tmp_path)])
    manifest = verify(tmp_path / "step_00000001")
    assert sorted(manifest["files"]) == [f"__{r}_0.distcp" for r in range(world)]
    for r in range(world):
        data = bytes([r, 1]) * (1000 * (r + 1))
        assert manifest["files"][f"__{r}_0.distcp"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(res == results[0] for res in results)
    assert results[0]["auto"].endswith("step_00000002") and results[0]["fallback"].endswith("step_00000001")
    assert f"step_00000002/__{world - 1}_0.distcp: SHA-256 differs" in results[0]["named"]
