"""torch.distributed + megatron ``parallel_state`` setup from a :class:`ParallelConfig`.

megatron's ``parallel_state`` is the single source of process groups (ARCHITECTURE.md, contract 5);
:class:`Groups` is a frozen snapshot of the handful of groups/ranks the rest of the code needs, so
components take ``groups`` as an argument instead of reaching into megatron globals.

Works under ``torchrun`` (env:// rendezvous) and in a plain single process (a private TCP store on a
free port, world size 1) so the embedded path and single-process tests need no launcher.
"""

from __future__ import annotations

import os
import random
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from delta_megatron.utils.configs import Section, fail, option

__all__ = ["ParallelConfig", "Groups", "init_distributed", "destroy", "get_groups", "is_initialized", "free_port",
           "broadcast_object", "fail_together"]


@dataclass
class ParallelConfig(Section):
    """Megatron parallel layout. CP attention and FP8 need Transformer Engine (GPU only)."""

    tp: int = option(1, "tensor-parallel size", ge=1)
    pp: int = option(1, "pipeline-parallel size", ge=1)
    cp: int = option(1, "context-parallel size (needs the TE layer spec)", ge=1)
    vpp: int | None = option(None, "virtual pipeline stages per rank (interleaved 1F1B); null = off", ge=2)
    sequence_parallel: bool = option(False, "shard norms/dropout activations over TP (needs tp > 1)")
    distributed_optimizer: bool = option(True, "shard the optimizer state over data-parallel ranks")
    layer_spec: Literal["auto", "local", "te"] = option(
        "auto", "transformer layer kernels: te, local, or auto (TE when importable and CUDA present)")
    fp8: Literal["none", "delayed", "current", "mxfp8"] = option("none", "FP8 recipe (TE layer spec)")
    backend: Literal["auto", "nccl", "gloo"] = option("auto", "torch.distributed backend; auto: nccl with "
                                                      "CUDA, else gloo")
    timeout_minutes: float = option(30.0, "collective timeout: ranks wait this long in a collective, e.g. "
                                          "for rank 0's rollout or evaluation (the planner checks it)", gt=0)

    def validate(self) -> None:
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            fail("vpp", self.vpp, "interleaved pipelining needs vpp >= 2 and pp >= 2 (or vpp: null)")
        if self.sequence_parallel and self.tp == 1:
            fail("sequence_parallel", True, "needs tp > 1")
        if self.cp > 1 and self.layer_spec == "local":
            fail("cp", self.cp, "context parallelism needs the Transformer Engine layer spec "
                               "(parallel.layer_spec: te or auto on a GPU with transformer-engine)")
        if self.fp8 != "none" and self.layer_spec == "local":
            fail("fp8", self.fp8, "FP8 needs the Transformer Engine layer spec (parallel.layer_spec: te)")


@dataclass(frozen=True)
class Groups:
    """Process groups and this rank's coordinates. ``dp_cp`` is data-parallel *with* context parallel:
    the group over which per-token statistics (DelTA centroids, loss normalisers) are summed."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    dp_cp_rank: int
    dp_cp_size: int
    is_first_stage: bool
    is_last_stage: bool
    rank: int
    world_size: int

    @classmethod
    def from_parallel_state(cls) -> Groups:
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            cp=ps.get_context_parallel_group(),
            dp=ps.get_data_parallel_group(),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            dp_cp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
            is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
            is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )

    @property
    def is_weight_sender(self) -> bool:
        """One rank per pipeline stage sends/exports weights (after its TP group gathered them)."""
        return self.tp_rank == 0 and self.dp_cp_rank == 0


_GROUPS: Groups | None = None
_OWNS_PROCESS_GROUP = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: ParallelConfig, seed: int = 1234, timeout_minutes: float | None = None) -> Groups:
    """Initialise the default process group (if needed), megatron's model-parallel groups and RNGs
    (torch: ``seed`` on every rank, as megatron expects; Python / NumPy: one stream per rank).

    Applies the CPU shim when CUDA is absent. ``seed`` feeds ``model_parallel_cuda_manual_seed``
    (data-parallel seed = seed, TP seed = seed + 2718 + tp_rank) and the CPU generator.
    ``timeout_minutes`` (default ``cfg.timeout_minutes``) bounds every collective's wait.
    """
    global _GROUPS, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from delta_megatron.utils import cpu_shim

    if _GROUPS is not None:
        raise RuntimeError("init_distributed called twice; call parallel.destroy() first")
    cpu_shim.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout_minutes = cfg.timeout_minutes if timeout_minutes is None else timeout_minutes
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(_backend(cfg), timeout=timeout)
        else:  # plain single process: no launcher, no environment
            dist.init_process_group(_backend(cfg), init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
        _OWNS_PROCESS_GROUP = True
    world = dist.get_world_size()
    if world % (cfg.tp * cfg.pp * cfg.cp):
        raise ValueError(f"parallel: world size {world} is not divisible by tp*pp*cp="
                         f"{cfg.tp * cfg.pp * cfg.cp}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
        distributed_timeout_minutes=max(1, round(timeout_minutes)),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # Python's and NumPy's generators too, one stream per rank: a run (and a resumed run, which
    # restores every rank's own state) is reproducible whatever draws from them
    random.seed(f"{seed}/{dist.get_rank()}")
    np.random.seed(zlib.crc32(f"{seed}/{dist.get_rank()}".encode()))
    _GROUPS = Groups.from_parallel_state()
    return _GROUPS


def is_initialized() -> bool:
    return _GROUPS is not None


def get_groups() -> Groups:
    if _GROUPS is None:
        raise RuntimeError("parallel groups are not initialised: call parallel.init_distributed()")
    return _GROUPS


def destroy() -> None:
    """Tear down megatron's groups and (if we created it) the default process group."""
    global _GROUPS, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _GROUPS, _OWNS_PROCESS_GROUP = None, False


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank (a no-op in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def fail_together(error: BaseException | None, what: str, error_type: type[Exception] = RuntimeError,
                  group=None) -> None:
    """Collective: if any rank of ``group`` hit ``error``, every rank raises one ``error_type`` naming
    the failing ranks and their messages, so no rank is left waiting in a later collective. In one
    process ``error`` itself is raised."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise error_type(f"{what} failed on {len(failed)} rank(s): {detail}") from error
