"""Verifier kill deadline under load: how long after ``timeout_s`` a hanging sample's verdict arrives.

``VerifierPool.score`` on a batch in which every sample hangs (a busy loop, as sympy stuck in C code
is), one sample per worker, each worker warm and idle when the batch starts. The overshoot of a round
is ``wall time of score() - timeout_s``: dispatch, the deadline wake-up, SIGKILL and reaping of the
stuck workers, starting their replacements and recording the verdicts. Load: ``--load`` extra
processes spinning on the CPU (the machine's own load comes on top; report it with the numbers).

    PYTHONPATH=. python bench/verifier_deadline.py --workers 2 --timeout 5 --rounds 5 --load 0 8 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

from delta_megatron.reward.verifier_pool import VerifierPool

SCORE_FN = "bench.verifier_deadline:score"


def score(response: str, gold: str) -> float | None:
    """Runs in the workers: ``hang`` spins forever, ``nap <s>`` sleeps ``s`` seconds, else exact match."""
    if response == "hang":
        while True:
            pass
    if response.startswith("nap "):
        time.sleep(float(response[4:]))
    return 1.0 if response == gold else 0.0


def _burn() -> None:
    while True:
        pass


def _all_ready(pool: VerifierPool, workers: int, deadline_s: float = 120.0) -> None:
    """Warm every worker: score naps (each takes a worker for a while, so all get one) until the pool
    reports every worker ready."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        pool.score([("nap 0.2", "x")] * workers)
        if all(w.ready and w.task is None for w in pool._workers):
            return
    raise RuntimeError("verifier workers did not become ready")


def run(workers: int, timeout_s: float, rounds: int, load: int) -> list[float]:
    burners = [mp.Process(target=_burn, daemon=True) for _ in range(load)]
    for p in burners:
        p.start()
    overshoots = []
    try:
        with VerifierPool(workers, timeout_s, SCORE_FN, start_method="forkserver") as pool:
            for _ in range(rounds):
                _all_ready(pool, workers)
                t0 = time.monotonic()
                _, stats = pool.score([("hang", "x")] * workers)
                overshoots.append(time.monotonic() - t0 - timeout_s)
                assert stats.timeouts == workers, stats
    finally:
        for p in burners:
            p.kill()
            p.join()
    return overshoots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 8, 16], help="extra spinning processes")
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}, load average before {os.getloadavg()[0]:.1f}, workers {args.workers}, "
          f"timeout {args.timeout:g} s, {args.rounds} rounds")
    print("| extra load | median overshoot | max overshoot | load average after |")
    print("|---|---|---|---|")
    for load in args.load:
        over = run(args.workers, args.timeout, args.rounds, load)
        print(f"| {load} | {statistics.median(over):.3f} s | {max(over):.3f} s | {os.getloadavg()[0]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
