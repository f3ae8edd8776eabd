"""DelTA written literally after delta.md §6.1: explicit two-distance margins, whole tensors, one process.

The test oracle for :class:`~delta_megatron.credit.delta.DeltaEngine` (the distributed, multi-pass
production path); kept separate so the engine file holds only the engine. Every ablation switch of
``DeltaConfig`` is honoured here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from delta_megatron.credit.delta import DeltaConfig


def _pick_top(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Sort-based 50 % selection (brute force for ``kth_largest``); ties at the cut are kept."""
    n = values.numel()
    k = (n + 1) // 2
    if kind == "bottom":
        return values <= values.sort().values[k - 1]
    return values >= values.sort(descending=True).values[k - 1]


def delta_reference(v: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cfg: DeltaConfig,
                    *, frozen_gamma: tuple[float, float] | None = None, seed: int = 0,
                    details: dict[str, Any] | None = None) -> torch.Tensor:
    """Single-process DelTA over one scope, following §6.1 literally (two explicit squared distances).

    v [n, d] proxies, advantages [n], mask [n] bool. Returns λ̄ [n] (0 outside ``mask``), or the bool
    selection mask when ``cfg.selection`` is set. ``frozen_gamma`` replaces every γ (A3); ``details``
    (optional) receives μ, γ^(0), the final γ and the degenerate flag.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    vv, adv = v[mask].to(dtype), advantages[mask].to(dtype)  # [nv, d], [nv]
    pos, neg = adv > 0, adv < 0
    w = adv.abs()
    lam_min, lam_max = cfg.lambda_range
    gen = torch.Generator().manual_seed(seed)
    one_sided = not (bool(pos.any()) and bool(neg.any()))
    degenerate = one_sided and (cfg.empty_side == "uniform" or vv.shape[0] == 0)  # A8
    details = {} if details is None else details
    details["degenerate"] = degenerate

    def wmean(weight: torch.Tensor) -> torch.Tensor:  # Σ weight·v / max(Σ weight, ε)
        return (weight.unsqueeze(-1) * vv).sum(0) / weight.sum().clamp(min=cfg.eps)

    def own_margin(mu_pos: torch.Tensor, mu_neg: torch.Tensor) -> torch.Tensor:  # Δ^± (§4.1)
        d_pos = ((vv - mu_pos) ** 2).sum(-1)
        d_neg = ((vv - mu_neg) ** 2).sum(-1)
        if cfg.within_side_only:
            return torch.where(pos, -d_pos, -d_neg)
        return torch.where(pos, d_neg - d_pos, d_pos - d_neg)

    def side_std(delta: torch.Tensor) -> torch.Tensor:  # unweighted population std per side
        # an empty side (empty_side = zero_centroid) has variance 0, as with [C]'s count clamped >= 1
        return torch.stack([(delta[s].var(unbiased=False) if bool(s.any()) else delta.new_zeros(()))
                            .clamp(min=cfg.eps_gamma).sqrt() for s in (pos, neg)])

    def alpha(delta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        if cfg.hard_assignment:
            return (delta > 0).to(dtype)
        return torch.sigmoid(delta / torch.where(pos, gamma[0], gamma[1]))

    if cfg.random_lambda:
        u = torch.rand(vv.shape[0], generator=gen, dtype=torch.float64).to(dtype)
        lam = torch.where(pos | neg, lam_min + (lam_max - lam_min) * u, torch.full_like(u, lam_min))
    elif not degenerate:
        mu_pos, mu_neg = wmean(w * pos), wmean(w * neg)  # μ^(0) (§3.1)
        gamma = side_std(own_margin(mu_pos, mu_neg))  # γ^(0) (§4.2)
        details["gamma0"] = gamma.clone()
        if frozen_gamma is not None:
            gamma = torch.tensor(frozen_gamma, dtype=dtype)
        for _ in range(cfg.K):  # refinement with lagged γ (§4.3)
            delta = own_margin(mu_pos, mu_neg)
            a = alpha(delta, gamma)
            gamma_next = side_std(delta)
            mu_pos, mu_neg = wmean(w * a * pos), wmean(w * a * neg)
            if not cfg.frozen_gamma:
                gamma = gamma_next
        a = alpha(own_margin(mu_pos, mu_neg), gamma)  # final α* (§4.3)
        details.update(mu_pos=mu_pos, mu_neg=mu_neg, gamma=gamma)
        if cfg.range_map:  # §5; Z0 tokens λ_min
            lam = torch.where(pos | neg, lam_min + (lam_max - lam_min) * a, torch.full_like(a, lam_min))
        else:  # A14: raw α, Z0 tokens 0
            lam = torch.where(pos | neg, a, torch.zeros_like(a))
    if degenerate:  # A8: plain DAPO
        lam_bar = torch.ones(vv.shape[0], dtype=dtype)
    elif cfg.lambda_norm:  # λ̄ = λ·N_tok/Z (§5)
        lam_bar = lam * vv.shape[0] / lam.sum().clamp(min=cfg.eps)
    else:
        lam_bar = lam
    if cfg.selection != "none":
        if degenerate or vv.shape[0] == 0:
            sel = torch.ones(vv.shape[0], dtype=torch.bool)
        elif cfg.selection == "random50":
            sel = _pick_top(torch.rand(vv.shape[0], generator=gen, dtype=torch.float64), "top")
        else:
            sel = _pick_top(lam, "top" if cfg.selection == "top50" else "bottom")
        out = torch.zeros(mask.shape[0], dtype=torch.bool)
        out[mask] = sel
        return out
    out = torch.zeros(mask.shape[0], dtype=dtype)
    out[mask] = lam_bar
    return out
