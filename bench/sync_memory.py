"""Peak extra memory of a weight-sync sender: the streaming route vs materialising the stage.

A ~100M-parameter Qwen3-shaped megatron model (hidden 768, 8 layers, vocab 32000, untied, fp32) on
CPU ranks (gloo). Each pipeline stage's sender runs the real sync path
(:class:`~delta_megatron.rollout.weight_route.BroadcastRoute`: the converter exports its layers bucket
by bucket and broadcasts each to a receiver rank that drops it), while a thread samples the
process's resident memory every 0.5 ms; the peak above the pre-sync RSS is the sender's extra memory
(glibc's mmap threshold is pinned to 128 KiB so freed tensors leave RSS at once).
For contrast the sender then materialises its stage as a list of buckets (what the old
``sync_actor_weights`` did on every rank before gathering them on rank 0).

    python bench/sync_memory.py [--bucket-mb 32] [--layers 8]

Layouts: PP1 (2 ranks: DP 2, rank 0 sends, rank 1 receives) and PP2 (4 ranks: PP 2 × DP 2; the
senders are ranks 0 and 2, rank 1 receives both stages).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Resident set size sampled in a thread (large tensors are mmap'd, so frees show up in RSS)."""

    def __init__(self, period_s: float = 0.0005):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from delta_megatron.config import load_config
    from delta_megatron.models.converter import megatron_to_hf
    from delta_megatron.models.gpt import build_model_chunks, unwrap
    from delta_megatron.parallel import destroy, init_distributed
    from delta_megatron.rollout.weight_route import BroadcastRoute

    torch.set_num_threads(1)
    cfg = load_config(overrides=[
        "model.arch=qwen3", f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.intermediate}", f"model.num_layers={args.layers}",
        "model.num_attention_heads=12", "model.num_key_value_heads=4", "model.tie_word_embeddings=false",
        f"parallel.pp={args.pp}", "parallel.distributed_optimizer=false"])
    groups = init_distributed(cfg.parallel, seed=0)
    chunks = [unwrap(c) for c in build_model_chunks(cfg.model, cfg.parallel, load_hf=False)]
    bucket = args.bucket_mb << 20

    class Sender:  # the actor's weight-export surface, without optimizer state
        def __init__(self):
            self.groups = groups

        def named_hf_weights(self, bucket_bytes):
            if groups.dp_cp_rank != 0:
                return
            yield from megatron_to_hf(chunks, cfg.model, bucket_bytes=bucket_bytes, tp_group=groups.tp)

    receiver = 1  # a stage-0 DP replica: sends nothing, drops what it receives
    route = BroadcastRoute(groups, [receiver], (lambda stream: sum(1 for _ in stream)) if groups.rank == receiver
                           else None, bucket_bytes=bucket, device=torch.device("cpu"))
    stage_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    largest = max(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    route.sync(Sender())  # warm-up: allocator arenas, process groups
    dist.barrier()
    with PeakRSS() as streaming:
        t0 = time.perf_counter()
        route.sync(Sender())
        seconds = time.perf_counter() - t0
    dist.barrier()
    with PeakRSS() as materialised:
        held = [list(b) for b in Sender().named_hf_weights(bucket)]
        del held
    out = {"rank": groups.rank, "sender": groups.is_weight_sender, "pp_rank": groups.pp_rank,
           "stage_bytes": stage_bytes, "largest": largest, "streaming_extra": streaming.extra, "materialised_extra": materialised.extra,
           "seconds": seconds}
    (Path(args.out) / f"rank{groups.rank}.json").write_text(json.dumps(out))
    destroy()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(args, pp: int) -> list[dict]:
    nproc = 2 * pp
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_port()}",
               __file__, "--worker", "--pp", str(pp), "--out", out, "--bucket-mb", str(args.bucket_mb),
               "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
               "--vocab", str(args.vocab)]
        # a fixed mmap threshold: every tensor above 128 KiB is its own mapping, returned on free,
        # so RSS follows live tensor memory (glibc's adaptive threshold would keep freed buckets)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072")
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    mib = 2**20
    print(f"bucket {args.bucket_mb} MiB; extra RSS of each stage's sender during one sync (MiB)")
    print("| layout | sender | stage weights | largest tensor | streaming sync | streaming / bucket "
          "| materialised stage | sync time |")
    print("|---|---|---|---|---|---|---|---|")
    for pp in (1, 2):
        for r in run_layout(args, pp):
            if not r["sender"]:
                continue
            print(f"| PP{pp} | rank {r['rank']} (stage {r['pp_rank']}) | {r['stage_bytes'] / mib:.0f} | "
                  f"{r['largest'] / mib:.0f} | "
                  f"{r['streaming_extra'] / mib:.0f} | {r['streaming_extra'] / (args.bucket_mb * mib):.2f} | "
                  f"{r['materialised_extra'] / mib:.0f} | {r['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
