"""Where DelTA keeps ``v`` between the old-log-prob pass and the replayed stages (``cache`` mode).

``gpu``: on the compute device, as observed. ``host``: in pinned host memory. Each micro-batch's
``v`` is copied out on a side CUDA stream while the log-prob pass carries on with the next micro-batch
(the copy overlaps the forward), and read back chunk by chunk for the replayed stages (γ, refinement,
final), the next chunk's copy in flight while the current one is accumulated. On the CPU both places
are host memory and ``host`` is a plain copy, so λ̄ is identical either way (the values are copied,
never converted).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

PLACES = ("auto", "gpu", "host")


class VCache:
    """Stores ``v`` chunks (``store``) and streams them back to ``device`` (``replay``)."""

    def __init__(self, place: str, device: torch.device | None):
        if place not in PLACES:
            raise ValueError(f"credit.delta.cache_device: {place!r} — allowed: {', '.join(PLACES)}")
        self.host = place == "host"  # auto: the planner resolves it; without a plan, the device
        self.device = device
        self._stream = None

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def store(self, v: torch.Tensor) -> torch.Tensor:
        """Keep ``v`` (the caller's last use of it): as is, or copied to pinned host memory, the
        copy queued behind the work that produced ``v`` on a side stream."""
        if not self.host:
            return v
        out = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        if not v.is_cuda:
            return out.copy_(v)
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out.copy_(v, non_blocking=True)
        v.record_stream(stream)  # the allocator keeps v until the copy has read it
        return out

    def ready(self) -> None:
        """All stored copies complete (before the replay reads them)."""
        if self._stream is not None:
            self._stream.synchronize()

    def replay(self, chunks: Iterable[Any]) -> Iterator[tuple[Any, torch.Tensor]]:
        """(chunk, its ``v`` on the device) in order; from the host the next chunk is prefetched."""
        chunks = list(chunks)
        if not (self.host and self.device is not None and self.device.type == "cuda"):
            for chunk in chunks:
                yield chunk, chunk.v if self.device is None else chunk.v.to(self.device)
            return
        self.ready()
        stream, current = self._side_stream(), torch.cuda.current_stream()

        def fetch(chunk):
            with torch.cuda.stream(stream):
                return chunk.v.to(self.device, non_blocking=True), stream.record_event()

        pending = fetch(chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            v, done = pending
            if i + 1 < len(chunks):
                pending = fetch(chunks[i + 1])
            current.wait_event(done)
            v.record_stream(current)  # allocated on the side stream, used on this one
            yield chunk, v
