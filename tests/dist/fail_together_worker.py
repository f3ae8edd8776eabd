"""torchrun worker for tests/test_fail_together.py: 3 ranks (gloo); rank 1 fails, then every rank
writes what ``fail_together`` raised on it to ``<out>/rank<r>.json`` (and a round where no rank fails
raises nothing). One file per rank: lines printed by several ranks to one stdout can interleave."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from delta_megatron.parallel import fail_together
from delta_megatron.rollout.engine import WeightSyncError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fail_together(None, "a round without failures", WeightSyncError)
    try:
        fail_together(ValueError("disk full") if rank == 1 else None, "weight sync (disk)", WeightSyncError)
        seen = None
    except WeightSyncError as err:
        seen = {"type": type(err).__name__, "message": str(err), "cause": type(err.__cause__).__name__}
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "seen": seen}))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
