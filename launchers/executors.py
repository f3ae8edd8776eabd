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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nemo_run as run
import yaml

from delta_megatron.planner import Hardware, profile_path
from delta_megatron.utils.configs import Section, fail, from_dict, option, validate
from launchers.requeue import REQUEUE_MARKER_ENV, batch_setup_lines, parse_signal, torchrun_env

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SlurmProfile(Section):
    """The ``slurm:`` section of a profile: everything sbatch/srun needs besides the node count."""

    account: str = option("local", "sbatch --account")
    partition: str | None = option(None, "sbatch --partition; null = the cluster default")
    time: str = option("01:00:00", "job time limit [D-]HH:MM[:SS]")
    exclusive: bool = option(False, "sbatch --exclusive")
    gpus_per_node: int = option(0, "GPUs per node; 0 = CPU ranks (hardware.gpus_per_node of them)", ge=0)
    cpus_per_task: int | None = option(None, "sbatch --cpus-per-task", ge=1)
    mem: str | None = option(None, "sbatch --mem ('0' = all of the node's memory)")
    qos: str | None = option(None, "sbatch --qos")
    constraint: str | None = option(None, "sbatch --constraint")
    container_image: str | None = option(None, "container image (Pyxis/enroot); null = bare metal")
    container_mounts: list[str] = option(doc="container mounts SRC:DST", default_factory=list)
    env: dict[str, str] = option(doc="environment variables of the job", default_factory=dict)
    srun_args: list[str] = option(doc="extra srun arguments", default_factory=list)
    signal: str | None = option("B:USR1@120", "preemption signal before the time limit; null = none")
    max_requeues: int = option(0, "NeMo-Run's retries: requeue after a failed run (not preemption)", ge=0)
    packager: Literal["git", "none"] = option("none", "ship the code as a git archive, or use it in place")
    run_dir: str | None = option(None, "where logs/checkpoints go on the cluster; null = the job dir")

    def validate(self) -> None:
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){1,2}", self.time):
            fail("time", self.time, "expected [D-]HH:MM[:SS]")
        if self.signal is not None:
            try:
                parse_signal(self.signal)
            except ValueError as err:
                fail("signal", self.signal, str(err))


@dataclass
class ClusterProfile(Section):
    name: str = option(doc="profile name")
    hardware: Hardware = option(doc="node hardware (read by the planner)", default_factory=Hardware)
    slurm: SlurmProfile = option(doc="sbatch/srun settings", default_factory=SlurmProfile)

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
                   dry_run: bool = False, requeue_marker: str | None = None) -> run.SlurmExecutor:
    """A multi-node torchrun job for the actor (and colocated SGLang). ``job_dir=""`` keeps
    NeMo-Run's own experiment directory (a custom one broke sbatch, PLATFORM.md). ``requeue_marker``:
    the file a stopped trainer writes to be requeued (the same path in the job; see requeue.py)."""
    s = profile.slurm
    env_vars = dict(s.env)
    sig = None
    if s.signal:
        _, sig, lead = parse_signal(s.signal)
        env_vars |= torchrun_env(lead)
    setup = batch_setup_lines(sig, marker=requeue_marker)  # the trainer also stops by itself (deadline)
    if requeue_marker:
        env_vars[REQUEUE_MARKER_ENV] = requeue_marker
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
