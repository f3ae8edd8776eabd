"""DelTA: discriminative token credit assignment (docs/methods/delta.md).

Each valid response token gets a loss weight λ̄ from how much closer its token-gradient proxy
``v = (1 − p(y)) h`` lies to its own side's advantage-weighted centroid than to the opposite side's
(§3–§5). Written as *accumulate per pass → one all-reduce (sum) → finish* (§9), so the same code is
the single-process reference and the sharded production path:

    engine = DeltaEngine(cfg, hidden_size=d, group=pg)         # pg: see ``scope_group``
    for p in engine.data_passes():                              # cache: 1, moments: K+2, recompute: K+3
        for key, mb in micro_batches:
            engine.observe(p, key, h=mb.h, logp=mb.logp, adv=mb.adv, mask=mb.mask)
        engine.end_pass(p)                                      # one all-reduce, on every rank
    lam_bar = engine.lambda_bar(key)                            # [n] for each observed chunk

Data passes include the old-log-prob pass itself, so the extra transformer forwards are 0 (cache:
``v`` is kept and the remaining passes run internally), K+1 (moments: γ^(0) from per-side first and
second moments, §9.3) and K+2 (recompute, the paper's count, §7.3). Recompute passes must reproduce
the same ``h``/``logp`` (deterministic no-grad forwards). ``tests/oracles/delta_reference.py`` is the
literal §6.1 algorithm with explicit two-distance margins; the tests hold the engine to it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from delta_megatron.credit.base import CREDIT_METHODS, CreditInputs, CreditNeeds, CreditOutput
from delta_megatron.credit.delta_cache import VCache
from delta_megatron.credit.delta_head import DeltaHeadObserver
from delta_megatron.credit.delta_stats import (
    Chunk,
    FlatStats,
    all_reduce,
    gamma_from_moments,
    group_size,
    hash_uniform,
    kth_largest,
    margin,
    output_row_proxy,
    scope_group,
    side_gamma,
    side_sums,
    stage_slots,
    topk_hidden_proxy,
    topk_logits_from_hidden,
)
from delta_megatron.utils.configs import Section, fail, option, validate

__all__ = ["DeltaConfig", "DeltaCredit", "DeltaEngine", "DeltaState", "margin",
           "output_row_proxy", "scope_group", "topk_hidden_proxy", "topk_logits_from_hidden"]


@dataclass
class DeltaConfig(Section):
    """DelTA hyper-parameters and the §8 ablation switches (defaults = the paper's main runs).

    ``selection`` (token-selection diagnostic, §8 / A10): rank all valid tokens of the scope by λ and
    keep the top / bottom / a random 50 % (ties at the cut are all kept). The output is then a loss
    *mask* and the loss is the plain unweighted token-mean over the **selected** tokens, i.e. the
    actor's global normaliser counts selected tokens instead of all valid ones.

    ``empty_side`` (A8): when one side is empty in the scope (all A ≥ 0 or all A ≤ 0), ``uniform``
    gives λ̄ ≡ 1 (plain DAPO for that batch); ``zero_centroid`` follows the released code, which has no
    special case: the empty side's centroid is 0 (mass clamped at ε), its γ comes from a count
    clamped ≥ 1, and λ, λ̄ are computed as usual (docs/methods/fidelity.md §6).

    ``scope`` is applied through the process group the engine reduces over
    (``DeltaCredit.process_group``). Random draws (``random_lambda``, ``random50``) follow each
    rank's observation order from ``seed``: these controls are random, not layout-invariant.
    """

    K: int = option(1, "refinement iterations of the centroids (§4.3)", ge=0, le=3)
    lambda_range: tuple[float, float] = option((0.8, 1.2), "[λ_min, λ_max] of the weight range map (§5)",
                                               ge=0)
    mode: Literal["cache", "moments", "recompute"] = option(
        "cache", "how later passes get v: cache it, first/second moments (K+1 forwards), recompute (K+2)")
    cache_dtype: Literal["float32", "bfloat16"] = option("float32", "dtype of the v cache (float32: >= fp32)")
    cache_device: Literal["auto", "gpu", "host"] = option(
        "auto", "cache mode: v on the GPU, or in pinned host memory (copies overlapped with the "
                "log-prob pass); auto: the planner picks what fits (launch writes it into the job's "
                "config), the GPU without a plan")
    scope: Literal["global", "dp_shard"] = option("global", "centroids over the rollout batch, or per "
                                                            "DP-rank shard (A1)")
    proxy: Literal["output_row", "topk_hidden"] = option("output_row", "token-gradient proxy (§2.1 / §2.2)")
    topk_k: int = option(16, "K of the top-K hidden-gradient proxy (A11: 16 or 32)", ge=1)
    eps: float = option(1e-8, "mass / Z clamp", gt=0)
    eps_gamma: float = option(1e-8, "variance floor of γ", gt=0)
    within_side_only: bool = option(False, "§8: α = σ(−‖v−μ_own‖²/γ_own), γ = std over own side (A11)")
    frozen_gamma: bool = option(False, "§8 w/o adaptive γ (A3): γ of the first batch, then frozen")
    hard_assignment: bool = option(False, "§8 w/o h(α): α = 1[Δ > 0]")
    lambda_norm: bool = option(True, "normalise λ to λ̄ (false: §8 w/o λ-norm)")
    range_map: bool = option(True, "map α into lambda_range (false: §8 w/o range map, weight α, Z0 tokens 0)")
    random_lambda: bool = option(False, "§8 Random λ: uniform on [λ_min, λ_max] (Z0 tokens: λ_min)")
    seed: int = option(0, "seed of random λ / random50 selection", ge=0)
    selection: Literal["none", "top50", "bottom50", "random50"] = option(
        "none", "token-selection diagnostic (A10): keep the top/bottom/a random 50% by λ as a loss mask")
    empty_side: Literal["uniform", "zero_centroid"] = option(
        "uniform", "one side empty in the scope: λ̄ ≡ 1 (uniform) or the reference's zero centroid")

    def validate(self) -> None:
        lo, hi = self.lambda_range
        if not 0.0 <= lo < hi:
            fail("lambda_range", self.lambda_range, "need 0 <= lower bound < upper bound")
        if self.mode == "moments" and self.within_side_only:
            fail("mode", self.mode, "'moments' needs the two-centroid margin (§9.3); with "
                 "within_side_only use 'cache' or 'recompute'")
        if self.within_side_only and self.hard_assignment:
            fail("hard_assignment", True, "with within_side_only Δ = −‖v−μ‖² ≤ 0, so α ≡ 0")
        if self.frozen_gamma and self.hard_assignment:
            fail("frozen_gamma", True, "has no effect with hard_assignment (γ unused)")
        if self.random_lambda:
            for name in ("within_side_only", "frozen_gamma", "hard_assignment"):
                if getattr(self, name):
                    fail(name, True, "has no effect with random_lambda")
            if not self.range_map:
                fail("range_map", False, "random_lambda draws from lambda_range; keep range_map")


# -------------------------------------------------------------------- production engine (§9)

@dataclass
class DeltaState:
    """What survives across rollout batches: the frozen γ of the A3 ablation and counters."""

    frozen_gamma: tuple[float, float] | None = None
    batches: int = 0
    degenerate_batches: int = 0


class DeltaEngine:
    """One rollout batch of DelTA over the tokens of ``group`` (the scope).

    The caller picks ``group`` (``scope_group``): DP×CP for the global scope, ×TP when ``h`` is read
    SP-sharded; the engine only sums what each rank observes, so every token of the scope must be
    observed exactly once across the group. ``end_pass`` and finishing are collectives: every rank
    calls them the same number of times (ranks may observe no chunk; pass ``device`` then).
    ``state`` carries the frozen γ and counters across batches (owned by ``DeltaCredit``).
    """

    def __init__(self, cfg: DeltaConfig, hidden_size: int, group: Any = None, *,
                 state: DeltaState | None = None, seed: int = 0,
                 device: torch.device | str | None = None, hash_seed: int | None = None):
        validate(cfg, "credit.delta")
        if hidden_size < 1:
            raise ValueError(f"DeltaEngine: hidden_size={hidden_size} must be >= 1")
        self.cfg, self.d, self.group = cfg, hidden_size, group
        self.state = state if state is not None else DeltaState()
        self._gen = torch.Generator().manual_seed(seed)
        self._hash_seed = seed if hash_seed is None else hash_seed  # for draws keyed by token ids
        self._device = torch.device(device) if device is not None else None
        self._dtype: torch.dtype | None = None
        self._frozen = cfg.frozen_gamma and self.state.frozen_gamma is not None
        need_gamma0 = not cfg.hard_assignment and not self._frozen
        self._moments = cfg.mode == "moments" and need_gamma0
        if cfg.random_lambda:
            self.stages = ["random"]
        else:
            gamma_pass = ["gamma"] if need_gamma0 and cfg.mode != "moments" else []
            self.stages = ["collect"] + gamma_pass + ["refine"] * cfg.K + ["final"]
        self._stage = 0
        self._pass = 0
        self._chunks: dict[Hashable, Chunk] = {}
        self._stats: FlatStats | None = None
        self._extremes: torch.Tensor | None = None  # [4] local max of (λ, −λ, Δ, −Δ)
        self.mu: torch.Tensor | None = None  # [2, d] float64 current centroids (+, −)
        self.gamma: torch.Tensor | None = None  # [2] γ used by the next assignment
        self.gamma0: torch.Tensor | None = None
        self.gamma_next: torch.Tensor | None = None  # std of the final margins (γ^(K+1))
        self.counts = torch.zeros(3, dtype=torch.float64)  # tokens (+, −, 0) in the scope
        self.mass = torch.zeros(2, dtype=torch.float64)  # M_± of μ^(0)
        self.degenerate = False  # λ̄ ≡ 1 for this batch (one side empty, empty_side = uniform)
        self.one_sided = False
        self.finished = False
        self.metrics: dict[str, float] = {}
        self._scale = 1.0
        self._threshold: float | None = None
        self._vcache: VCache | None = None  # cache mode: where v waits for the replayed stages

    # ---------------------------------------------------------------- driving API
    @property
    def num_data_passes(self) -> int:
        """Data passes the caller must feed (1 less than planned only once a batch is degenerate)."""
        return 1 if self.cfg.mode == "cache" else len(self.stages)

    def data_passes(self) -> Iterator[int]:
        """Yield pass indices until finished; stops early on a degenerate batch."""
        while not self.finished:
            p = self._pass
            yield p
            if self._pass == p and not self.finished:
                raise RuntimeError(f"DeltaEngine: call end_pass({p}) before asking for the next pass")

    def observe(self, p: int, key: Hashable, *, adv: torch.Tensor, mask: torch.Tensor,
                h: torch.Tensor | None = None, logp: torch.Tensor | None = None,
                v: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> None:
        """Feed one chunk (micro-batch) of pass ``p``: either ``h`` [n, d] + ``logp`` [n] (output-row
        proxy) or a ready proxy ``v`` [n, d]; ``adv`` [n] advantage per token, ``mask`` [n] bool.
        ``token_ids`` [n] (optional, int64): a global identity per token (e.g. its index in the rollout
        batch); the random controls (``random_lambda``, ``random50``) then draw from a hash of it, so
        their draws do not depend on the parallel layout or the observation order."""
        self._check_pass(p, "observe")
        if (v is None and (h is None or logp is None)) or (v is not None and (h is not None or logp is not None)):
            raise ValueError("DeltaEngine.observe: give h and logp, or v (not both)")
        x = v if v is not None else h
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"DeltaEngine.observe: h / v shape {tuple(x.shape)}, expected [n, {self.d}]")
        n = x.shape[0]
        if adv.shape != (n,) or mask.shape != (n,) or (logp is not None and logp.shape != (n,)):
            raise ValueError(f"DeltaEngine.observe: adv {tuple(adv.shape)} / mask {tuple(mask.shape)}"
                             f" / logp must be [{n}]")
        if mask.dtype != torch.bool:
            raise ValueError(f"DeltaEngine.observe: mask must be bool, got {mask.dtype}")
        if self._dtype is None:
            self._dtype = torch.promote_types(x.dtype, torch.float32)
            self._device = self._device or x.device
        vv = x[mask].to(self._dtype)  # [nv, d], a fresh copy of the valid rows only
        if v is None:  # output-row proxy (1 − p) h (§2.1), in place on the copy
            vv.mul_(-torch.expm1(logp[mask].to(self._dtype)).unsqueeze(-1))
        if p == 0:
            if key in self._chunks:
                raise ValueError(f"DeltaEngine.observe: chunk {key!r} observed twice in pass 0")
            a = adv[mask].to(self._dtype)
            chunk = Chunk(mask=mask.clone(), side=torch.sign(a), w=a.abs())
            if token_ids is not None:
                chunk.ids = token_ids[mask].to(torch.int64)
            if self.cfg.mode == "cache" and len(self.stages) > 1:
                cache_dtype = torch.bfloat16 if self.cfg.cache_dtype == "bfloat16" else self._dtype
                cached = vv.to(cache_dtype)
                vv = cached.to(self._dtype)  # pass 0 sees exactly what the cache replays
                chunk.v = self._cache().store(cached)
            self._chunks[key] = chunk
        else:
            chunk = self._chunks.get(key)
            if chunk is None:
                raise KeyError(f"DeltaEngine.observe: chunk {key!r} was not observed in pass 0")
            if chunk.mask.shape[0] != n:
                raise ValueError(f"DeltaEngine.observe: chunk {key!r} has {n} tokens in pass {p}, "
                                 f"{chunk.mask.shape[0]} in pass 0")
            if chunk.seen == p:
                raise ValueError(f"DeltaEngine.observe: chunk {key!r} observed twice in pass {p}")
        chunk.seen = p
        self._accumulate(self.stages[self._stage], chunk, vv)

    def end_pass(self, p: int) -> None:
        """Close pass ``p``: one all-reduce, then the stage's finish (cache mode: all stages)."""
        self._check_pass(p, "end_pass")
        missing = [k for k, c in self._chunks.items() if c.seen != p]
        if missing:
            raise ValueError(f"DeltaEngine.end_pass({p}): chunks {missing[:5]} not observed in this pass")
        self._end_stage()
        while self.cfg.mode == "cache" and not self.finished:  # replay the cache, no forwards
            for chunk, v in self._cache().replay(self._chunks.values()):
                self._accumulate(self.stages[self._stage], chunk, v.to(self._dtype))
            self._end_stage()
        self._pass += 1

    def lambda_bar(self, key: Hashable) -> torch.Tensor:
        """λ̄ [n] of an observed chunk (λ when lambda_norm is off; 1 if degenerate; 0 off-mask)."""
        chunk = self._finished_chunk(key)
        out = torch.zeros(chunk.mask.shape[0], dtype=self._dtype, device=chunk.mask.device)
        out[chunk.mask] = 1.0 if self.degenerate else chunk.lam * self._scale
        return out

    def selection_mask(self, key: Hashable) -> torch.Tensor:
        """Selected tokens [n] bool of the token-selection diagnostic (all valid if degenerate)."""
        chunk = self._finished_chunk(key)
        if self.cfg.selection == "none":
            raise ValueError("DeltaEngine.selection_mask: cfg.selection is 'none'")
        out = chunk.mask.clone()
        if not self.degenerate and chunk.lam.numel():
            if self.cfg.selection == "random50":
                out[chunk.mask] = chunk.sel_key >= self._threshold
            elif self.cfg.selection == "top50":
                out[chunk.mask] = chunk.lam.double() >= self._threshold
            else:
                out[chunk.mask] = chunk.lam.double() <= self._threshold
        return out

    def values(self, key: Hashable) -> torch.Tensor:
        """What the loss consumes: λ̄ (``loss_weight``) or the selection mask (``loss_mask``)."""
        return self.lambda_bar(key) if self.cfg.selection == "none" else self.selection_mask(key)

    # ---------------------------------------------------------------- internals
    def _cache(self) -> VCache:
        if self._vcache is None:
            self._vcache = VCache(self.cfg.cache_device, self._device)
        return self._vcache

    def _check_pass(self, p: int, what: str) -> None:
        if self.finished:
            raise RuntimeError(f"DeltaEngine.{what}({p}): the engine has finished "
                               f"({self._pass} data passes{', degenerate batch' if self.degenerate else ''})")
        if p != self._pass:
            raise ValueError(f"DeltaEngine.{what}({p}): the current data pass is {self._pass}")

    def _finished_chunk(self, key: Hashable) -> Chunk:
        if not self.finished:
            raise RuntimeError("DeltaEngine: coefficients are ready only after the last end_pass")
        if key not in self._chunks:
            raise KeyError(f"DeltaEngine: chunk {key!r} was never observed")
        return self._chunks[key]

    def _stats_for(self, stage: str) -> FlatStats:
        if self._stats is None:
            device = self._device or torch.device("cpu")
            self._stats = FlatStats(stage_slots(stage, self.d, self._moments), device)
            if self._extremes is None:
                self._extremes = torch.full((4,), float("-inf"), dtype=torch.float64, device=device)
        return self._stats

    def _own_margin(self, v: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Δ per token via the one-scalar margin m = 2 vᵀD + c, Δ = sign(A)·m (§9.1); within-side:
        Δ = −‖v − μ_own‖² = 2 vᵀμ_own − ‖v‖² − ‖μ_own‖². v [nv, d] -> [nv]."""
        mu = self.mu.to(self._dtype)  # [2, d]
        if self.cfg.within_side_only:
            dots = v @ mu.T  # [nv, 2]
            sq = (self.mu**2).sum(-1).to(self._dtype)  # [2]
            is_pos = side > 0
            own = torch.where(is_pos, dots[:, 0], dots[:, 1])
            return 2 * own - (v * v).sum(-1) - torch.where(is_pos, sq[0], sq[1])
        return side * margin(v, mu[0], mu[1])

    def _alpha(self, delta: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        if self.cfg.hard_assignment:
            return (delta > 0).to(self._dtype)
        g = self.gamma.to(self._dtype)
        return torch.sigmoid(delta / torch.where(side > 0, g[0], g[1]))

    def _accumulate(self, stage: str, chunk: Chunk, v: torch.Tensor) -> None:
        st = self._stats_for(stage)
        side, w = chunk.side, chunk.w
        pos, neg = side > 0, side < 0
        ind = torch.stack([pos, neg]).to(self._dtype)  # [2, nv]
        if stage in ("collect", "random"):
            st.add("count", torch.stack([pos.sum(), neg.sum(), (side == 0).sum()]))
        if stage == "collect":
            coef = ind * w  # [2, nv]
            st.add("S", side_sums(coef, v))
            st.add("M", coef.sum(-1))
            if self._moments:
                v64 = v.double()
                st.add("U", ind.double() @ v64)
                st.add("Q", torch.stack([v64[pos].T @ v64[pos], v64[neg].T @ v64[neg]]))
            return
        if stage == "random":
            lo, hi = self.cfg.lambda_range
            u = self._uniform(chunk, v.shape[0], salt=1).to(device=v.device, dtype=self._dtype)
            self._store_lambda(st, chunk, torch.where(pos | neg, lo + (hi - lo) * u, lo))
            return
        delta = self._own_margin(v, side)  # [nv]
        st.add("dsum", ind @ delta)
        st.add("dsq", ind @ delta**2)
        if stage == "gamma":
            return
        alpha = self._alpha(delta, side)
        st.add("asum", ind @ alpha)
        if stage == "refine":
            coef = ind * (w * alpha)
            st.add("S", side_sums(coef, v))
            st.add("M", coef.sum(-1))
            return
        lo, hi = self.cfg.lambda_range  # final: range map (§5, A14)
        if self.cfg.range_map:
            lam = torch.where(pos | neg, lo + (hi - lo) * alpha, lo)
        else:
            lam = torch.where(pos | neg, alpha, 0.0)
        sided = delta[pos | neg]
        if sided.numel():
            ext = torch.stack([sided.max(), -sided.min()]).double()
            self._extremes[2:] = torch.maximum(self._extremes[2:], ext)
        self._store_lambda(st, chunk, lam)

    def _store_lambda(self, st: FlatStats, chunk: Chunk, lam: torch.Tensor) -> None:
        chunk.lam = lam
        st.add("Z", lam.sum())
        st.add("Zsq", (lam**2).sum())
        if lam.numel():
            ext = torch.stack([lam.max(), -lam.min()]).double()
            self._extremes[:2] = torch.maximum(self._extremes[:2], ext)
        if self.cfg.selection == "random50":
            chunk.sel_key = self._uniform(chunk, lam.shape[0], salt=2).to(lam.device)

    def _uniform(self, chunk: Chunk, n: int, salt: int) -> torch.Tensor:
        """U[0, 1) per valid token: hashed from token ids when given, else the engine's generator."""
        ids = getattr(chunk, "ids", None)
        if ids is None:
            return torch.rand(n, generator=self._gen, dtype=torch.float64)
        return hash_uniform(ids.cpu(), self._hash_seed * 4 + salt)

    def _end_stage(self) -> None:
        stage = self.stages[self._stage]
        st = self._stats_for(stage).reduce(self.group)
        self._stats = None
        self._stage += 1
        cfg = self.cfg
        if stage in ("collect", "random"):
            self.counts = st.get("count").cpu()
            self.one_sided = not (self.counts[0] > 0 and self.counts[1] > 0)  # A8
            self.degenerate = self.one_sided and (cfg.empty_side == "uniform" or not self.counts.sum() > 0)
        if stage == "collect":
            self.mass = st.get("M").cpu()
            self.mu = st.get("S") / st.get("M").clamp(min=cfg.eps).unsqueeze(-1)  # μ^(0) (§3.1)
            if self.degenerate:
                self.stages = self.stages[:1]
            elif self._frozen:
                self.gamma = torch.tensor(self.state.frozen_gamma, dtype=torch.float64,
                                          device=self.mu.device)
            elif self._moments:  # γ^(0) from moments (§9.3)
                D = self.mu[0] - self.mu[1]
                self.gamma = self.gamma0 = gamma_from_moments(
                    D, st.get("U"), st.get("Q"), self.counts[:2].to(D.device), cfg.eps_gamma)
        elif stage == "gamma":  # γ^(0) from the margins at μ^(0) (§4.2)
            self.gamma = self.gamma0 = self._side_gamma(st)
        elif stage == "refine":
            gamma_next = self._side_gamma(st)  # lagged: std of Δ^(k) becomes γ^(k+1)
            self.mu = st.get("S") / st.get("M").clamp(min=cfg.eps).unsqueeze(-1)  # μ^(k+1)
            if not cfg.frozen_gamma:
                self.gamma = gamma_next
        elif stage == "final":
            self.gamma_next = self._side_gamma(st)
        if stage in ("final", "random") or self.degenerate:
            self._finalize(st)

    def _side_gamma(self, st: FlatStats) -> torch.Tensor:
        return side_gamma(st.get("dsum"), st.get("dsq"), self.counts[:2].to(st.buffer.device),
                          self.cfg.eps_gamma)

    def _finalize(self, st: FlatStats) -> None:
        """Global normaliser (§5), token selection (A10), metrics and the cross-batch state."""
        cfg = self.cfg
        self.finished = True
        n_tok = float(self.counts.sum())
        m = {"delta/degenerate": float(self.degenerate), "delta/one_sided": float(self.one_sided),
             "delta/n_pos": float(self.counts[0]),
             "delta/n_neg": float(self.counts[1]), "delta/n_zero": float(self.counts[2]),
             "delta/data_passes": float(self._pass + 1),
             "delta/extra_forwards": float(0 if cfg.mode == "cache" else self._pass)}
        if not self.degenerate:
            Z, Zsq = float(st.get("Z")[0]), float(st.get("Zsq")[0])
            self._scale = n_tok / max(Z, cfg.eps) if cfg.lambda_norm else 1.0  # λ̄ = λ·N_tok/Z
            ext = all_reduce(self._extremes.clone(), self.group, dist.ReduceOp.MAX).cpu().tolist()
            mean = Z / n_tok
            m.update({"delta/Z": Z, "delta/lambda_bar_mean": self._scale * mean,
                      "delta/lambda_bar_std": self._scale * max(Zsq / n_tok - mean**2, 0.0) ** 0.5,
                      "delta/lambda_bar_max": self._scale * ext[0],
                      "delta/lambda_bar_min": -self._scale * ext[1]})
            if not cfg.random_lambda:
                n = self.counts[:2].clamp(min=1).tolist()
                dsum, dsq, asum = (st.get(k).cpu().tolist() for k in ("dsum", "dsq", "asum"))
                for i, s in enumerate(("pos", "neg")):
                    mean_d = dsum[i] / n[i]
                    m[f"delta/margin_{s}_mean"] = mean_d
                    m[f"delta/margin_{s}_std"] = max(dsq[i] / n[i] - mean_d**2, 0.0) ** 0.5
                    m[f"delta/alpha_{s}_mean"] = asum[i] / n[i]
                    m[f"delta/mass_{s}"] = float(self.mass[i])
                    for tag, g in (("", self.gamma), ("_next", self.gamma_next), ("0", self.gamma0)):
                        if g is not None:
                            m[f"delta/gamma{tag}_{s}"] = float(g[i])
                m["delta/margin_max"], m["delta/margin_min"] = ext[2], -ext[3]
            if cfg.selection != "none":
                self._select(int(n_tok))
        else:  # A8: plain DAPO weights
            m.update({"delta/lambda_bar_mean": 1.0, "delta/lambda_bar_std": 0.0,
                      "delta/lambda_bar_max": 1.0, "delta/lambda_bar_min": 1.0})
        if self._threshold is not None:
            m["delta/selection_threshold"] = self._threshold
        self.metrics = m
        self.state.batches += 1
        self.state.degenerate_batches += int(self.degenerate)
        if cfg.frozen_gamma and not self._frozen and not self.degenerate:
            self.state.frozen_gamma = (float(self.gamma0[0]), float(self.gamma0[1]))
        m["delta/degenerate_batches"] = float(self.state.degenerate_batches)

    def _select(self, n_tok: int) -> None:
        """Global 50 % cut by an exact distributed k-th value search (A10: rank over the scope)."""
        k = (n_tok + 1) // 2  # bottom50: the k-th smallest = the (n − k + 1)-th largest
        rank = n_tok - k + 1 if self.cfg.selection == "bottom50" else k
        keys = [c.sel_key if self.cfg.selection == "random50" else c.lam for c in self._chunks.values()]
        self._threshold = kth_largest(keys, rank, self.group, device=self._device)


# ------------------------------------------------------------------------- TokenCredit

@CREDIT_METHODS.register("delta")
class DeltaCredit:
    """DelTA as a ``TokenCredit``: λ̄ as a per-token loss weight (or a loss mask for ``selection``),
    computed once per rollout batch and frozen for all its PPO mini-batches (§6).

    In training the actor drives the engine through ``observer()`` inside its output layer;
    ``assign`` runs the engine over one flat chunk (the single-process path). ``state`` (frozen γ,
    counters) persists across batches and checkpoints.
    """

    Config = DeltaConfig
    per_microbatch = False

    def __init__(self, cfg: DeltaConfig | None = None):
        self.cfg = cfg if cfg is not None else DeltaConfig()
        validate(self.cfg, "credit.delta")
        topk = self.cfg.proxy == "topk_hidden"
        self.needs = CreditNeeds(hidden=True, logp=not topk, topk=self.cfg.topk_k if topk else 0)
        self.target = "loss_mask" if self.cfg.selection != "none" else "loss_weight"
        self.state = DeltaState()

    def observer(self) -> DeltaHeadObserver:
        """A fresh LM-head observer for the next rollout batch (needs.hidden)."""
        return DeltaHeadObserver(self)

    def process_group(self, *, h_sequence_sharded: bool) -> Any:
        """The group to reduce over for ``cfg.scope`` (megatron parallel_state; see ``scope_group``)."""
        return scope_group(self.cfg.scope, h_sequence_sharded=h_sequence_sharded)

    def engine(self, hidden_size: int, group: Any = None,
               device: torch.device | str | None = None) -> DeltaEngine:
        """A fresh engine for the next rollout batch, sharing this object's cross-batch state."""
        rank = dist.get_rank() if group_size(group) > 1 else 0
        batch_seed = self.cfg.seed * 1_000_003 + self.state.batches
        return DeltaEngine(self.cfg, hidden_size, group, state=self.state, seed=batch_seed * 10_007 + rank,
                           device=device, hash_seed=batch_seed)

    def proxy(self, inputs: CreditInputs) -> torch.Tensor:
        """The token-gradient proxy v [tokens, d] for the configured ``proxy`` (§2)."""
        if inputs.hidden is None:
            raise ValueError("DeltaCredit: inputs.hidden (LM-head input h) is required")
        if self.cfg.proxy == "output_row":
            if inputs.logp is None:
                raise ValueError("DeltaCredit: inputs.logp is required for the output_row proxy")
            return output_row_proxy(inputs.hidden, inputs.logp)
        weight = inputs.extra.get("lm_head_weight")
        if weight is None or inputs.token_ids is None:
            raise ValueError("DeltaCredit: the topk_hidden proxy needs inputs.token_ids and "
                             "inputs.extra['lm_head_weight'] ([V, d])")
        ids, logits = inputs.extra.get("topk_ids"), inputs.extra.get("topk_logits")
        if ids is None or logits is None:
            ids, logits = topk_logits_from_hidden(inputs.hidden, weight, self.cfg.topk_k)
        return topk_hidden_proxy(weight, inputs.token_ids, ids, logits)

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput:
        """λ̄ for the local tokens of ``inputs``; ``group`` spans the scope (``process_group``)."""
        v = self.proxy(inputs)  # [tokens, d]
        engine = self.engine(v.shape[1], group, v.device)
        for p in engine.data_passes():
            engine.observe(p, 0, adv=inputs.advantages, mask=inputs.mask, v=v)
            engine.end_pass(p)
        return CreditOutput(self.target, engine.values(0), dict(engine.metrics))

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_gamma": self.state.frozen_gamma, "batches": self.state.batches,
                "degenerate_batches": self.state.degenerate_batches}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        fg = sd.get("frozen_gamma")
        self.state = DeltaState(frozen_gamma=None if fg is None else (float(fg[0]), float(fg[1])),
                                batches=int(sd["batches"]), degenerate_batches=int(sd["degenerate_batches"]))
