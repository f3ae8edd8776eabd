"""Property: for every loss and aggregation, the gradient of a mini-batch equals the sum of the
gradients of any micro-batch split when the global normaliser is supplied (1e-6) — also when a filter
in the forward drops responses from the normaliser (FIPO ``normalizer: kept``, ``seq-mask-tis``: the
summed shares rescaled by ``kept_scale`` of the summed dropped fraction) and under the other
train/inference mismatch corrections."""

import itertools
import zlib

import pytest
import torch

from delta_megatron.algo import (
    AlgoConfig,
    LossNormalizer,
    PolicyLossInputs,
    normalizer_from_batch,
    policy_loss,
)
from delta_megatron.algo.aggregation import kept_scale
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


def loss_and_grad(cfg, seq, lengths, logp_old, logp, adv, mask, weight, parts, norm, logp_rollout=None):
    """Sum of micro-batch losses over a split of the sequences into ``parts`` (lists of seq ids),
    rescaled by kept_scale of the summed dropped fraction; also returns that fraction."""
    leaf = logp.clone().requires_grad_(True)
    total, dropped = 0.0, 0.0
    for part in parts:
        part = sorted(part)  # local seq index follows sorted ids
        sel = torch.isin(seq, torch.tensor(part))
        local = torch.unique(seq[sel], return_inverse=True)[1]
        inp = PolicyLossInputs(logp=leaf[sel], logp_old=logp_old[sel], advantages=adv[sel], mask=mask[sel],
                               seq_index=local, seq_lengths=lengths_of(mask, seq, part), num_seqs=len(part),
                               normalizer=norm, token_weight=weight[sel],
                               logp_rollout=None if logp_rollout is None else logp_rollout[sel])
        loss, metrics = policy_loss(cfg, inp)
        loss.backward()
        total += loss.item()
        dropped += float(metrics["norm_dropped"])
    scale = kept_scale(dropped)
    return total * scale, leaf.grad * scale, dropped


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


FILTERS = {  # case -> overrides
    "fipo-kept": ["loss.name=fipo"],
    "tis": ["rollout_correction=tis"],
    "icepop": ["rollout_correction=icepop"],
    "seq-mask-tis": ["rollout_correction=seq-mask-tis"],
    "fipo-kept+seq-mask-tis": ["loss.name=fipo", "rollout_correction=seq-mask-tis"],
}


def batch_with_drops(seed):
    """``random_batch`` plus: two tokens at log-ratio +3 (ratio 20 > c = 10, dual-clipped) in some
    negative-advantage responses (FIPO's filter drops them), and engine log-probs off by a per-token
    noise plus a per-response shift of ±1 on some responses (geometric-mean ratio outside [0.5, 2]:
    seq-mask-tis drops them; icepop masks many of their tokens; TIS caps some)."""
    seq, lengths, logp_old, logp, adv, mask, weight = random_batch(seed, num_seqs=9)
    g = torch.Generator().manual_seed(seed + 1)
    for s in range(9):
        idx = (seq == s).nonzero().flatten()
        if adv[idx[0]] < 0 and s % 2 == 1 and len(idx) >= 3:
            logp[idx[:2]] = logp_old[idx[:2]] + 3.0
    shift = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)[seq]
    logp_rollout = logp_old - shift - 0.3 * torch.randn(len(seq), generator=g, dtype=torch.float64)
    return seq, lengths, logp_old, logp, adv, mask, weight, logp_rollout


@pytest.mark.parametrize("case,agg", list(itertools.product(FILTERS, AGGS)))
def test_gradient_independent_of_split_with_forward_filters(case, agg):
    cfg = apply_overrides(AlgoConfig(), FILTERS[case] + [f"aggregation={agg}", "loss_const=32"])
    seq, lengths, logp_old, logp, adv, mask, weight, logp_rollout = batch_with_drops(
        zlib.crc32(f"{case}/{agg}".encode()) % 1000)
    norm = normalizer_from_batch(mask, seq, loss_const=32.0)
    ids = list(range(9))
    args = (cfg, seq, lengths, logp_old, logp, adv, mask, weight)
    whole = loss_and_grad(*args, [ids], norm, logp_rollout)
    for split in ([[0, 1, 2, 3], [4, 5, 6, 7, 8]], [[8], [2, 0], [1, 3, 5], [4, 6, 7]], [[i] for i in ids]):
        parts = loss_and_grad(*args, split, norm, logp_rollout)
        assert abs(whole[0] - parts[0]) < 1e-6
        assert torch.allclose(whole[1], parts[1], atol=1e-6, rtol=0)
        assert parts[2] == pytest.approx(whole[2], abs=1e-12)
    assert whole[1].abs().sum() > 0
    if case != "tis" and case != "icepop" and agg != "seq-mean-token-sum-norm":
        assert 0 < whole[2] < 1  # responses were dropped from the normaliser: the rescale is exercised
    if case == "fipo-kept":  # = today's 'all' semantics given the true kept count up front
        kept, seq_mode = 1.0 - whole[2], agg in ("seq-mean-token-mean", "seq-mean-token-sum")
        true = LossNormalizer(norm.num_tokens * (kept if agg == "token-mean" else 1.0),
                              norm.num_seqs * (kept if seq_mode else 1.0), loss_const=32.0)
        cfg_all = apply_overrides(cfg, ["loss.fipo.normalizer=all"])
        ref = loss_and_grad(cfg_all, *args[1:], [ids], true, logp_rollout)
        assert abs(whole[0] - ref[0]) < 1e-6 and torch.allclose(whole[1], ref[1], atol=1e-6, rtol=0)
