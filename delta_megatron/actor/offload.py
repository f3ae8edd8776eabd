"""Moving the actor's training state off the device while a colocated rollout engine generates.

Three parts, each moved with the mechanism that keeps every view of it valid:

* ``grads`` — megatron-core's own ``DistributedDataParallel.offload_grad_buffers`` /
  ``restore_grad_buffers``: the grad buffers' storage is freed (``resize_(0)``) and re-allocated
  zeroed. Gradients do not survive an optimizer step anyway, so nothing is copied.
* ``optimizer`` — Adam's ``exp_avg`` / ``exp_avg_sq`` and the fp32 main params (the copies the
  mixed-precision and distributed optimizers own) are re-bound to host copies, as megatron-core's
  ``MegatronOptimizer.offload_to_cpu`` does, but into *pinned* buffers kept across steps (torch's
  caching host allocator) and for tensors on any device, so the CPU runs exercise the same path.
  Main params that are views of model params (fp32 models) belong to ``weights`` and stay.
* ``weights`` — every storage behind the model's parameters (megatron's DDP param buffer, or each
  parameter) is copied to a pinned host buffer and freed with ``resize_(0)``, then re-allocated and
  copied back: the mechanism of megatron-core's ``_ParamAndGradBuffer.offload_to_cpu``, applied per
  storage because that method pins with ``Tensor.pin_memory`` (CUDA only) and covers only the
  distributed optimizer's param buffer. Views (params, ``main_grad``, optimizer shards) stay bound.

Every copy is exact, so a round trip is bit-exact. Nothing here allocates device memory by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

PARTS = ("weights", "grads", "optimizer")


def _pinned_empty(like: torch.Tensor | int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor shaped like ``like`` (or ``like`` bytes), pinned when CUDA is present."""
    pin = torch.cuda.is_available()
    if isinstance(like, int):
        return torch.empty(like, dtype=dtype or torch.uint8, device="cpu", pin_memory=pin)
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)


def _bytes_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage`` (whatever dtype its tensors use)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the host copies are complete before anyone reads them


class ActorOffload:
    """Offload / onload of the actor's ``weights``, ``grads`` and ``optimizer`` state.

    ``model`` is the list of megatron DDP-wrapped chunks, ``optimizer`` the megatron optimizer
    (plain, distributed or chained). ``offloaded`` is the set of parts currently off the device.
    """

    def __init__(self, model: list, optimizer):
        self.model, self.optimizer = model, optimizer
        self.offloaded: set[str] = set()
        self._weights: list[tuple[torch.UntypedStorage, int, torch.Tensor]] = []  # storage, bytes, host
        self._host: dict[tuple, torch.Tensor] = {}  # pinned buffers, reused across steps
        self._moved: list[tuple[object, object, torch.device]] = []  # (container, key, device) of optimizer

    # ------------------------------------------------------------------ what belongs to which part
    def _model_storages(self) -> list[torch.UntypedStorage]:
        seen, out = set(), []
        for chunk in self.model:
            for p in chunk.parameters():
                st = p.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes():
                    seen.add(st.data_ptr())
                    out.append(st)
        return out

    def _grad_storages(self) -> Iterator[torch.UntypedStorage]:
        for chunk in self.model:
            for buf in chunk.buffers + chunk.expert_parallel_buffers:
                if buf.grad_data is not None:
                    yield buf.grad_data.untyped_storage()

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        wrappers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]

    def _optimizer_tensors(self) -> Iterator[tuple[object, object, torch.Tensor]]:
        """(container, key, tensor) of every optimizer-owned tensor: the Adam state (not the scalar
        step) and the main params that are not model params. ``container[key]`` is the binding; for
        a main param the container is the parameter itself (re-bound through ``.data``)."""
        model = {st.data_ptr() for st in self._model_storages()} | {
            w[0].data_ptr() for w in self._weights}
        for opt in self._torch_optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.untyped_storage().data_ptr() not in model:
                        yield p, None, p
            for state in opt.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        yield state, key, value

    # ------------------------------------------------------------------ moves
    def offload(self, parts: Iterable[str]) -> None:
        parts = _checked(parts)
        if "optimizer" in parts and "optimizer" not in self.offloaded:
            self._offload_optimizer()
        if "grads" in parts and "grads" not in self.offloaded:
            for chunk in self.model:
                chunk.offload_grad_buffers(synchronize=torch.cuda.is_available(), empty_cache=False)
        if "weights" in parts and "weights" not in self.offloaded:
            self._offload_weights()
        self.offloaded |= parts
        _sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks back for the engine to map

    def onload(self, parts: Iterable[str] | None = None) -> None:
        parts = set(self.offloaded) if parts is None else _checked(parts) & self.offloaded
        if "weights" in parts:
            for storage, nbytes, host in self._weights:
                storage.resize_(nbytes)
                _bytes_view(storage, nbytes).copy_(host, non_blocking=True)
            self._weights = []
        if "grads" in parts:
            for chunk in self.model:
                chunk.restore_grad_buffers(synchronize=torch.cuda.is_available())
        if "optimizer" in parts:
            for container, key, device in self._moved:
                host = container if key is None else container[key]
                on_device = torch.empty(host.shape, dtype=host.dtype, device=device)
                on_device.copy_(host, non_blocking=True)
                _bind(container, key, on_device)
            self._moved = []
        self.offloaded -= parts
        _sync()

    def _reuse(self, key: tuple, like: torch.Tensor | int) -> torch.Tensor:
        """The pinned buffer kept under ``key`` if it still fits, else a new one."""
        host = self._host.get(key)
        shape = (like,) if isinstance(like, int) else tuple(like.shape)
        dtype = torch.uint8 if isinstance(like, int) else like.dtype
        if host is None or tuple(host.shape) != shape or host.dtype != dtype:
            host = self._host[key] = _pinned_empty(like)
        return host

    def _offload_optimizer(self) -> None:
        for container, key, tensor in list(self._optimizer_tensors()):
            host = self._reuse(("optimizer", id(container), key), tensor)
            host.copy_(tensor.detach(), non_blocking=True)
            self._moved.append((container, key, tensor.device))
            if key is None:
                container.grad = None  # transient: rebuilt from main_grad at the next step
            _bind(container, key, host)

    def _offload_weights(self) -> None:
        for i, storage in enumerate(self._model_storages()):  # the same order every time
            nbytes = storage.nbytes()
            host = self._reuse(("weights", i), nbytes)
            host.copy_(_bytes_view(storage, nbytes), non_blocking=True)
            self._weights.append((storage, nbytes, host))
        _sync()  # the copies have read the storages before they are freed
        for storage, _, _ in self._weights:
            storage.resize_(0)

    # ------------------------------------------------------------------ measurement
    def resident_bytes(self) -> dict[str, int]:
        """Bytes of each part that are on the device now (0 while offloaded): measured from the
        tensors themselves, for the memory ledger's checks."""
        weights = sum(st.nbytes() for st in self._model_storages())
        grads = sum(st.nbytes() for st in self._grad_storages())
        host = {t.untyped_storage().data_ptr() for t in self._host.values()}
        optimizer = sum(t.untyped_storage().nbytes() for _, _, t in self._optimizer_tensors()
                        if t.untyped_storage().data_ptr() not in host)
        return {"weights": weights, "grads": grads, "optimizer": optimizer}


def _checked(parts: Iterable[str]) -> set[str]:
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"actor offload: unknown parts {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    return parts


def _bind(container, key, tensor: torch.Tensor) -> None:
    if key is None:
        container.data = tensor
    else:
        container[key] = tensor
