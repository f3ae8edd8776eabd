"""Running the trainer as a two-node cluster on this machine (slurm/local/cluster2.sh: two network
namespaces, 10.77.0.1 and 10.77.0.2): one ``torchrun --nnodes 2`` per node, the SGLang-protocol test
server (tests/doubles/fake_sglang.py, a real HF model behind it) started by the placement on each
node's own address."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from delta_megatron.tracking import read_metrics
from tests.environment import require  # noqa: F401  (re-exported for the cluster tests)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local" / "cluster2.sh"
NODE_ADDR = {1: "10.77.0.1", 2: "10.77.0.2"}
RECIPE = "pipelines.tiny_arith_cpu:smoke_config"
# the tiny recipe, 3 steps, checkpoints every step; SGLang engine on the fake server (real tiny HF model)
TASK = ["data.synthetic_digits=1", "model.num_attention_heads=4", "model.num_key_value_heads=2"]
BASE = TASK + ["train.steps=3", "checkpoint.every=1", "checkpoint.keep=5", "logging.tensorboard=false",
               "rollout.engine=sglang", "rollout.sglang.servers_per_node=1",
               "rollout.sglang.server_module=tests.doubles.fake_sglang", "rollout.sglang.check_weights=true",
               "rollout.sglang.request_timeout_s=120", "rollout.sglang.startup_timeout_s=300",
               "rollout.sglang.extra_args=[--max-lifetime-s,'900']", "parallel.timeout_minutes=2"]
# metrics that must agree between layouts (tolerance in the tests)
COMPARED = ["rollout/reward_mean", "rollout/entropy_mean", "rollout/response_len_mean", "credit/delta/lambda_bar_std",
            "credit/delta/lambda_bar_max", "credit/delta/gamma_pos", "credit/delta/gamma_neg", "train/pg_loss",
            "train/grad_norm", "train/clip_frac"]


def cluster_up() -> bool:
    """The two-node cluster exists (``make test`` starts it; bring it up here if we may)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    if subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0:
        return True
    return subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True).returncode == 0


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONWARNINGS="ignore", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


@dataclass
class Run:
    """One launched job: a process (group) per node."""

    out: Path
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)

    def wait(self, timeout: float) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        try:
            return {n: p.wait(timeout=max(1.0, deadline - time.monotonic())) for n, p in self.procs.items()}
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def log(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace") if node in self.logs else ""

    def metrics(self) -> list[dict]:
        return read_metrics(self.out / "metrics.jsonl")


def train_cmd(nnodes: int, nproc: int, node_rank: int, master: str, port: int, out: Path, hf: Path,
              overrides: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", f"--master-addr={master}", f"--master-port={port}",
            "-m", "delta_megatron.train", "--recipe", RECIPE, f"logging.dir={out}", f"model.hf_path={hf}",
            *BASE, *overrides] + (["--resume", "auto"] if resume else [])


def start(node: int | None, cmd: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``cmd`` on cluster node ``node`` (None: on this host), in its own process group."""
    full = cmd if node is None else ["bash", str(SCRIPT), "exec", str(node), *cmd]
    with open(log, "ab") as fh:
        return subprocess.Popen(full, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def two_node_train(out: Path, hf: Path, overrides: list[str], *, resume: bool = False, port: int = 29400) -> Run:
    """2 nodes x 2 ranks, colocated servers (one per node)."""
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    for n in (1, 2):
        run.logs[n] = out / f"node{n}.log"
        run.procs[n] = start(n, train_cmd(2, 2, n - 1, NODE_ADDR[1], port, out, hf, overrides, resume), run.logs[n])
    return run


def write_hf(path: Path, sft_steps: int = 120) -> Path:
    """The tiny recipe's HF model after a short supervised warm-up on the task (an untrained model
    answers ~3 % right: most groups would carry no advantage and the steps would test nothing), with
    the character tokenizer's pad/bos/eos ids. ~10 s on one core."""
    import torch

    from delta_megatron.builders import arithmetic_task, build_tokenizer
    from delta_megatron.config import apply_overrides
    from delta_megatron.models.hf_config import build_hf_model
    from pipelines.tiny_arith_cpu import smoke_config

    cfg = apply_overrides(smoke_config(str(path.parent / "unused")), TASK)
    tokenizer, _ = build_tokenizer(cfg, path.parent / "sft-tokenizer")
    pairs = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             for p, c in arithmetic_task(cfg).sft_pairs(4000, seed=0)]
    model = build_hf_model(cfg.model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(sft_steps):
        rows = [pairs[i] for i in torch.randint(len(pairs), (64,), generator=gen).tolist()]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for r, (p, c) in enumerate(rows):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            labels[r, len(p):len(p) + len(c)] = torch.tensor(c)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(path)
    return path


def export(run_dir: Path, out: Path) -> dict:
    """The run's final checkpoint as HF tensors (one process: dist-ckpt reshards any layout)."""
    from safetensors.torch import load_file

    res = subprocess.run([sys.executable, "-m", "delta_megatron.cli", "export", str(run_dir), str(out)], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    tensors = {n: t for f in sorted(out.glob("*.safetensors")) for n, t in load_file(f).items()}
    assert tensors, f"no weights exported to {out}: {res.stderr[-2000:]}"
    return tensors
