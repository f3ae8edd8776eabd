"""The shared toy batch of baselines.md §0 as flat tensors (importable helper, not a test module).

Two groups of four responses, N = 26 response tokens, 2 = EOS. Every per-token field is flat in
response order (y1 tokens, then y2, ...), matching ``CreditInputs``. The log-ratio ℓ is given for g1
only; g2 tokens get ℓ = 0 (on-policy) here. Advantages follow §0.1 (ε = 1e-6, unbiased std) and are
computed in float64 from the rewards, so tests never depend on the library's estimator.

Usage::

    from tests.credit.toy_batch import toy_batch, per_response
    tb = toy_batch()
    tb.credit_inputs()        # CreditInputs with advantages, token ids, logp, entropy, rewards, groups
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from delta_megatron.credit.base import CreditInputs

EOS = 2
EPS = 1e-6

# resp: (group, tokens, R, pi_old, entropy, log-ratio or None)
RESPONSES = [
    (0, [11, 12, 13, 2], 1.0, [.90, .50, .20, .99], [.30, 1.20, 2.10, .01], [0.10, 0.40, -0.05, 0.0]),
    (0, [11, 14, 2], 0.0, [.80, .10, .95], [.50, 2.40, .05], [-0.30, 2.50, 0.0]),
    (0, [11, 13, 13, 2], 1.0, [.60, .30, .70, .99], [.90, 1.70, .60, .02], [0.05, 0.0, 0.30, 0.0]),
    (0, [14, 15, 2], 0.0, [.40, .05, .90], [1.10, 2.80, .20], [-0.25, 0.10, 0.0]),
    (1, [21, 22, 2], 1.0, [.70, .25, .98], [.70, 1.90, .03], None),
    (1, [21, 23, 2], 0.0, [.50, .60, .97], [1.00, .80, .04], None),
    (1, [23, 2], 0.0, [.35, .99], [1.50, .015], None),
    (1, [21, 23, 24, 2], 0.0, [.85, .45, .15, .96], [.40, 1.30, 2.20, .06], None),
]

# §0.1 expected advantages [X] (with ε, unbiased std)
A_G1 = [0.866024, -0.866024, 0.866024, -0.866024]
A_G2 = [1.499997, -0.499999, -0.499999, -0.499999]


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = EPS,
                    unbiased: bool = True) -> torch.Tensor:
    """Reference §0.1 estimator, float64, written as a plain per-group loop (brute force)."""
    out = torch.zeros(len(rewards), dtype=torch.float64)
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero().flatten()
        r = rewards[idx].double()
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = r.mean().item()
            std = math.sqrt(((r - mean) ** 2).sum().item() / (len(idx) - (1 if unbiased else 0)))
        out[idx] = (r - mean) / (std + eps)
    return out


@dataclass
class ToyBatch:
    token_ids: torch.Tensor  # [26] long
    seq_index: torch.Tensor  # [26] long, response 0..7
    mask: torch.Tensor  # [26] bool, all True
    pi_old: torch.Tensor  # [26] float64
    logp_old: torch.Tensor  # [26] float64 = log pi_old
    entropy: torch.Tensor  # [26] float64
    log_ratio: torch.Tensor  # [26] float64 (g2 = 0)
    rewards: torch.Tensor  # [8] float64
    group_index: torch.Tensor  # [8] long
    seq_advantages: torch.Tensor  # [8] float64, §0.1
    lengths: list[int]

    @property
    def advantages(self) -> torch.Tensor:
        """[26] float64, A_i broadcast to the tokens of response i."""
        return self.seq_advantages[self.seq_index]

    def credit_inputs(self, dtype: torch.dtype = torch.float32) -> CreditInputs:
        return CreditInputs(
            advantages=self.advantages.to(dtype),
            mask=self.mask.clone(),
            seq_index=self.seq_index.clone(),
            token_ids=self.token_ids.clone(),
            logp=self.logp_old.to(dtype),
            entropy=self.entropy.to(dtype),
            rewards=self.rewards.to(dtype),
            group_index=self.group_index.clone(),
        )

    def split(self, flat: torch.Tensor) -> list[list[float]]:
        """Flat [26] values -> one list per response (for readable assertions)."""
        return [chunk.tolist() for chunk in torch.split(flat, self.lengths)]


def toy_batch(eps: float = EPS, unbiased: bool = True) -> ToyBatch:
    tokens, seq, pi, ent, lr, lengths = [], [], [], [], [], []
    for i, (_, toks, _, p, h, ell) in enumerate(RESPONSES):
        tokens += toks
        seq += [i] * len(toks)
        pi += p
        ent += h
        lr += ell if ell is not None else [0.0] * len(toks)
        lengths.append(len(toks))
    rewards = torch.tensor([r[2] for r in RESPONSES], dtype=torch.float64)
    groups = torch.tensor([r[0] for r in RESPONSES], dtype=torch.long)
    pi_t = torch.tensor(pi, dtype=torch.float64)
    return ToyBatch(
        token_ids=torch.tensor(tokens, dtype=torch.long),
        seq_index=torch.tensor(seq, dtype=torch.long),
        mask=torch.ones(len(tokens), dtype=torch.bool),
        pi_old=pi_t,
        logp_old=pi_t.log(),
        entropy=torch.tensor(ent, dtype=torch.float64),
        log_ratio=torch.tensor(lr, dtype=torch.float64),
        rewards=rewards,
        group_index=groups,
        seq_advantages=grpo_advantages(rewards, groups, eps, unbiased),
        lengths=lengths,
    )


def per_response(flat: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [chunk.tolist() for chunk in torch.split(flat, lengths)]
