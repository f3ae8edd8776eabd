"""``parallel.fail_together``: one rank's failure becomes the same error on every rank (no rank waits
in a later collective), naming the failing rank; in one process the error itself is raised."""

from __future__ import annotations

import json

import pytest

from delta_megatron.parallel import fail_together
from tests.dist.mg_common import torchrun


def test_one_process_raises_the_error_itself():
    fail_together(None, "nothing failed")
    with pytest.raises(ValueError, match="^boom$"):
        fail_together(ValueError("boom"), "a step")


@pytest.mark.dist
def test_every_rank_raises_naming_the_failing_rank(tmp_path):
    torchrun("fail_together_worker.py", 3, ["--out", str(tmp_path)], timeout=120)
    seen = {r["rank"]: r["seen"] for r in (json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json")))}
    assert sorted(seen) == [0, 1, 2]
    want = "weight sync (disk) failed on 1 rank(s): rank 1: ValueError: disk full"
    assert [seen[r]["message"] for r in range(3)] == [want] * 3
    assert {seen[r]["type"] for r in range(3)} == {"WeightSyncError"}
    assert seen[1]["cause"] == "ValueError" and seen[0]["cause"] == "NoneType"
