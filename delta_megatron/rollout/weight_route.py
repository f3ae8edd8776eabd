"""Weight sync across the trainer's ranks: each pipeline stage's sender streams its own layers, bucket by
bucket, along the placement's route. Nothing is gathered on rank 0 and no rank holds the whole model.

Every stage's sender (TP 0, CP 0, DP 0 of the stage) runs the converter (``actor.named_hf_weights``:
one TP gather per parameter, one bucket alive at a time); the stage's other TP ranks run it with
it, in step. Then, per route (:class:`~delta_megatron.topology.Placement`):

* :class:`BroadcastRoute` — the bucket is broadcast (a small header of names / dtypes / shapes, then
  the tensors) to a fixed set of ranks that feed an engine: rank 0's in-process engine, or, for
  colocated SGLang, every node's local rank 0, which pushes it by CUDA IPC into its own node's
  servers (``/update_weights_from_tensor``).
* :class:`DistributedRoute` — disaggregated SGLang: the stage's sender is rank 0 of a process group
  with every server TP rank (``/init_weights_update_group``, once) and broadcasts to them
  (``/update_weights_from_distributed``); stages take turns, rank 0 holds the pause window.
* :class:`DiskRoute` — each sender writes its stage's safetensors shards into a shared directory;
  rank 0 writes the index and the servers load it (``/update_weights_from_disk``).

A failure on one rank (an HTTP error, a refused tensor) does not leave the others hanging in a
collective: the rank keeps taking part in the stream, and at the end all ranks raise the same
:class:`~delta_megatron.rollout.engine.WeightSyncError` naming where it failed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron.parallel import fail_together
from delta_megatron.rollout.engine import WeightSyncError, weight_update_window

__all__ = ["stage_senders", "BroadcastRoute", "DistributedRoute", "DiskRoute", "raise_together"]

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Consumer = Callable[[NamedTensors], Any]


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def stage_senders(groups) -> list[int]:
    """Global rank of each pipeline stage's weight sender, as this run's process groups say."""
    mine = groups.pp_rank if groups.is_weight_sender else -1
    if _world() == 1:
        return [0]
    found = [None] * _world()
    dist.all_gather_object(found, mine)
    return [found.index(s) for s in range(groups.pp_size)]


def raise_together(error: BaseException | None, what: str) -> None:
    """Collective: if any rank failed, every rank raises one WeightSyncError naming the failing ranks."""
    if error is not None and _world() == 1 and not isinstance(error, WeightSyncError):
        raise WeightSyncError(f"{what}: {error}") from error
    fail_together(error, what, WeightSyncError)


def _export(actor, stage: int, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This rank's part of exporting pipeline stage ``stage`` (see the converter: collective over TP)."""
    if actor.groups.pp_rank != stage:
        return iter(())
    return actor.named_hf_weights(bucket_bytes)


class _StageChannel:
    """One stage's buckets from its sender to a group of ranks: a header per bucket, then each
    tensor; a ``None`` header ends the stage."""

    def __init__(self, sender: int, members: list[int], device: torch.device):
        self.sender, self.members, self.device = sender, sorted(set(members)), device
        self.group = dist.new_group(self.members) if _world() > 1 and len(self.members) > 1 else None

    def send(self, bucket: list[tuple[str, torch.Tensor]] | None) -> None:
        if self.group is None:
            return
        header = None if bucket is None else [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                                              for n, t in bucket]
        box = [header]
        dist.broadcast_object_list(box, src=self.sender, group=self.group, device=self._obj_device())
        for _, t in bucket or ():
            dist.broadcast(t.to(self.device), src=self.sender, group=self.group)

    def receive(self) -> list[tuple[str, torch.Tensor]] | None:
        box = [None]
        dist.broadcast_object_list(box, src=self.sender, group=self.group, device=self._obj_device())
        if box[0] is None:
            return None
        out = []
        for name, dtype, shape in box[0]:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(t, src=self.sender, group=self.group)
            out.append((name, t))
        return out

    def _obj_device(self):
        return self.device if self.device.type == "cuda" else None


class BroadcastRoute:
    """Stage senders broadcast their buckets to ``receivers``; each receiver hands the merged stream
    of all stages to its ``consumer`` (an engine's ``update_weights``). ``consumer`` is None on ranks
    that receive nothing."""

    name = "broadcast"

    def __init__(self, groups, receivers: list[int], consumer: Consumer | None, *, bucket_bytes: int,
                 device: torch.device, senders: list[int] | None = None):
        self.groups, self.bucket_bytes = groups, bucket_bytes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.senders = senders if senders is not None else stage_senders(groups)
        self.receivers = list(receivers)
        self.consumer = consumer if self.rank in self.receivers else None
        self.channels = [_StageChannel(s, [s, *self.receivers], device) for s in self.senders]

    def _stream(self, actor) -> Iterator[tuple[str, torch.Tensor]]:
        for stage, channel in enumerate(self.channels):
            export = _export(actor, stage, self.bucket_bytes)
            if self.rank == channel.sender:
                for bucket in export:
                    channel.send(bucket)
                    if self.rank in self.receivers:
                        yield from bucket
                    del bucket  # not alive while the converter builds the next one
                channel.send(None)
            elif self.rank in channel.members:
                for _ in export:  # a TP peer of the sender: its gathers and the broadcasts in step
                    yield from channel.receive() or ()
                while (bucket := channel.receive()) is not None:
                    yield from bucket
            else:
                for _ in export:  # the sender's other TP ranks: gathers only
                    pass

    def sync(self, actor) -> int:
        """Collective over every trainer rank; returns the number of tensors this rank consumed."""
        stream, count, error = self._stream(actor), [0], None

        def counted():
            for item in stream:
                count[0] += 1
                yield item

        if self.consumer is not None:
            try:
                self.consumer(counted())
            except Exception as err:  # keep streaming: the other ranks are in the collectives
                error = err
        for _ in stream:
            pass
        raise_together(error, "weight sync (broadcast)")
        return count[0]

    def close(self) -> None:
        pass


class DistributedRoute:
    """Disaggregated: stage ``s``'s sender pushes its layers into every server through its own
    process group (``engine.push_weights``); stages take turns; rank 0 pauses, flushes and resumes.
    ``engine`` is rank 0's engine (the pause window); ``sender_engine`` is the SGLang client whose
    weight sync is this stage's :class:`~delta_megatron.rollout.weight_sync.DistributedSync`."""

    name = "distributed"

    def __init__(self, groups, *, engine, sender_engine, bucket_bytes: int, senders: list[int] | None = None):
        self.groups, self.engine, self.sender_engine = groups, engine, sender_engine
        self.bucket_bytes = bucket_bytes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.senders = senders if senders is not None else stage_senders(groups)
        self.version = 0

    def sync(self, actor) -> int:
        self.version += 1
        error, sent = None, 0
        window = weight_update_window(self.engine, "weight sync (distributed)") if self.rank == 0 else None
        try:
            if window is not None:
                window.__enter__()
        except Exception as err:
            error, window = err, None
        _barrier()
        for stage, sender in enumerate(self.senders):
            export = _export(actor, stage, self.bucket_bytes)
            if self.rank == sender:
                try:
                    sent = self.sender_engine.push_weights(_flat(export), self.version)
                except Exception as err:
                    error = error or err
            for _ in export:  # TP peers; and the sender's rest after a failure
                pass
            _barrier()  # one stage at a time: a server serves one update group at once
        if window is not None:
            try:
                self.engine.flush_cache()
            except Exception as err:
                error = error or err
            try:
                window.__exit__(None, None, None)
            except Exception as err:
                error = error or err
        raise_together(error, "weight sync (distributed)")
        return sent

    def close(self) -> None:
        if self.sender_engine is not None:
            self.sender_engine.close()


class DiskRoute:
    """Each stage's sender writes ``pp{stage}-*.safetensors`` into ``directory`` (shared by every
    node); rank 0 then writes the index, copies the config and tokenizer files from
    ``base_model_path`` and asks every server to load the directory."""

    name = "disk"

    def __init__(self, groups, directory: str | Path, *, engine, base_model_path: str | Path | None,
                 bucket_bytes: int, senders: list[int] | None = None, checker=None):
        self.groups, self.engine, self.directory = groups, engine, Path(directory)
        self.base_model_path = Path(base_model_path) if base_model_path else None
        self.bucket_bytes, self.checker = bucket_bytes, checker
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.senders = senders if senders is not None else stage_senders(groups)

    def sync(self, actor) -> int:
        from safetensors.torch import save_file

        error, written, probe = None, 0, {}
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for old in self.directory.glob("*.safetensors"):
                    old.unlink()
            except OSError as err:
                error = err
        _barrier()
        for stage, sender in enumerate(self.senders):
            weight_map = {}
            for k, bucket in enumerate(_export(actor, stage, self.bucket_bytes)):
                if self.rank != sender or not bucket or error is not None:
                    continue
                fname = f"pp{stage:03d}-{k:05d}.safetensors"
                try:
                    save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(self.directory / fname),
                              metadata={"format": "pt"})
                except Exception as err:
                    error = err
                weight_map.update({n: fname for n, _ in bucket})
                written += len(bucket)
                if self.checker is not None:
                    probe.update({n: self.checker.probe_rows(t) for n, t in bucket})
            if self.rank == sender and error is None:
                (self.directory / f"pp{stage:03d}.index.json").write_text(json.dumps(weight_map))
        _barrier()
        if self.rank == 0 and error is None:
            try:
                self._finish()
            except Exception as err:
                error = err
        _barrier()
        if probe and error is None:
            try:
                self.checker.check_weights(probe.items())
            except Exception as err:
                error = err
        raise_together(error, "weight sync (disk)")
        return written

    def _finish(self) -> None:
        weight_map = {}
        for part in sorted(self.directory.glob("pp*.index.json")):
            weight_map.update(json.loads(part.read_text()))
            part.unlink()
        if self.base_model_path is not None:
            for item in self.base_model_path.iterdir():
                if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(item, self.directory / item.name)
        index = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        self.engine.update_weights_from_disk(self.directory)

    def close(self) -> None:
        pass


def _flat(buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        yield from bucket


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()
