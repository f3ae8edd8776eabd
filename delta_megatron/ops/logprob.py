"""Vocab-parallel, token-chunked log p(y_t), entropy and top-K from the LM head's local vocab shard.

Megatron's output layer is column-parallel over the vocabulary: TP rank r holds logits (or the weight
rows) for vocab ids ``[r·V/TP, (r+1)·V/TP)``. Per token we need (with ``z = logits / T``)

    lse_t = log Σ_j exp z_tj,   log p_t(y_t) = z_t,y − lse_t,   H_t = lse_t − Σ_j p_tj z_tj.

Tokens are processed in chunks of ``chunk`` so the largest temporary is ``[chunk, V/TP]``; with the
``*_from_hidden`` variant the logits themselves are made chunk by chunk from ``h`` and the weight
shard, so ``[tokens, V]`` never exists. Each rank keeps, per token, its local max ``m``, shifted sums
``s = Σ e^{z−m}``, ``a = Σ e^{z−m}(z−m)`` and its target logit; after the chunk loop the TP group
does one MAX all-reduce of ``m`` and one SUM all-reduce of the rescaled ``[s, a, z_y]`` — two
collectives per call, not per chunk. Backward recomputes ``p`` chunk-wise from the saved logits (or
from ``h`` and the weight), using only the saved global ``lse`` and ``H``: no communication for
the logits variant, one all-reduce of ``grad h`` for the hidden variant (a reduce-scatter with
sequence parallelism, done by megatron's gather's backward).

Gradients (``z = x/T``):  ∂logp/∂z_j = 1[j=y] − p_j,   ∂H/∂z_j = −p_j (log p_j + H).
Targets < 0 mean "no target" (logp = 0, no gradient through logp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["LogProbOutput", "vocab_parallel_logprobs", "chunked_logprob_from_hidden"]


@dataclass
class LogProbOutput:
    """Per-token results, shaped like ``targets``. ``logp`` and ``entropy`` carry gradients."""

    logp: torch.Tensor  # [...] log p(y_t) of the temperature-scaled distribution
    entropy: torch.Tensor | None  # [...] H_t
    lse: torch.Tensor  # [...] global log-sum-exp of z (detached)
    topk_logits: torch.Tensor | None = None  # [..., K] z values, descending (detached)
    topk_ids: torch.Tensor | None = None  # [..., K] global vocab ids


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Geometry:
    """Where this rank's vocab shard sits and how many of its columns are real (not TP padding)."""

    def __init__(self, local_vocab: int, group, vocab_size: int | None):
        self.rank, self.size = _tp(group)
        self.group = group if self.size > 1 else None
        self.start = self.rank * local_vocab
        real = local_vocab if vocab_size is None else min(local_vocab, vocab_size - self.start)
        self.n_real = max(real, 0)


def _local_targets(targets: torch.Tensor, geo: _Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(column in this shard or 0, owned mask) for global target ids ``targets`` ``[c]``."""
    local = targets - geo.start
    owned = (targets >= 0) & (local >= 0) & (local < geo.n_real)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class _Workspace:
    """Two reusable ``[chunk, V/TP]`` buffers (logits, exp). Allocating ~chunk·V floats afresh per
    chunk costs page faults that dominate on CPU; peak memory is these two buffers."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device):
        self.z = torch.empty(rows, cols, dtype=dtype, device=device)
        self.e = torch.empty(rows, cols, dtype=dtype, device=device)

    def from_hidden(self, h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
        z = self.z[: h.shape[0]]
        if h.dtype == z.dtype:
            torch.matmul(h, w.t(), out=z)
        else:
            z.copy_(h @ w.t())  # bf16 GEMM, statistics in fp32
        return z.mul_(1.0 / temperature) if temperature != 1.0 else z

    def from_logits(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        z = self.z[: x.shape[0]].copy_(x)
        return z.mul_(1.0 / temperature) if temperature != 1.0 else z

    def exp(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(z, out=self.e[: z.shape[0]])


def _chunk_forward(z: torch.Tensor, targets: torch.Tensor, geo: _Geometry, top_k: int,
                   ws: _Workspace):
    """Statistics of one chunk of scaled logits ``z`` ``[c, n_real]`` (modified in place)."""
    c = z.shape[0]
    if z.shape[1] == 0:  # this shard is all TP padding
        kw = dict(dtype=z.dtype, device=z.device)
        neg, zero = torch.full((c,), float("-inf"), **kw), torch.zeros(c, **kw)
        tk = (torch.full((c, top_k), float("-inf"), **kw),
              torch.full((c, top_k), -1, dtype=torch.long, device=z.device)) if top_k else None
        return neg, zero, zero, zero, torch.zeros(c, dtype=torch.bool, device=z.device), tk
    m = z.max(dim=-1).values  # [c]
    z.sub_(m.unsqueeze(1))  # z − m
    tk = None
    if top_k:
        vals, idx = torch.topk(z, min(top_k, z.shape[1]), dim=-1)
        vals, idx = vals + m.unsqueeze(1), idx + geo.start
        if vals.shape[1] < top_k:  # a shard with fewer real columns than K: pad with (−inf, −1)
            pad = top_k - vals.shape[1]
            vals = torch.cat([vals, vals.new_full((c, pad), float("-inf"))], dim=1)
            idx = torch.cat([idx, idx.new_full((c, pad), -1)], dim=1)
        tk = (vals, idx)
    col, owned = _local_targets(targets, geo)
    zy = torch.where(owned, z.gather(1, col.unsqueeze(1)).squeeze(1), torch.zeros_like(m))
    e = ws.exp(z)  # [c, n_real]
    s = e.sum(dim=-1)
    a = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(c)  # Σ e·(z−m) without a [c, V] product
    return m, s, a, zy, owned, tk


class _Accumulator:
    """Per-token local statistics over all chunks, then the TP merge."""

    def __init__(self, n: int, dtype: torch.dtype, device, top_k: int):
        self.m = torch.empty(n, dtype=dtype, device=device)
        self.sa = torch.empty(3, n, dtype=dtype, device=device)  # s, a, z_y − m
        self.owned = torch.empty(n, dtype=torch.bool, device=device)  # this shard holds y_t
        self.top_k = top_k
        if top_k:
            self.tk_vals = torch.empty(n, top_k, dtype=dtype, device=device)
            self.tk_ids = torch.empty(n, top_k, dtype=torch.long, device=device)

    def put(self, lo: int, hi: int, stats) -> None:
        m, s, a, zy, owned, tk = stats
        self.m[lo:hi], self.sa[0, lo:hi], self.sa[1, lo:hi], self.sa[2, lo:hi] = m, s, a, zy
        self.owned[lo:hi] = owned
        if tk is not None:
            self.tk_vals[lo:hi], self.tk_ids[lo:hi] = tk

    def finish(self, group, valid: torch.Tensor):
        """Merge shards: returns logp, entropy, lse, topk_vals, topk_ids (all global)."""
        m_glob = self.m.clone()
        if group is not None:
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
        has = self.sa[0] > 0
        shift = torch.where(has, self.m - m_glob, torch.zeros_like(m_glob))
        scale = torch.where(has, torch.exp(shift), torch.zeros_like(m_glob))
        sums = torch.stack([
            self.sa[0] * scale,  # Σ e^{z−M}
            (self.sa[1] + shift * self.sa[0]) * scale,  # Σ e^{z−M}(z−M)
            torch.where(self.owned, self.sa[2] + shift, torch.zeros_like(m_glob)),  # z_y − M
        ])
        if group is not None:
            dist.all_reduce(sums, group=group)
        log_s = torch.log(sums[0])
        logp = torch.where(valid, sums[2] - log_s, torch.zeros_like(log_s))
        entropy = log_s - sums[1] / sums[0]
        lse = m_glob + log_s
        tk_vals = tk_ids = None
        if self.top_k:
            tk_vals, tk_ids = self.tk_vals, self.tk_ids
            if group is not None:
                size = dist.get_world_size(group)
                all_v = [torch.empty_like(tk_vals) for _ in range(size)]
                all_i = [torch.empty_like(tk_ids) for _ in range(size)]
                dist.all_gather(all_v, tk_vals.contiguous(), group=group)
                dist.all_gather(all_i, tk_ids.contiguous(), group=group)
                cand_v, cand_i = torch.cat(all_v, dim=1), torch.cat(all_i, dim=1)  # [n, K·TP]
                tk_vals, pos = torch.topk(cand_v, self.top_k, dim=-1)
                tk_ids = cand_i.gather(1, pos)
        return logp, entropy, lse, tk_vals, tk_ids


def _grad_z(z: torch.Tensor, targets, geo, lse, ent, g_logp, g_ent, ws: _Workspace) -> torch.Tensor:
    """d(Σ g_logp·logp + g_ent·H)/dz for a chunk; ``z`` ``[c, n_real]`` is overwritten."""
    z.sub_(lse.unsqueeze(1))  # log p
    p = ws.exp(z)
    if g_logp is not None:
        g_logp = torch.where(targets >= 0, g_logp, torch.zeros_like(g_logp))
    if g_ent is not None:
        # −g_H p (log p + H), in z's buffer
        grad = z.add_(ent.unsqueeze(1)).mul_(p).mul_(-g_ent.unsqueeze(1))
        if g_logp is not None:
            grad.addcmul_(p, g_logp.unsqueeze(1), value=-1.0)
    elif g_logp is not None:
        grad = p.mul_(-g_logp.unsqueeze(1))
    else:
        return z.zero_()
    if g_logp is not None:
        col, owned = _local_targets(targets, geo)
        add = torch.where(owned, g_logp, torch.zeros_like(g_logp))
        grad.scatter_add_(1, col.unsqueeze(1), add.unsqueeze(1))
    return grad


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, temperature, vocab_size, chunk, top_k):
        n, local_vocab = logits.shape
        geo = _Geometry(local_vocab, group, vocab_size)
        cdt = _compute_dtype(logits.dtype)
        acc = _Accumulator(n, cdt, logits.device, top_k)
        ws = _Workspace(min(chunk, n), geo.n_real, cdt, logits.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = ws.from_logits(logits[lo:hi, : geo.n_real], temperature)  # [c, Vr]
            acc.put(lo, hi, _chunk_forward(z, targets[lo:hi], geo, top_k, ws))
        logp, ent, lse, tkv, tki = acc.finish(geo.group, targets >= 0)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.geo, ctx.temperature, ctx.chunk = geo, temperature, chunk
        ctx.mark_non_differentiable(lse, *(t for t in (tkv, tki) if t is not None))
        ctx.set_materialize_grads(False)  # unused outputs give None, skipping their terms
        return logp, ent, lse, tkv, tki

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
        logits, targets, lse, ent = ctx.saved_tensors
        geo, temp, chunk = ctx.geo, ctx.temperature, ctx.chunk
        grad = torch.zeros_like(logits)
        cdt = lse.dtype
        ws = _Workspace(min(chunk, logits.shape[0]), geo.n_real, cdt, logits.device)
        for lo in range(0, logits.shape[0], chunk):
            hi = min(lo + chunk, logits.shape[0])
            z = ws.from_logits(logits[lo:hi, : geo.n_real], temp)
            gz = _grad_z(z, targets[lo:hi], geo, lse[lo:hi], ent[lo:hi],
                         None if g_logp is None else g_logp[lo:hi].to(cdt),
                         None if g_ent is None else g_ent[lo:hi].to(cdt), ws)
            grad[lo:hi, : geo.n_real] = gz.mul_(1.0 / temp)
        return grad, None, None, None, None, None, None


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, group, temperature, vocab_size, chunk, top_k, reduce_grad_h):
        n = h.shape[0]
        geo = _Geometry(weight.shape[0], group, vocab_size)
        cdt = _compute_dtype(h.dtype)
        w = weight[: geo.n_real]  # [Vr, d]
        acc = _Accumulator(n, cdt, h.device, top_k)
        ws = _Workspace(min(chunk, n), geo.n_real, cdt, h.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = ws.from_hidden(h[lo:hi], w, temperature)  # [c, Vr]: logits of this chunk only
            acc.put(lo, hi, _chunk_forward(z, targets[lo:hi], geo, top_k, ws))
        logp, ent, lse, tkv, tki = acc.finish(geo.group, targets >= 0)
        ctx.save_for_backward(h, weight, targets, lse, ent)
        ctx.geo, ctx.temperature, ctx.chunk, ctx.reduce = geo, temperature, chunk, reduce_grad_h
        ctx.mark_non_differentiable(lse, *(t for t in (tkv, tki) if t is not None))
        ctx.set_materialize_grads(False)  # unused outputs give None, skipping their terms
        return logp, ent, lse, tkv, tki

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_):
        h, weight, targets, lse, ent = ctx.saved_tensors
        geo, temp, chunk = ctx.geo, ctx.temperature, ctx.chunk
        w = weight[: geo.n_real]
        cdt = lse.dtype
        grad_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        ws = _Workspace(min(chunk, h.shape[0]), geo.n_real, cdt, h.device)
        for lo in range(0, h.shape[0], chunk):
            hi = min(lo + chunk, h.shape[0])
            z = ws.from_hidden(h[lo:hi], w, temp)
            gz = _grad_z(z, targets[lo:hi], geo, lse[lo:hi], ent[lo:hi],
                         None if g_logp is None else g_logp[lo:hi].to(cdt),
                         None if g_ent is None else g_ent[lo:hi].to(cdt), ws)
            gz = gz.mul_(1.0 / temp).to(h.dtype)  # [c, Vr]
            if grad_h is not None:
                torch.matmul(gz, w, out=grad_h[lo:hi])  # [c, d]
            if grad_w is not None:
                grad_w[: geo.n_real].addmm_(gz.t(), h[lo:hi])  # [Vr, d], no temporary
        if grad_h is not None and ctx.reduce and geo.group is not None:
            dist.all_reduce(grad_h, group=geo.group)  # each rank saw only its vocab shard
        return grad_h, grad_w, None, None, None, None, None, None, None


def _output(shape, logp, ent, lse, tkv, tki, with_entropy) -> LogProbOutput:
    k_shape = (*shape, -1)
    return LogProbOutput(
        logp=logp.view(shape), entropy=ent.view(shape) if with_entropy else None,
        lse=lse.view(shape),
        topk_logits=None if tkv is None else tkv.view(k_shape),
        topk_ids=None if tki is None else tki.view(k_shape),
    )


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, tp_group=None, *,
                            temperature: float = 1.0, chunk_tokens: int = 1024, top_k: int = 0,
                            vocab_size: int | None = None, with_entropy: bool = True) -> LogProbOutput:
    """Log-probs (and entropy, top-K) from a vocab-parallel logits shard ``[..., V/TP]``.

    ``targets`` ``[...]`` are global vocab ids (< 0: none). ``vocab_size``: the real vocab when the
    megatron vocab is padded to a multiple of TP (padding columns are ignored). Differentiable in
    ``logits`` through ``logp`` and ``entropy``; backward needs no communication.
    """
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])  # [T, V/TP]
    out = _FromLogits.apply(flat, targets.reshape(-1), tp_group, float(temperature), vocab_size,
                            int(chunk_tokens), int(top_k))
    return _output(shape, *out, with_entropy)


def chunked_logprob_from_hidden(h: torch.Tensor, output_weight_shard: torch.Tensor,
                                targets: torch.Tensor, tp_group=None, chunk: int = 1024, *,
                                temperature: float = 1.0, top_k: int = 0,
                                vocab_size: int | None = None, sequence_parallel: bool = False,
                                with_entropy: bool = True) -> LogProbOutput:
    """Run the LM head chunk-wise from ``h`` ``[..., d]`` and the weight shard ``[V/TP, d]``.

    Equivalent to ``vocab_parallel_logprobs(h @ W_r.T, ...)`` without ever holding more than
    ``[chunk, V/TP]`` logits, forward or backward. Differentiable in ``h`` and the weight (the ``h``
    gradient is summed over TP, as megatron's column-parallel output layer does). With
    ``sequence_parallel`` ``h`` is this rank's sequence shard (dim 0, megatron's ``[s/TP, b, d]``):
    it is all-gathered first and ``targets`` must cover the gathered tokens.
    """
    reduce_grad_h = True
    if sequence_parallel and _tp(tp_group)[1] > 1:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=tp_group)
        reduce_grad_h = False  # the gather's backward reduce-scatters the partial gradients
    shape = targets.shape
    flat = h.reshape(-1, h.shape[-1])  # [T, d]
    if flat.shape[0] != targets.numel():
        raise ValueError(f"h has {flat.shape[0]} tokens but targets {targets.numel()}")
    out = _FromHidden.apply(flat, output_weight_shard, targets.reshape(-1), tp_group,
                            float(temperature), vocab_size, int(chunk), int(top_k), reduce_grad_h)
    return _output(shape, *out, with_entropy)
