"""DelTA statistics: packed per-pass accumulators and γ estimators (the sums and the exact k-th value
search over a process group live in ``ops/reduce.py``).

Every DelTA pass reduces a handful of d-vectors and scalars (delta.md §9.2). ``FlatStats`` lays them
out in ONE flat float64 buffer, so a pass costs exactly one ``all_reduce(SUM)`` whatever it carries,
and a reduction over any process group is an elementwise sum — the property that makes the sharded
result equal the single-process one. float64 keeps ``E[x²] − E[x]²`` (γ, §4.2) and the d×d moments
(§9.3) free of cancellation; per-token work stays in the compute dtype (fp32 by default).
Also here: the per-token primitives (proxies §2, one-scalar margin §9.1) and the scope's process
group (§9.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from delta_megatron.ops.reduce import all_reduce, group_size, kth_largest  # noqa: F401 (re-exported)


class FlatStats:
    """Named slots (shapes) packed into one flat float64 buffer that is all-reduced in one call.

    ``add(name, x)`` accumulates into a slot; ``reduce(group)`` sums the whole buffer over the group;
    ``get(name)`` returns a view with the slot's shape.
    """

    def __init__(self, slots: dict[str, tuple[int, ...]], device: torch.device | str = "cpu"):
        self.shapes = dict(slots)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            self.offsets[name] = (start, start + size)
            start += size
        self.buffer = torch.zeros(start, dtype=torch.float64, device=device)  # [total]
        self.reduced = False

    def get(self, name: str) -> torch.Tensor:
        lo, hi = self.offsets[name]
        return self.buffer[lo:hi].view(self.shapes[name])

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if self.reduced:
            raise RuntimeError(f"FlatStats slot {name!r}: cannot accumulate after the reduction")
        view = self.get(name)
        if isinstance(value, torch.Tensor):
            view.add_(value.to(dtype=torch.float64).reshape(view.shape))
        else:
            view.add_(float(value))

    def reduce(self, group: Any) -> FlatStats:
        all_reduce(self.buffer, group)
        self.reduced = True
        return self


@dataclass
class Chunk:
    """Per-key state of one observed micro-batch chunk (valid tokens only)."""

    mask: torch.Tensor  # [n] bool
    side: torch.Tensor  # [nv] +1 / −1 / 0 (compute dtype)
    w: torch.Tensor  # [nv] |A|
    v: torch.Tensor | None = None  # [nv, d] cache (cache mode)
    lam: torch.Tensor | None = None  # [nv] final λ (before normalisation)
    sel_key: torch.Tensor | None = None  # [nv] uniform keys (random50)
    ids: torch.Tensor | None = None  # [nv] int64 global token ids (layout-invariant random draws)
    seen: int = 0  # last data pass that observed this chunk


def stage_slots(stage: str, d: int, moments: bool) -> dict[str, tuple[int, ...]]:
    """Flat-buffer layout of each stage: d-vectors and scalars per side ([2, ...] = +, −)."""
    if stage == "collect":
        slots = {"S": (2, d), "M": (2,), "count": (3,)}  # Σ w v, Σ w, #(+, −, 0)
        if moments:
            slots.update(U=(2, d), Q=(2, d, d))  # Σ v, Σ v vᵀ (unweighted, §9.3)
        return slots
    if stage == "gamma":
        return {"dsum": (2,), "dsq": (2,)}
    if stage == "refine":
        return {"S": (2, d), "M": (2,), "dsum": (2,), "dsq": (2,), "asum": (2,)}
    if stage == "final":
        return {"Z": (1,), "Zsq": (1,), "dsum": (2,), "dsq": (2,), "asum": (2,)}
    return {"count": (3,), "Z": (1,), "Zsq": (1,)}  # random


def side_sums(coef: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_t coef[s, t] v_t per side: coef [2, n], v [n, d] -> [2, d]. Two matrix-vector products: on
    CPU the equivalent [2, n] @ [n, d] GEMM takes a packing path ~100x slower (measured)."""
    return torch.stack([v.T @ c for c in coef])


def side_gamma(total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor,
               eps_gamma: float) -> torch.Tensor:
    """γ_s = sqrt(max(Var_s, ε_γ)) per side from Σx, Σx², count (delta.md §4.2).

    Plain population variance over the side's tokens, E[x²] − E[x]², with the count clamped ≥ 1 (as in
    the released code). Inputs ``[2]`` (positive, negative side), float64; returns ``[2]``.
    """
    n = count.clamp(min=1.0)
    var = total_sq / n - (total / n) ** 2
    return var.clamp(min=eps_gamma).sqrt()


def gamma_from_moments(D: torch.Tensor, sum_v: torch.Tensor, sum_vv: torch.Tensor,
                       count: torch.Tensor, eps_gamma: float) -> torch.Tensor:
    """γ^(0) without a margin pass (delta.md §9.3): Var_s(m) = 4 Dᵀ Cov_s(v) D, c drops out.

    ``D = μ_+ − μ_-`` [d]; per side unweighted ``Σv`` [2, d], ``Σvvᵀ`` [2, d, d] and counts [2], all
    float64. Returns ``sqrt(max(4 DᵀCov D, ε_γ))`` per side, i.e. ``2·sqrt(max(DᵀCovD, ε_γ/4))``.
    """
    n = count.clamp(min=1.0)  # [2]
    second = torch.einsum("i,sij,j->s", D, sum_vv, D) / n  # [2]  Dᵀ E[vvᵀ] D
    first = (sum_v @ D) / n  # [2]  Dᵀ E[v]
    var = 4.0 * (second - first**2)
    return var.clamp(min=eps_gamma).sqrt()


# ------------------------------------------------------------- proxies and margin (§2, §9.1)

def output_row_proxy(h: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``v = (1 − p(y)) h`` = ∂ log p(y)/∂W_y (§2.1, App. F), in ≥ fp32. h [n, d], logp [n] -> [n, d]."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    return (-torch.expm1(logp.to(dtype))).unsqueeze(-1) * h.to(dtype)


def topk_logits_from_hidden(h: torch.Tensor, weight: torch.Tensor, k: int, temperature: float = 1.0,
                            chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k vocab ids and logits of ``h Wᵀ / T``, chunked over tokens so [n, V] never exists.

    h [n, d], weight [V, d] -> (ids [n, k] long, logits [n, k]). Single process; under vocab-parallel
    TP take the local top-k of each shard, all-gather the k·TP candidates and keep the global top-k.
    """
    dtype = torch.promote_types(h.dtype, torch.float32)
    ids, vals = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        logits = h[start:start + chunk_tokens].to(dtype) @ weight.to(dtype).T / temperature  # [c, V]
        top = logits.topk(k, dim=-1)
        ids.append(top.indices)
        vals.append(top.values)
    if not ids:
        return h.new_zeros((0, k), dtype=torch.long), h.new_zeros((0, k), dtype=dtype)
    return torch.cat(ids), torch.cat(vals)


def topk_hidden_proxy(weight: torch.Tensor, token_ids: torch.Tensor, topk_ids: torch.Tensor,
                      topk_logits: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """``v̂ = W_y − Σ_{j∈top-K} p̃(j) W_j``, p̃ = softmax over the top-K logits (§2.2, App. F).

    A top-K approximation of ∇_h log p(y). weight [V, d], token_ids [n], topk_ids / topk_logits
    [n, K] -> [n, d]. Under vocab-parallel TP ``weight`` is this rank's shard of rows
    ``[vocab_start, vocab_start + rows)``: the result is the rank's partial
    ``1[y∈V_r] W_y − Σ_{j∈K∩V_r} p̃_j W_j`` and the sum over TP ranks is v̂ (§9.5). Ids outside the
    shard (and ``token_ids`` < 0) contribute nothing. One [n, d] gather per top-K column: never [n, K, d].
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    rows = weight.shape[0]

    def local(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = ids.to(weight.device) - vocab_start
        inside = (loc >= 0) & (loc < rows)
        return loc.clamp(0, max(rows - 1, 0)), inside

    y, y_in = local(token_ids)
    out = weight[y].to(dtype) * y_in.unsqueeze(-1).to(dtype)
    probs = torch.softmax(topk_logits.to(device=weight.device, dtype=dtype), dim=-1)  # [n, K]
    k_loc, k_in = local(topk_ids)
    probs = probs * k_in.to(dtype)
    for k in range(probs.shape[1]):
        out.sub_(probs[:, k:k + 1] * weight[k_loc[:, k]].to(dtype))
    return out


def margin(v: torch.Tensor, mu_pos: torch.Tensor, mu_neg: torch.Tensor) -> torch.Tensor:
    """m = ‖v−μ_-‖² − ‖v−μ_+‖² = 2 vᵀD + c with D = μ_+ − μ_-, c = ‖μ_-‖² − ‖μ_+‖² (§9.1): one dot per
    token, no [n, d] difference tensors. v [n, d], μ [d] -> [n]."""
    return 2 * (v @ (mu_pos - mu_neg)) + (mu_neg.dot(mu_neg) - mu_pos.dot(mu_pos))


def scope_group(scope: str, *, h_sequence_sharded: bool) -> Any:
    """The process group whose tokens form DelTA's scope, from megatron's ``parallel_state``.

    global: DP×CP (every response of the rollout batch), ×TP when ``h`` is read SP-sharded (each TP
    rank then holds different tokens; with gathered ``h`` every TP rank sees the same tokens and must
    not reduce over TP). dp_shard ([C]): only the ranks sharing one DP rank's responses, i.e. CP
    (×TP when SP-sharded). Call on the last pipeline stage only (it owns ``h`` and the loss).
    """
    from megatron.core import parallel_state as ps

    if scope == "global":
        if h_sequence_sharded:
            return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        return ps.get_data_parallel_group(with_context_parallel=True)
    if scope == "dp_shard":
        return ps.get_tensor_and_context_parallel_group() if h_sequence_sharded \
            else ps.get_context_parallel_group()
    raise ValueError(f"scope_group: scope={scope!r}, allowed: 'global', 'dp_shard'")


_SPLITMIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # 0x9E37.., 0xBF58.., 0x94D0..


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash_uniform(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """U[0, 1) float64 per id from the splitmix64 finaliser of (id, seed): a pure function of the
    token's identity, so random controls agree across layouts (int64 products wrap, as intended)."""
    offset = ((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64)
    offset -= (1 << 64) if offset >= (1 << 63) else 0  # as a signed int64
    x = ids.to(torch.int64) + offset
    x = (x ^ _shr(x, 30)) * _SPLITMIX[1]
    x = (x ^ _shr(x, 27)) * _SPLITMIX[2]
    x = x ^ _shr(x, 31)
    return _shr(x, 11).to(torch.float64) / float(1 << 53)
