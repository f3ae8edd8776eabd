"""The one place where megatron-core's hard-coded CUDA calls are redirected to the CPU.

Why: megatron-core 0.16 has ~150 CUDA call sites. On the CPU dev/CI machine the ones on our paths
(GPT forward/backward with the local spec, TP/PP on gloo, vocab-parallel CE, pipeline schedules,
dist-ckpt) fail in exactly these places (measured, see docs PLATFORM.md):

* ``torch.cuda.current_device()`` used as a ``device=`` argument (rotary embedding, layers, p2p);
* ``torch.cuda.synchronize()`` (parallel_state, p2p, dist-ckpt);
* the CUDA RNG used by ``model_parallel_cuda_manual_seed`` and the RNG tracker
  (``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and megatron's
  ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state``);
* literal ``device="cuda"`` tensors and ``.cuda()`` / ``.to("cuda")`` (pipeline schedules);
* ``param.grad.type() == 'torch.cuda.FloatTensor'`` asserts (optimizer grad clipping): a bare
  ``Tensor.type()`` reports the CUDA type name.

``apply()`` maps the first three to CPU equivalents and installs a global ``TorchFunctionMode`` that
rewrites CUDA devices to CPU. It changes process-global state, so it runs only when
``torch.cuda.is_available()`` is False (a no-op on GPU machines) and is idempotent.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_MODE: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a GPU


class _CudaToCpu(TorchFunctionMode):
    """Rewrite ``device=cuda*`` kwargs, ``.cuda()`` and ``.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace("torch.", "torch.cuda.", 1)  # 'torch.FloatTensor' → CUDA name
        return result


def _get_rng_state(device=None, clone=False, graph_safe=False):  # noqa: ARG001 (megatron's signature)
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
    torch.set_rng_state(new_state)


def is_applied() -> bool:
    return _MODE is not None


def apply() -> bool:
    """Install the shim if CUDA is unavailable. Returns True when the shim is (now) active."""
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is not None:
        return True
    from megatron.core.tensor_parallel import random as mg_random

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    mg_random._get_cuda_rng_state = _get_rng_state
    mg_random._set_cuda_rng_state = _set_rng_state
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays on for the life of the process
    return True
