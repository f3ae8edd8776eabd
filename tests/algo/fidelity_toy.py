"""The worked examples of docs/methods/fidelity.md as data (importable helper, not a test module):
inputs on group g1 of the shared toy batch (y1..y4, 14 tokens) and the hand-computed [X] numbers.

Used by the single-process tests (``tests/algo/test_fidelity.py``, ``test_split_invariance.py``) and
by the torchrun CP/DP worker (``tests/dist/cp_worker.py``), which run the same inputs under other
layouts and compare with the same numbers. Every layout numbers g1's responses 0..3 on every rank.
"""

from __future__ import annotations

import torch

from delta_megatron.algo import AlgoConfig, LossNormalizer, PolicyLossInputs, policy_loss
from delta_megatron.utils.configs import apply_overrides
from tests.credit.toy_batch import toy_batch

TOL = 1e-5
LENGTHS = [4, 3, 4, 3]  # y1..y4
SEQ = torch.repeat_interleave(torch.arange(4), torch.tensor(LENGTHS))  # [14]

# §1 FIPO with a dropped response: §0's g1 log-ratios, but y2 = [2.4, 2.5, 0] — two tokens above
# ln c = ln 10, both dual-clipped (A < 0), so the sequence filter drops y2 (3 of 14 tokens).
LOG_RATIO_DROP = torch.tensor([0.10, 0.40, -0.05, 0.0, 2.4, 2.5, 0.0, 0.05, 0.0, 0.30, 0.0, -0.25, 0.10, 0.0],
                              dtype=torch.float64)
FIPO_DROP = ["loss.name=fipo", "loss.fipo.decay_rate=1", "loss.fipo.f_range=[1.0,1.2]",
             "loss.fipo.safety_thresh=10"]
FIPO_DROP_LOSS = {"kept": -0.526000, "all": -0.413286}  # Σ_kept L = −5.786003 over 11 / 14 tokens
FIPO_DROP_TOKEN_LOSS = [-1.148525, -1.330213, -0.823787, -0.866024, 8.660239, 8.660239, 0.866024,
                        -1.031648, -1.006176, -1.330213, -0.866024, 0.692819, 1.057764, 0.866024]
# ∂(Σ_kept L)/∂log π per token (0: clipped, dual-clipped or dropped); the loss divides by 11 or 14
FIPO_DROP_GRAD_SUM = [-1.148525, 0, -0.823787, -0.866024, 0, 0, 0,
                      -1.031648, -1.006176, 0, -0.866024, 0, 1.057764, 0.866024]
FIPO_DROP_KEPT_TOKENS = 11

# §5 rollout correction: §0's g1 log-ratios (the DAPO table, loss 0.373473) and log ρ = log π_old −
# log π_rollout per token. y3's geometric-mean ratio is exp(0.7125) = 2.039 > 2: seq-mask-tis drops it.
LOG_RATIO = torch.tensor([0.10, 0.40, -0.05, 0.0, -0.30, 2.50, 0.0, 0.05, 0.0, 0.30, 0.0, -0.25, 0.10, 0.0],
                         dtype=torch.float64)
LOG_RHO = torch.tensor([0.05, -0.80, 0.90, 0.0, 0.10, 0.0, -0.02, 0.75, 0.90, 0.80, 0.40, -0.10, 0.30, 0.0],
                       dtype=torch.float64)
DAPO_GRAD = [-0.957104, 0, -0.823787, -0.866024, 0, 0, 0.866024,
             -0.910426, -0.866024, 0, -0.866024, 0, 0.957104, 0.866024]  # baselines.md §3
CORRECTION_LOSS = {"none": 0.373473, "tis": 0.141423, "icepop": 0.717563, "seq-mask-tis": 0.904181}
TIS_WEIGHT = [1.051271, 0.449329, 2.0, 1.0, 1.105171, 1.0, 0.980199, 2.0, 2.0, 2.0, 1.491825,
              0.904837, 1.349859, 1.0]
ICEPOP_KEEP = [1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]  # ρ in [0.5, 2]
SEQ_KEEP = [1] * 7 + [0] * 4 + [1] * 3  # y3 dropped
MISMATCH = {"mismatch/k3_kl": 0.165303, "mismatch/ratio_p1": 0.449329, "mismatch/ratio_p50": 1.051271,
            "mismatch/ratio_p99": 2.459603}
MASKED_FRAC = {"none": 0.0, "tis": 0.0, "icepop": 5 / 14, "seq-mask-tis": 4 / 14}
CAPPED_FRAC = {"tis": 4 / 14, "seq-mask-tis": 1 / 14}


def correction_grad(mode: str) -> torch.Tensor:
    """Hand ∂loss/∂log π per token of the §5 example: the DAPO gradient times the correction weight,
    over the normaliser (14 tokens; 10 once seq-mask-tis dropped y3)."""
    grad = torch.tensor(DAPO_GRAD, dtype=torch.float64)
    if mode == "none":
        return grad / 14
    if mode == "tis":
        return grad * torch.tensor(TIS_WEIGHT, dtype=torch.float64) / 14
    if mode == "icepop":
        return grad * torch.tensor(ICEPOP_KEEP, dtype=torch.float64) / 14
    keep = torch.tensor(SEQ_KEEP, dtype=torch.float64)
    return grad * torch.tensor(TIS_WEIGHT, dtype=torch.float64) * keep / keep.sum()


def fipo_drop_config(normalizer: str) -> AlgoConfig:
    return apply_overrides(AlgoConfig(), FIPO_DROP + [f"loss.fipo.normalizer={normalizer}"])


def correction_config(mode: str) -> AlgoConfig:
    return apply_overrides(AlgoConfig(), [f"rollout_correction={mode}"])


def g1_share(cfg: AlgoConfig, tokens: torch.Tensor, log_ratio: torch.Tensor, log_rho: torch.Tensor | None = None,
             cp_group=None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One part's share of the g1 mini-batch loss (tokens: sorted g1 token ids 0..13 this part holds):
    (loss share, ∂share/∂log π over all 14 tokens, metric shares). Global normaliser 14 tokens / 4
    responses; responses numbered 0..3 everywhere. ``cp_group``: the parts hold CP chunks."""
    tb = toy_batch()
    logp_old = tb.logp_old[:14]
    leaf = (logp_old + log_ratio).clone().requires_grad_(True)
    inp = PolicyLossInputs(
        logp=leaf[tokens], logp_old=logp_old[tokens], advantages=tb.advantages[:14][tokens],
        mask=torch.ones(len(tokens), dtype=torch.bool), seq_index=SEQ[tokens],
        seq_lengths=torch.tensor(LENGTHS), num_seqs=4, normalizer=LossNormalizer(14.0, 4.0),
        cp_group=cp_group, token_index=tokens,
        logp_rollout=None if log_rho is None else (logp_old - log_rho)[tokens])
    loss, metrics = policy_loss(cfg, inp)
    if loss.requires_grad:  # a CP rank may hold no token
        loss.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros(14, dtype=torch.float64)
    return loss.detach().double(), grad, {k: float(v) for k, v in metrics.items()}


def cp_chunks(world: int, rank: int) -> torch.Tensor:
    """The g1 tokens CP rank ``rank`` of ``world`` holds: chunks r and 2·world−1−r of each response
    (load-balanced CP; short responses leave some chunks empty)."""
    out = []
    for s, n in enumerate(LENGTHS):
        first = sum(LENGTHS[:s])
        parts = torch.tensor_split(torch.arange(first, first + n), 2 * world)
        out += parts[rank].tolist() + parts[2 * world - 1 - rank].tolist()
    return torch.tensor(sorted(out), dtype=torch.long)


def dp_shard(world: int, rank: int) -> torch.Tensor:
    """The g1 tokens DP rank ``rank`` holds: whole responses, round robin."""
    return torch.cat([torch.nonzero(SEQ == s).flatten() for s in range(4) if s % world == rank])
