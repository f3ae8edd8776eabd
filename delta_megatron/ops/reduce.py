"""Process-group reductions shared by the credit and loss stages: sums that are a no-op in one
process, and an exact distributed k-th value (order statistics without gathering the values).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size(group: Any) -> int:
    """World size of ``group``; 1 for ``None`` (single process) or when torch.distributed is off."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    """In-place sum (or ``op``) over ``group``; a no-op for a single process. A CPU tensor over an
    NCCL group goes through the current CUDA device (NCCL takes no CPU tensors)."""
    if group_size(group) > 1:
        op = dist.ReduceOp.SUM if op is None else op
        if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
            buf = tensor.cuda()
            dist.all_reduce(buf, op=op, group=group)
            tensor.copy_(buf.cpu())
        else:
            dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """Non-negative floats -> int64 keys with the same order (IEEE-754 bit patterns are monotone)."""
    if values.numel() and bool((values < 0).any()):
        raise ValueError("kth_largest: values must be non-negative")
    return values.to(torch.float64).contiguous().view(torch.int64)


def kth_largest(local_values: list[torch.Tensor], k: int, group: Any,
                device: torch.device | str | None = None) -> float:
    """The k-th largest value (1-based) of the union of every rank's ``local_values`` over ``group``.

    Exact and layout-independent: a bisection over the order-preserving int64 bit pattern of the
    float64 values, one scalar ``all_reduce`` (count of values ≥ the probe) per step, ≤ 63 steps.
    No rank ever holds the whole batch. Values must be non-negative. ``k`` is global.
    """
    keys = [_ordered_bits(v.flatten()) for v in local_values]
    device = keys[0].device if keys else (device or torch.device("cpu"))  # a rank may hold none
    total = torch.tensor([sum(int(k_.numel()) for k_ in keys)], dtype=torch.int64, device=device)
    all_reduce(total, group)
    if not 1 <= k <= int(total.item()):
        raise ValueError(f"kth_largest: k={k} outside 1..{int(total.item())}")
    lo, hi = 0, 0x7FF0000000000000  # bits of +0.0 and +inf
    # invariant: count(key >= lo) >= k and count(key >= hi + 1) < k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cnt = torch.zeros(1, dtype=torch.int64, device=device)
        for key in keys:
            cnt += (key >= mid).sum()
        all_reduce(cnt, group)
        if int(cnt.item()) >= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.tensor([lo], dtype=torch.int64).view(torch.float64).item()
