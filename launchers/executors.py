"""Cluster profiles and the NeMo-Run executors built from them.

A profile (``slurm/profiles/<name>.yaml``) has two sections: ``hardware`` (read by the planner in the
library) and ``slurm`` (read here). ``${VAR:-default}`` in string values is expanded from the
environment, so one checked-in profile serves every user of a cluster (account, image, mounts).

Executors:

* :func:`local_executor` — ``run.LocalExecutor(ntasks_per_node=n, launcher="torchrun")``: one node,
  torchrun spawns the ranks on this machine.
* :func:`slurm_executor` — ``run.SlurmExecutor``: nodes x GPUs, container + mounts, env, srun args,
  ``--requeue`` (NeMo-Run always submits with it) with ``--signal=B:USR1@T`` and the batch-shell
  handling of :mod:`launchers.requeue`; multi-node torchrun rendezvous on the head node.
* :func:`rollout_executor` — the SGLang nodes of a heterogeneous job (actor and rollout on separate
  nodes, one ``sbatch`` with ``hetjob`` components).
"""

from __future__ import annotations

import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nemo_run as run
import yaml

from delta_megatron.planner import Hardware, profile_path
from delta_megatron.utils.configs import fail, from_dict, validate
from launchers.requeue import batch_setup_lines, parse_signal, torchrun_env

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SlurmProfile:
    """The ``slurm:`` section of a profile: everything sbatch/srun needs besides the node count."""

    account: str = "local"
    partition: str | None = None
    time: str = "01:00:00"
    exclusive: bool = False
    gpus_per_node: int = 0  # 0: CPU ranks (hardware.gpus_per_node of them per node)
    cpus_per_task: int | None = None
    mem: str | None = None
    qos: str | None = None
    constraint: str | None = None
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    srun_args: list[str] = field(default_factory=list)
    signal: str | None = "B:USR1@120"  # null: no preemption signal
    max_requeues: int = 0  # NeMo-Run's retries: requeue after a failed run (not preemption)
    packager: Literal["git", "none"] = "none"
    run_dir: str | None = None  # where logs/checkpoints go on the cluster; default: the job dir

    def validate(self) -> None:
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){1,2}", self.time):
            fail("time", self.time, "expected [D-]HH:MM[:SS]")
        if self.signal is not None:
            try:
                parse_signal(self.signal)
            except ValueError as err:
                fail("signal", self.signal, str(err))
        if self.gpus_per_node < 0 or self.max_requeues < 0:
            fail("gpus_per_node", self.gpus_per_node, "counts must be >= 0")


@dataclass
class ClusterProfile:
    name: str
    hardware: Hardware = field(default_factory=Hardware)
    slurm: SlurmProfile = field(default_factory=SlurmProfile)

    @property
    def ranks_per_node(self) -> int:
        """Trainer processes per node: one per GPU, or the CPU rank count of a GPU-less profile."""
        return self.slurm.gpus_per_node or self.hardware.gpus_per_node


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value):
    """``${VAR}`` / ``${VAR:-default}`` in every string of a nested YAML value."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def load_profile(name_or_path: str) -> ClusterProfile:
    path = profile_path(name_or_path)
    data = expand_env(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    data.setdefault("name", path.stem)
    profile = from_dict(ClusterProfile, data)
    validate(profile)
    return profile


# ----------------------------------------------------------------------------- executors
def bare_metal_env() -> dict[str, str]:
    """Without a container the job runs this checkout with this interpreter: put both on the path
    (the single-node test cluster, or a bare-metal cluster with a shared filesystem)."""
    return {"PATH": f"{Path(sys.executable).parent}:$PATH",
            "PYTHONPATH": f"{REPO_ROOT}:${{PYTHONPATH:-}}"}


def rdzv_id(name: str) -> int:
    """A stable torchrun rendezvous id (NeMo-Run draws a random one): same job -> same sbatch."""
    return zlib.crc32(name.encode()) % 100_000 + 1


def local_executor(nproc_per_node: int, env: dict[str, str] | None = None) -> run.LocalExecutor:
    """torchrun on this machine, ``nproc_per_node`` ranks."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                             env_vars={"PATH": path, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


def slurm_executor(profile: ClusterProfile, nodes: int, *, name: str = "delta-megatron",
                   env: dict[str, str] | None = None, job_dir: str = "",
                   dry_run: bool = False) -> run.SlurmExecutor:
    """A multi-node torchrun job for the actor (and colocated SGLang). ``job_dir=""`` keeps
    NeMo-Run's own experiment directory (a custom one broke sbatch, PLATFORM.md)."""
    s = profile.slurm
    env_vars = dict(s.env)
    setup = None
    if s.signal:
        _, sig, lead = parse_signal(s.signal)
        env_vars |= torchrun_env(lead)
        setup = batch_setup_lines(sig)
    if s.container_image is None:
        env_vars |= bare_metal_env()
    env_vars |= env or {}
    packager = run.GitArchivePackager() if s.packager == "git" and not dry_run else run.Packager()
    executor = run.SlurmExecutor(
        account=s.account, partition=s.partition, time=s.time, nodes=nodes,
        # one torchrun per node spawning the ranks (set here rather than by NeMo-Run's launcher
        # hook, which runs after a heterogeneous job has copied the task count)
        ntasks_per_node=1, torchrun_nproc_per_node=profile.ranks_per_node,
        gpus_per_node=s.gpus_per_node or None, cpus_per_task=s.cpus_per_task, mem=s.mem,
        qos=s.qos, constraint=s.constraint, exclusive=s.exclusive or None, signal=s.signal, container_image=s.container_image,
        container_mounts=list(s.container_mounts), env_vars=env_vars,
        srun_args=list(s.srun_args) or None, setup_lines=setup, job_name_prefix="dm.",
        launcher=run.Torchrun(rdzv_id=rdzv_id(name)), packager=packager,
        tunnel=run.LocalTunnel(job_dir=job_dir), poll_estimated_start_time=False)
    executor.retries = s.max_requeues
    return executor


def rollout_executor(profile: ClusterProfile, nodes: int, *, env: dict[str, str] | None = None,
                     dry_run: bool = False) -> run.SlurmExecutor:
    """The SGLang component of a heterogeneous job: plain ``bash`` tasks (one per node) that start
    servers and, on the first node, the router; no torchrun, no preemption handling of its own
    (servers hold no state)."""
    s = profile.slurm
    env_vars = dict(s.env) | (bare_metal_env() if s.container_image is None else {}) | (env or {})
    packager = run.GitArchivePackager() if s.packager == "git" and not dry_run else run.Packager()
    return run.SlurmExecutor(
        account=s.account, partition=s.partition, time=s.time, nodes=nodes, ntasks_per_node=1,
        gpus_per_node=s.gpus_per_node or None, cpus_per_task=s.cpus_per_task, mem=s.mem,
        qos=s.qos, constraint=s.constraint, exclusive=s.exclusive or None,
        container_image=s.container_image, container_mounts=list(s.container_mounts),
        env_vars=env_vars, srun_args=list(s.srun_args) or None, job_name_prefix="dm.",
        packager=packager, tunnel=run.LocalTunnel(job_dir=""), poll_estimated_start_time=False)


def make_heterogeneous(actor: run.SlurmExecutor, rollout: run.SlurmExecutor) -> list[run.SlurmExecutor]:
    """Actor first (het group 0), SGLang second (het group 1); the batch script's preemption
    handling lives on the first component, which owns the setup lines."""
    actor.heterogeneous = True
    rollout.heterogeneous = True
    return [actor, rollout]
