"""Weight-sync paths from the trainer to SGLang servers, one strategy per path.

Every strategy consumes the same stream of HF-named tensors (the project's single converter) and
talks to each server through a :class:`Workers` control plane (``post_all``). The engine wraps a push
in pause → push → flush → resume, so strategies only move bytes:

* :class:`TensorSync` — colocated: named tensors bucketed by size, pickled with
  ``ForkingPickler`` (CUDA tensors become CUDA-IPC handles, no copy) and base64-encoded, exactly as
  SGLang's ``MultiprocessingSerializer`` does, to ``/update_weights_from_tensor``.
* :class:`DistributedSync` — disaggregated: one sender per pipeline stage joins a process group with
  every server's TP ranks (``/init_weights_update_group``), announces each bucket's names / dtypes /
  shapes (``/update_weights_from_distributed``) and broadcasts the tensors from rank 0.
* :class:`DiskSync` — writes safetensors shards to a directory the servers can read and calls
  ``/update_weights_from_disk``.

Field names follow SGLang's ``io_struct.py`` (UpdateWeightsFromTensorReqInput, InitWeightsUpdate-
GroupReqInput, UpdateWeightsFromDistributedReqInput, UpdateWeightFromDiskReqInput).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch

from delta_megatron.rollout.engine import WeightSyncError

__all__ = [
    "Workers", "WeightSync", "TensorSync", "DistributedSync", "DiskSync", "iter_buckets",
    "iter_safetensors", "serialize_named_tensors", "deserialize_named_tensors",
    "init_custom_process_group", "make_weight_sync", "NoWeightSync",
]

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class Workers(Protocol):
    """The per-server control plane a strategy talks to (implemented by SGLangEngine)."""

    def worker_urls(self) -> list[str]: ...

    def post_all(self, path: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
        """POST ``payload`` to ``path`` on every server concurrently -> [(url, response)]; raises
        :class:`~delta_megatron.rollout.engine.RequestFailed` when a server fails after retries."""

    def post_each(self, path: str, payloads: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        """Like ``post_all`` with one payload per server (in ``worker_urls()`` order)."""


class WeightSync(Protocol):
    name: str

    def push(self, workers: Workers, named_tensors: NamedTensors, version: int) -> int:
        """Send every tensor of the stream; return the number of bytes sent."""

    def close(self, workers: Workers) -> None: ...


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int,
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream into lists of at most ``bucket_bytes`` (a larger tensor forms its own bucket)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of an HF checkpoint directory (every ``*.safetensors``) or of one file."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise WeightSyncError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def _patch_reductions() -> None:
    """Use SGLang's device-UUID CUDA-IPC reductions when SGLang is importable (the servers apply the
    same patch), so handles survive different CUDA_VISIBLE_DEVICES orders; plain torch otherwise."""
    for module in ("sglang.srt.utils.patch_torch", "sglang.srt.patch_torch"):
        try:
            patch = __import__(module, fromlist=["monkey_patch_torch_reductions"])
        except ImportError:
            continue
        patch.monkey_patch_torch_reductions()
        return


def serialize_named_tensors(obj: Any) -> str:
    """``MultiprocessingSerializer.serialize(obj, output_str=True)``: ForkingPickler + base64.

    CUDA tensors travel as IPC handles (no copy), so the sender must keep ``obj`` alive until the
    receiver has loaded it (our HTTP call is synchronous). CPU tensors (CPU runs and tests) travel by
    value: a CPU shared-memory handle only opens in a process that shares the sender's
    multiprocessing authkey, which an independently started server does not.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    buf = io.BytesIO()
    if _has_cuda_tensor(obj):
        _patch_reductions()
        ForkingPickler(buf).dump(obj)
    else:
        import pickle

        pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _has_cuda_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, (list, tuple)):
        return any(_has_cuda_tensor(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_cuda_tensor(x) for x in obj.values())
    return False


def deserialize_named_tensors(data: str | bytes) -> Any:
    """Inverse of :func:`serialize_named_tensors` (what a server does with each TP rank's entry)."""
    import pickle

    import torch.multiprocessing  # noqa: F401

    _patch_reductions()
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return pickle.loads(raw)


def _check_results(path: str, results: list[Any]) -> None:
    for url, res in results:
        if isinstance(res, dict) and res.get("success") is False:
            raise WeightSyncError(f"{url}{path} refused the update: {res.get('message')}")


class TensorSync:
    """Colocated sync through ``/update_weights_from_tensor`` in buckets of ``bucket_mb``.

    ``tp_size`` is the servers' TP size: SGLang reads entry ``tp_rank`` of
    ``serialized_named_tensors``, so each rank gets its own serialization of the same bucket.
    """

    name = "ipc"

    def __init__(self, bucket_mb: int = 512, tp_size: int = 1, load_format: str | None = None):
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.tp_size = tp_size
        self.load_format = load_format

    def push(self, workers: Workers, named_tensors: NamedTensors, version: int) -> int:
        sent = 0
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            bucket = [(n, t.detach().contiguous()) for n, t in bucket]
            payload = {
                "serialized_named_tensors": [serialize_named_tensors(bucket)
                                             for _ in range(self.tp_size)],
                "load_format": self.load_format,
                "flush_cache": False,  # the engine flushes once after the last bucket
                "weight_version": str(version),
            }
            _check_results("/update_weights_from_tensor",
                           workers.post_all("/update_weights_from_tensor", payload))
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
        return sent

    def close(self, workers: Workers) -> None:
        pass


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout: timedelta = timedelta(minutes=10)):
    """A process group outside the default one (a stage's sender + every server TP rank).

    SGLang's recipe (``init_custom_process_group`` in ``sglang.srt.utils``, shared by vLLM and slime):
    a TCP store at ``init_method`` (rank 0 hosts it) → ``PrefixStore(group_name)`` →
    ``_new_process_group_helper`` — a private torch API, the only way to make a second group that does
    not include the default group's ranks. The store is built here rather than by ``rendezvous()``:
    under torchrun (``TORCHELASTIC_USE_AGENT_STORE``) that would join the launcher's store instead
    of hosting the group's own, and the sender would wait for a store nobody serves.
    """
    import inspect
    from urllib.parse import urlsplit

    from torch.distributed import TCPStore
    from torch.distributed import distributed_c10d as c10d

    where = urlsplit(init_method)
    store = TCPStore(where.hostname, where.port, world_size, is_master=rank == 0, timeout=timeout)
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options = {"backend_options" if "backend_options" in params else "pg_options": None}
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, timeout=timeout, **options)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedSync:
    """Disaggregated sync by broadcast from this process (rank 0 of its group) to every server.

    With pipeline parallelism each stage's sender builds its own group (``group_name`` gets a
    ``_pp{stage}`` suffix) and sends its own layers; SGLang serialises the stages' requests. The
    servers' ranks are ``1 + offset``, offsets accumulating each server's ``tp_size``.
    """

    name = "nccl"

    def __init__(self, master_address: str, master_port: int, *, tp_size: int = 1,
                 pp_rank: int = 0, group_name: str = "weight_update_group", backend: str = "nccl",
                 bucket_mb: int = 512, timeout_s: float = 600.0):
        self.master_address, self.master_port = master_address, int(master_port)
        self.tp_size, self.backend = tp_size, backend
        self.group_name = f"{group_name}_pp{pp_rank}"
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self._group = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dm-nccl-sync")

    def _both(self, http_call, local_call, what: str):
        """Run the servers' HTTP side and our collective side together; fail as soon as either
        fails (a blocked collective cannot be cancelled: the group is dropped and must be rebuilt
        on a fresh port, but the engine is resumed now rather than at the collective timeout)."""
        remote = self._pool.submit(http_call)
        local = self._pool.submit(local_call)
        done, _ = wait([remote, local], return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            self._group = None
            raise WeightSyncError(f"{what} failed on the "
                                  f"{'servers' if failed is remote else 'sender'}: "
                                  f"{failed.exception()}") from failed.exception()
        _check_results(what, remote.result())
        return local.result()

    def connect(self, workers: Workers) -> None:
        """Create the group: the servers join over HTTP while this process rendezvous as rank 0."""
        urls = workers.worker_urls()
        world_size = 1 + self.tp_size * len(urls)
        payloads = [{"master_address": self.master_address, "master_port": self.master_port,
                     "rank_offset": 1 + i * self.tp_size, "world_size": world_size,
                     "group_name": self.group_name, "backend": self.backend}
                    for i in range(len(urls))]
        self._group = self._both(
            lambda: workers.post_each("/init_weights_update_group", payloads),
            lambda: init_custom_process_group(
                self.backend, f"tcp://{self.master_address}:{self.master_port}", world_size, 0,
                self.group_name, timeout=timedelta(seconds=self.timeout_s)),
            "/init_weights_update_group")

    def push(self, workers: Workers, named_tensors: NamedTensors, version: int) -> int:
        if self._group is None:
            self.connect(workers)
        import torch.distributed as dist

        def broadcast(bucket):  # the servers post matching receives in the same order
            for _, tensor in bucket:
                dist.broadcast(tensor.detach().contiguous(), src=0, group=self._group)

        sent = 0
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            payload = {"names": [n for n, _ in bucket],
                       "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                       "shapes": [list(t.shape) for _, t in bucket],
                       "group_name": self.group_name, "flush_cache": False,
                       "weight_version": str(version)}
            self._both(functools.partial(workers.post_all, "/update_weights_from_distributed", payload),
                       functools.partial(broadcast, bucket), "/update_weights_from_distributed")
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
        return sent

    def close(self, workers: Workers) -> None:
        self._pool.shutdown(wait=False)
        if self._group is None:
            return
        try:
            workers.post_all("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None


class DiskSync:
    """Sync through a shared directory: safetensors shards of ``shard_mb`` + an index, then
    ``/update_weights_from_disk``. ``base_model_path`` (config, tokenizer) is copied next to the
    shards once so the directory is a complete HF checkpoint."""

    name = "disk"

    def __init__(self, directory: str | Path, base_model_path: str | Path | None = None,
                 shard_mb: int = 2048):
        self.directory = Path(directory)
        self.base_model_path = Path(base_model_path) if base_model_path else None
        self.shard_bytes = int(shard_mb * 2**20)

    def write(self, named_tensors: NamedTensors) -> int:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.glob("*.safetensors"):
            old.unlink()
        if self.base_model_path is not None:
            for item in self.base_model_path.iterdir():
                if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(item, self.directory / item.name)
        weight_map, sent = {}, 0
        for i, shard in enumerate(iter_buckets(named_tensors, self.shard_bytes)):  # one in memory
            fname = f"model-{i + 1:05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in shard}, str(self.directory / fname))
            weight_map.update({n: fname for n, _ in shard})
            sent += sum(t.numel() * t.element_size() for _, t in shard)
        index = {"metadata": {"total_size": sent}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return sent

    def push(self, workers: Workers, named_tensors: NamedTensors, version: int) -> int:
        sent = self.write(named_tensors)
        load_from_disk(workers, self.directory, version)
        return sent

    def close(self, workers: Workers) -> None:
        pass


def load_from_disk(workers: Workers, path: str | Path, version: int) -> None:
    payload = {"model_path": str(path), "load_format": None, "abort_all_requests": False,
               "weight_version": str(version), "flush_cache": False}
    _check_results("/update_weights_from_disk", workers.post_all("/update_weights_from_disk", payload))


class NoWeightSync:
    """The strategy of an engine that only generates: the trainer's weight route
    (:mod:`~delta_megatron.rollout.weight_route`) moves the weights, through other clients."""

    name = "none"

    def __init__(self, reason: str = "this engine does not push weights"):
        self.reason = reason

    def push(self, workers: Workers, named_tensors: NamedTensors, version: int) -> int:
        raise WeightSyncError(self.reason)

    def close(self, workers: Workers) -> None:
        pass


def make_weight_sync(cfg, *, master_address: str = "127.0.0.1", master_port: int = 0,
                     pp_rank: int = 0, disk_dir: str | Path | None = None,
                     base_model_path: str | Path | None = None, backend: str = "nccl") -> WeightSync:
    """The strategy ``SGLangConfig.weight_sync`` names ("auto"/"ipc" | "distributed" | "disk")."""
    if cfg.weight_sync in ("auto", "ipc"):
        return TensorSync(cfg.sync_bucket_mb, tp_size=cfg.tp)
    if cfg.weight_sync == "distributed":
        if not master_port:
            raise ValueError("weight_sync=distributed needs master_port (a free port on the sender's host)")
        return DistributedSync(master_address, master_port, tp_size=cfg.tp, pp_rank=pp_rank, backend=backend,
                               bucket_mb=cfg.sync_bucket_mb, timeout_s=cfg.request_timeout_s)
    if disk_dir is None:
        raise ValueError("weight_sync=disk needs disk_dir (a directory every server can read)")
    return DiskSync(disk_dir, base_model_path)
