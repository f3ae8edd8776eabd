"""KTAE: key-token advantage estimation (baselines.md §8).

A model-free, per-group score for each token id: how strongly the id's *presence* in a rollout is
associated with the rollout being correct. It combines a two-sided Fisher exact test, the information
gain of presence about correctness, a direction term (Cohen's h without its factor 2) and a BM25-style
frequency ratio, and is **added** to the GRPO advantage: A_{i,t} = A_i + kv_g(y_{i,t}) (§8 step 8).
Being additive it can flip a token's sign, so it is applied first (§12).

Everything is vectorised over (group, token id) pairs with ``torch.unique`` / ``bincount``; nothing
loops over ids or groups. The Fisher test has two modes (§8 "Numerical caveats"):

- ``canonical``: float64, ties within a relative tolerance of 1e-7 count as "as extreme" (scipy/R
  convention) and F = 0 when p >= 1 - 1e-6;
- ``reference``: float32 lgamma/exp, strict ``<=`` and the exact ``p != 1.0`` test of the released
  code, which turns e.g. [4,4,4,4] into F = 0.135335 instead of 0 and drops symmetric-tail ties.

The rest (IG, h, TF, score) is float64 in both modes. KTAE needs every token of a group, so it runs
where whole groups are present (driver / before sharding, §12): ``assign`` ignores ``group``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from delta_megatron.credit.base import CREDIT_METHODS, CreditInputs, CreditNeeds, CreditOutput, CreditTarget
from delta_megatron.utils.configs import Section, fail, option, validate

QWEN_ENDOFTEXT = 151643


@dataclass
class KTAEConfig(Section):
    """§8 hyperparameters. The released advantage function hard-codes α=β=1, TF on, top=1 (the
    defaults here); the run scripts' β_ig = 2.0 is available as ``beta``."""

    alpha: float = option(1.0, "Fisher-test weight α", ge=0)
    beta: float = option(1.0, "information-gain weight β (scripts pass 2.0; released code 1.0)", ge=0)
    use_tf: bool = option(True, "BM25-style frequency term γ_tf")
    top: float = option(1.0, "key-token values kv lie in (-top, top)", gt=0)
    fisher_mode: Literal["canonical", "reference"] = option("canonical", "Fisher exact test: canonical "
                                                                         "or the reference's variant")
    tie_rtol: float = option(1e-7, "canonical: P(k) <= P(a)(1 + tie_rtol) counts as as-extreme", ge=0,
                             le=1e-3)
    p_one_tol: float = option(1e-6, "canonical: F = 0 when p >= 1 - p_one_tol", ge=0, lt=1)
    bm25_k1: float = option(2.0, "BM25 k1 of the frequency term", gt=0)
    bm25_b: float = option(0.5, "BM25 b of the frequency term", ge=0, le=1)
    correct_threshold: float = option(0.0, "a response is correct when its score > threshold", unbounded=True)
    ignore_ids: list[int] = option(doc="token ids whose kv is forced to 0", ge=0,
                                   default_factory=lambda: [QWEN_ENDOFTEXT])

    def validate(self) -> None:
        if self.alpha + self.beta <= 0:
            fail("beta", self.beta, "alpha + beta must be > 0")


# ----------------------------------------------------------------------------------------------
# Fisher exact test (§8 step 3)


def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _log_hypergeom(k: torch.Tensor, r1: torch.Tensor, c1: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """log P(k) = log C(C1,k) + log C(n−C1, R1−k) − log C(n,R1), in this summation order."""
    return _log_comb(c1, k) + _log_comb(n - c1, r1 - k) - _log_comb(n, r1)


def fisher_exact_pvalue(table: torch.Tensor, mode: str = "canonical", tie_rtol: float = 1e-7) -> torch.Tensor:
    """Two-sided Fisher exact p-value for each row [a, b, c, d] of ``table`` ([P, 4]).

    p = Σ_{k : P(k) <= P(a)} P(k) over the support k ∈ [max(0, R1+C1−n), min(R1, C1)] with R1 = a+b,
    C1 = a+c. Canonical: float64 and a relative tie tolerance; reference: float32 and strict <=.
    Returns [P] in float64 (canonical, clamped to <= 1) or float32 (reference, unclamped).
    """
    dtype = torch.float64 if mode == "canonical" else torch.float32
    t = table.to(dtype)
    a, b, c, d = t.unbind(dim=1)  # each [P]
    r1, c1, n = a + b, a + c, a + b + c + d
    k_lo = torch.clamp(r1 + c1 - n, min=0)
    k_hi = torch.minimum(r1, c1)
    if t.shape[0] == 0:
        return torch.zeros(0, dtype=dtype)
    k = torch.arange(int(k_hi.max().item()) + 1, dtype=dtype).expand(t.shape[0], -1)  # [P, K]
    support = (k >= k_lo[:, None]) & (k <= k_hi[:, None])
    k_safe = torch.where(support, k, a[:, None])  # keep lgamma arguments finite off the support
    p_k = torch.exp(_log_hypergeom(k_safe, r1[:, None], c1[:, None], n[:, None]))  # [P, K]
    p_obs = torch.exp(_log_hypergeom(a, r1, c1, n))  # [P]
    if mode == "canonical":
        extreme = p_k <= p_obs[:, None] * (1.0 + tie_rtol)
    else:
        extreme = p_k <= p_obs[:, None]
    p = torch.where(support & extreme, p_k, torch.zeros((), dtype=dtype)).sum(dim=1)
    return p.clamp(max=1.0) if mode == "canonical" else p


def fisher_score(p: torch.Tensor, mode: str = "canonical", p_one_tol: float = 1e-6) -> torch.Tensor:
    """F = exp(−2p) unless p is (numerically) 1, then 0 (§8 step 3)."""
    if mode == "canonical":
        return torch.where(p < 1.0 - p_one_tol, torch.exp(-2.0 * p), torch.zeros_like(p))
    return torch.where(p != 1.0, torch.exp(-2.0 * p), torch.zeros_like(p))


# ----------------------------------------------------------------------------------------------
# Per-(group, id) statistics (§8 steps 1–7)


def _entropy2(p: torch.Tensor) -> torch.Tensor:
    """−p log2 p with 0·log 0 = 0."""
    return torch.where(p > 0, -p * torch.log2(p.clamp(min=1e-300)), torch.zeros_like(p))


def information_gain(table: torch.Tensor) -> torch.Tensor:
    """IG = H(Y) − H(Y|X) in bits for rows [a, b, c, d] (Y = correct, X = presence). [P] float64."""
    a, b, c, d = table.double().unbind(dim=1)
    n = (a + b + c + d).clamp(min=1e-300)
    h_y = _entropy2((a + c) / n) + _entropy2((b + d) / n)

    def cond(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        tot = x1 + x2
        safe = tot.clamp(min=1e-300)
        return torch.where(tot > 0, _entropy2(x1 / safe) + _entropy2(x2 / safe), torch.zeros_like(tot))

    return h_y - ((a + b) / n * cond(a, b) + (c + d) / n * cond(c, d))


def direction_term(table: torch.Tensor) -> torch.Tensor:
    """h = asin√(a/(a+c)) − asin√(b/(b+d)), Cohen's h without its factor 2.

    The spec's "+1e-10 in each denominator" only guards 0/0: in the reference's float32 it vanishes
    for any non-empty side, whereas adding it in float64 would shift h by ~1e-5 near a proportion of 1
    (asin√ is singular there). So an empty side gives proportion 0 and nothing else changes."""
    a, b, c, d = table.double().unbind(dim=1)
    pc = torch.where(a + c > 0, a / (a + c).clamp(min=1e-10), torch.zeros_like(a)).clamp(0.0, 1.0)
    pw = torch.where(b + d > 0, b / (b + d).clamp(min=1e-10), torch.zeros_like(b)).clamp(0.0, 1.0)
    return torch.asin(pc.sqrt()) - torch.asin(pw.sqrt())


@dataclass
class KeyTokenTable:
    """The §8 statistics for every (group, token id) pair that occurs among valid tokens. All [P]."""

    group: torch.Tensor  # long
    token_id: torch.Tensor  # long
    counts: torch.Tensor  # [P, 4] float64: a, b, c, d
    p_value: torch.Tensor
    fisher: torch.Tensor  # F
    info_gain: torch.Tensor  # IG
    direction: torch.Tensor  # h
    x: torch.Tensor  # h (+ TF ratio term)
    score: torch.Tensor  # s
    key_value: torch.Tensor  # kv
    bm25_k: torch.Tensor  # [P, 2] K_C, K_W of the pair's group
    token_totals: torch.Tensor  # [P, 2] T_C, T_W of the pair's group

    def for_group(self, g: int) -> dict[int, dict[str, Any]]:
        """{token id: {"abcd", "p", "F", "IG", "h", "x", "s", "kv", "K", "T"}} for group ``g``."""
        out: dict[int, dict[str, Any]] = {}
        for j in (self.group == g).nonzero().flatten().tolist():
            out[int(self.token_id[j])] = {
                "abcd": [int(v) for v in self.counts[j].tolist()],
                "p": float(self.p_value[j]), "F": float(self.fisher[j]), "IG": float(self.info_gain[j]),
                "h": float(self.direction[j]), "x": float(self.x[j]), "s": float(self.score[j]),
                "kv": float(self.key_value[j]), "K": self.bm25_k[j].tolist(),
                "T": self.token_totals[j].tolist(),
            }
        return out


def key_token_table(token_ids: torch.Tensor, seq_index: torch.Tensor, mask: torch.Tensor,
                    scores: torch.Tensor, group_index: torch.Tensor, cfg: KTAEConfig
                    ) -> tuple[KeyTokenTable, torch.Tensor]:
    """Compute the key-value table of every group at once.

    token_ids, seq_index, mask: [tokens]; scores, group_index: [num_seqs] (every response of every
    group must be present). Returns the table and, for each token, the index of its (group, id) pair
    ([tokens] long, −1 for invalid tokens).
    """
    dev = token_ids.device
    valid = mask.bool()
    tok = token_ids[valid].long()  # [Nv]
    seq = seq_index[valid].long()  # [Nv]
    correct_seq = scores.double() > cfg.correct_threshold  # [S]
    group_ids, seq_group = torch.unique(group_index.long(), return_inverse=True)  # compact group ids
    grp = seq_group[seq]  # [Nv]
    side_c = correct_seq[seq]  # [Nv] bool
    vocab = int(tok.max().item()) + 1 if tok.numel() else 1

    # (group, id) pairs and occurrence counts (§8 step 6 uses occurrences)
    pair_keys, pair_idx = torch.unique(grp * vocab + tok, return_inverse=True)  # [P], [Nv]
    num_pairs = pair_keys.numel()
    occ_c = torch.bincount(pair_idx, weights=side_c.double(), minlength=num_pairs)
    occ_w = torch.bincount(pair_idx, weights=(~side_c).double(), minlength=num_pairs)

    # presence: once per (response, id) (§8 step 2)
    st_keys, st_inv = torch.unique(seq * vocab + tok, return_inverse=True)
    st_pair = torch.zeros(st_keys.numel(), dtype=torch.long, device=dev).scatter_(0, st_inv, pair_idx)
    st_side = torch.zeros(st_keys.numel(), dtype=torch.bool, device=dev).scatter_(0, st_inv, side_c)
    a = torch.bincount(st_pair, weights=st_side.double(), minlength=num_pairs)
    b = torch.bincount(st_pair, weights=(~st_side).double(), minlength=num_pairs)

    pair_group = torch.div(pair_keys, vocab, rounding_mode="floor")  # [P]
    pair_id = pair_keys - pair_group * vocab
    num_groups = max(group_ids.numel(), 1)
    n_c = torch.bincount(seq_group, weights=correct_seq.double(), minlength=num_groups)  # |C_g|
    n_w = torch.bincount(seq_group, weights=(~correct_seq).double(), minlength=num_groups)
    table = torch.stack([a, b, n_c[pair_group] - a, n_w[pair_group] - b], dim=1)  # [P, 4]

    mode = cfg.fisher_mode
    p = fisher_exact_pvalue(table, mode, cfg.tie_rtol)
    f_score = fisher_score(p, mode, cfg.p_one_tol).double()
    ig = information_gain(table)
    h = direction_term(table)

    # BM25-style TF term over total masked token counts per side of the group (§8 step 6)
    t_c = torch.bincount(grp, weights=side_c.double(), minlength=num_groups)  # [groups]
    t_w = torch.bincount(grp, weights=(~side_c).double(), minlength=num_groups)
    avg = ((t_c + t_w) / 2).clamp(min=1e-300)
    k1, bb = cfg.bm25_k1, cfg.bm25_b
    k_c, k_w = k1 * (1 - bb + bb * t_c / avg), k1 * (1 - bb + bb * t_w / avg)  # [groups]
    pg = pair_group
    f_c = occ_c / t_c[pg].clamp(min=1.0)
    f_w = occ_w / t_w[pg].clamp(min=1.0)
    tf_c = f_c * (k1 + 1) / (f_c + k_c[pg])
    tf_w = f_w * (k1 + 1) / (f_w + k_w[pg])
    x = h + tf_c / (tf_w + 1e-5) - tf_w / (tf_c + 1e-5) if cfg.use_tf else h.clone()

    s = (cfg.alpha * f_score + cfg.beta * ig) * x / (cfg.alpha + cfg.beta)
    # a group with an empty side carries no signal (§8 step 1); ignored ids get kv = 0 (step 7)
    live = (n_c[pg] > 0) & (n_w[pg] > 0)
    s = torch.where(live, s, torch.zeros_like(s))
    kv = cfg.top * torch.tanh(s / 2)  # == (σ(s) − 0.5)·2·top
    if cfg.ignore_ids:
        ignored = torch.isin(pair_id, torch.tensor(cfg.ignore_ids, dtype=torch.long, device=dev))
        kv = torch.where(ignored, torch.zeros_like(kv), kv)

    token_pair = torch.full_like(token_ids, -1, dtype=torch.long)
    token_pair[valid] = pair_idx
    result = KeyTokenTable(
        group=group_ids[pair_group], token_id=pair_id, counts=table, p_value=p.double(), fisher=f_score,
        info_gain=ig, direction=h, x=x, score=s, key_value=kv,
        bm25_k=torch.stack([k_c[pg], k_w[pg]], dim=1), token_totals=torch.stack([t_c[pg], t_w[pg]], dim=1),
    )
    return result, token_pair


@CREDIT_METHODS.register("ktae")
class KTAECredit:
    """TokenCredit for §8: per-token additive advantage kv_g(y_t) (target ``advantage_add``)."""

    target: CreditTarget = "advantage_add"
    per_microbatch = False

    def __init__(self, cfg: KTAEConfig | None = None):
        self.cfg = cfg or KTAEConfig()
        validate(self.cfg, "credit.ktae")
        self.needs = CreditNeeds()  # token ids, mask, rewards and groups only

    def table(self, inputs: CreditInputs) -> tuple[KeyTokenTable, torch.Tensor]:
        if inputs.token_ids is None or inputs.rewards is None or inputs.group_index is None:
            raise ValueError("KTAE needs token_ids, rewards (per-response score) and group_index")
        return key_token_table(inputs.token_ids, inputs.seq_index, inputs.mask, inputs.rewards,
                               inputs.group_index, self.cfg)

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput:
        """``group`` is unused: inputs must hold whole prompt groups (§12, driver-side)."""
        tab, token_pair = self.table(inputs)
        valid = token_pair >= 0
        kv = torch.zeros(token_pair.shape, dtype=torch.float32, device=token_pair.device)
        kv[valid] = tab.key_value[token_pair[valid]].float()
        adv = inputs.advantages.float()
        flips = valid & (adv != 0) & (torch.sign(adv + kv) != torch.sign(adv))
        n_valid = max(int(valid.sum()), 1)
        metrics = {
            "ktae/mean_abs_kv": float(kv[valid].abs().sum()) / n_valid,
            "ktae/sign_flip_frac": float(flips.sum()) / n_valid,
            "ktae/saturated_frac": float((kv[valid].abs() > 0.99 * self.cfg.top).sum()) / n_valid,
        }
        return CreditOutput(target=self.target, values=kv, metrics=metrics)
