"""A stand-in for ``python -m delta_megatron.train --config run.yaml --resume auto`` in study tests:
writes the files a run writes (metrics.jsonl with train reward and held-out avg@4, credit_tokens.jsonl
for DelTA, a per-step "checkpoint") in milliseconds, with curves that are known formulas of method,
seed and step, and resumes after its last checkpoint like the trainer.

    acc(x) = (0.6 if DelTA else 0.4) · x / steps + (0.012 if DelTA else 0.01) · seed   (x = steps trained)

Behaviour for tests, from the environment: ``FAKE_FAIL=<method>/seed_<n>`` exits 3 at step 1;
``FAKE_HANG=<method>/seed_<n>:<step>`` waits at that step until SIGTERM, then "checkpoints" and exits
75 as the trainer does on preemption. Every start is counted in ``attempts.txt``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml


def main() -> int:
    cfg = yaml.safe_load(Path(sys.argv[1]).read_text())
    out = Path(cfg["logging"]["dir"])
    steps, seed, every = cfg["train"]["steps"], cfg["train"]["seed"], cfg["eval"]["every"]
    delta = "delta" in cfg["credit"]["methods"]
    name = f"{out.parent.name}/{out.name}"
    with open(out / "attempts.txt", "a") as fh:
        fh.write(f"{cfg['checkpoint']['resume']}\n")
    ckpt = out / "checkpoint.txt"
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    hang = os.environ.get("FAKE_HANG", "")
    with open(out / "metrics.jsonl", "a") as metrics:
        for step in range(start, steps):
            if hang.startswith(name + ":") and step == int(hang.split(":")[1]):
                while not stop["flag"]:
                    time.sleep(0.05)
            if stop["flag"]:
                return 75  # the trainer saved at the last step boundary
            if os.environ.get("FAKE_FAIL") == name and step == 1:
                print("Traceback: fake failure", flush=True)
                return 3
            x = step + 1
            acc = (0.6 if delta else 0.4) * x / steps + (0.012 if delta else 0.01) * seed
            row = {"step": step, "rollout/reward_mean": acc}
            if every and x % every == 0:
                row["eval/avg/avg@4"] = acc
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if delta:
                with open(out / "credit_tokens.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": step, "ids": [3, 20], "text": ["0", "digit"],
                                         "sum": [[30.0, 20.0, 0.0], [18.0, 20.0, 0.0]],
                                         "count": [[25, 20, 0], [20, 20, 0]]}) + "\n")
            ckpt.write_text(str(step + 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
