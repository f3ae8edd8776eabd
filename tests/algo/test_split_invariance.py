"""Property: for every loss and aggregation, the gradient of a mini-batch equals the sum of the
gradients of any micro-batch split when the global normaliser is supplied (1e-6)."""

import itertools
import zlib

import pytest
import torch

from delta_megatron.algo import AlgoConfig, PolicyLossInputs, normalizer_from_batch, policy_loss
from delta_megatron.utils.configs import apply_overrides

LOSSES = ["ppo", "gspo", "sapo", "fipo"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def random_batch(seed, num_seqs=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (num_seqs,), generator=g)
    seq = torch.repeat_interleave(torch.arange(num_seqs), lengths)
    n = seq.numel()
    logp_old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    # Per-sequence noise: even sequences stay near on-policy (inside GSPO's 3e-4 sequence clip band),
    # odd ones are far off-policy, so both the clipped and the unclipped branches are exercised.
    scale = torch.where(torch.arange(num_seqs) % 2 == 0, 1e-5, 0.4).to(torch.float64)[seq]
    logp = logp_old + torch.randn(n, generator=g, dtype=torch.float64) * scale
    adv = torch.randn(num_seqs, generator=g, dtype=torch.float64)[seq]
    mask = torch.rand(n, generator=g) > 0.15  # some masked tokens inside responses
    weight = 0.8 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    return seq, lengths, logp_old, logp, adv, mask, weight


def loss_and_grad(cfg, seq, lengths, logp_old, logp, adv, mask, weight, parts, norm):
    """Sum of micro-batch losses over a split of the sequences into ``parts`` (lists of seq ids)."""
    leaf = logp.clone().requires_grad_(True)
    total = 0.0
    for part in parts:
        part = sorted(part)  # local seq index follows sorted ids
        sel = torch.isin(seq, torch.tensor(part))
        local = torch.unique(seq[sel], return_inverse=True)[1]
        inp = PolicyLossInputs(logp=leaf[sel], logp_old=logp_old[sel], advantages=adv[sel], mask=mask[sel],
                               seq_index=local, seq_lengths=lengths_of(mask, seq, part), num_seqs=len(part),
                               normalizer=norm, token_weight=weight[sel])
        loss, _ = policy_loss(cfg, inp)
        loss.backward()
        total += loss.item()
    return total, leaf.grad


def lengths_of(mask, seq, part):
    return torch.stack([mask[seq == s].sum() for s in part])


@pytest.mark.parametrize("loss_name,agg", list(itertools.product(LOSSES, AGGS)))
def test_gradient_independent_of_split(loss_name, agg):
    cfg = apply_overrides(AlgoConfig(), [f"loss.name={loss_name}", f"aggregation={agg}", "loss_const=32"])
    seq, lengths, logp_old, logp, adv, mask, weight = random_batch(zlib.crc32(f"{loss_name}/{agg}".encode()) % 1000)
    norm = normalizer_from_batch(mask, seq, loss_const=32.0)
    ids = list(range(7))
    whole = loss_and_grad(cfg, seq, lengths, logp_old, logp, adv, mask, weight, [ids], norm)
    for split in ([[0, 1, 2], [3, 4, 5, 6]], [[6], [2, 0], [1, 3, 5], [4]], [[i] for i in ids]):
        parts = loss_and_grad(cfg, seq, lengths, logp_old, logp, adv, mask, weight, split, norm)
        assert abs(whole[0] - parts[0]) < 1e-6
        assert torch.allclose(whole[1], parts[1], atol=1e-6, rtol=0)
    assert whole[1].abs().sum() > 0  # the property is not vacuous
