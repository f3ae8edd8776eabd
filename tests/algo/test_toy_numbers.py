"""Every toy number of baselines.md §0–§6 (advantages, KL, GRPO/Dr.GRPO/DAPO/GSPO/SAPO/FIPO, overlong)."""

import math

import pytest
import torch

from delta_megatron.algo import AlgoConfig, LossNormalizer, PolicyLossInputs, compute_advantages, policy_loss
from delta_megatron.algo.advantages import grpo_advantages
from delta_megatron.algo.dynamic_sampling import keep_groups
from delta_megatron.algo.fipo import future_kl
from delta_megatron.algo.kl import kl_penalty
from delta_megatron.algo.overlong import overlong_penalty
from delta_megatron.algo.ppo_clip import ppo_clip_loss
from delta_megatron.algo.sapo import sapo_gate
from delta_megatron.utils.configs import apply_overrides
from tests.credit.toy_batch import toy_batch

TOL = 1e-5
G1 = slice(0, 14)  # the 14 tokens of y1..y4


def close(actual, expected, tol=TOL):
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten()
    expected = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual.tolist(), expected.tolist())


@pytest.fixture
def tb():
    return toy_batch()


# ---------------------------------------------------------------- §0.1 / §2 advantages
def test_grpo_advantages(tb):
    adv = grpo_advantages(tb.rewards, tb.group_index)
    close(adv, [0.866024, -0.866024, 0.866024, -0.866024, 1.499997, -0.499999, -0.499999, -0.499999])
    no_eps = grpo_advantages(tb.rewards, tb.group_index, eps=0.0)
    close(no_eps, [0.866025, -0.866025, 0.866025, -0.866025, 1.5, -0.5, -0.5, -0.5])
    pop = grpo_advantages(tb.rewards, tb.group_index, std="population")
    close(pop, [0.999998, -0.999998, 0.999998, -0.999998, 1.732047, -0.577349, -0.577349, -0.577349])


def test_group_of_one_gets_mean0_std1():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]))
    close(adv, [1 / (1 + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)])


def test_drgrpo_and_rloo(tb):
    cfg = apply_overrides(AlgoConfig(), ["advantage.estimator=drgrpo"])
    close(compute_advantages(cfg, tb.rewards, tb.group_index),
          [0.5, -0.5, 0.5, -0.5, 0.75, -0.25, -0.25, -0.25])
    cfg = apply_overrides(AlgoConfig(), ["advantage.estimator=rloo"])
    # RLOO: R_i − mean of the others = G/(G−1)(R_i − mean)
    close(compute_advantages(cfg, tb.rewards, tb.group_index),
          [2 / 3, -2 / 3, 2 / 3, -2 / 3, 1.0, -1 / 3, -1 / 3, -1 / 3])


# ---------------------------------------------------------------- §0.4 KL
def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.2])
    close(kl_penalty(logp, ref, "k1"), [0.2])
    close(kl_penalty(logp, ref, "k2"), [0.02])
    close(kl_penalty(logp, ref, "k3"), [0.018731])
    close(kl_penalty(logp, ref, "abs"), [0.2])
    lp = torch.tensor([-1.0], requires_grad=True)
    kl_penalty(lp, ref, "k3+").sum().backward()
    close(lp.grad, [0.2])  # straight-through: gradient of k2 = d
    assert abs(kl_penalty(lp, ref, "k3+").item() - 0.018731) < TOL


# ---------------------------------------------------------------- helpers
def loss_inputs(tb, cfg, logp, tokens=slice(None), advantages=None):
    mask = tb.mask[tokens]
    seq = tb.seq_index[tokens] - tb.seq_index[tokens].min()
    lengths = torch.bincount(seq)
    norm = LossNormalizer(float(mask.sum()), float(len(lengths)),
                          loss_const=float(cfg.loss_const or 1.0), const_times_seqs=cfg.const_times_seqs)
    adv = (tb.advantages if advantages is None else advantages)[tokens].float()
    return PolicyLossInputs(logp=logp, logp_old=tb.logp_old[tokens].float(), advantages=adv, mask=mask,
                            seq_index=seq, seq_lengths=lengths, num_seqs=len(lengths), normalizer=norm)


def g1_logp(tb):
    return (tb.logp_old[G1] + tb.log_ratio[G1]).float().requires_grad_(True)


# ---------------------------------------------------------------- §1 GRPO, §2 Dr.GRPO at r = 1
def test_grpo_aggregations_on_policy(tb):
    for agg, expected in [("seq-mean-token-mean", 0.0), ("token-mean", -0.066617)]:
        cfg = apply_overrides(AlgoConfig(), [f"aggregation={agg}", "loss.dual_clip_c=null"])
        loss, _ = policy_loss(cfg, loss_inputs(tb, cfg, tb.logp_old.float()))
        close(loss, [expected])


def test_drgrpo_constant_normaliser(tb):
    cfg = apply_overrides(AlgoConfig(), ["advantage.estimator=drgrpo", "aggregation=seq-mean-token-sum-norm",
                                         "loss_const=4"])
    adv = compute_advantages(cfg, tb.rewards, tb.group_index)[tb.seq_index]
    loss, _ = policy_loss(cfg, loss_inputs(tb, cfg, tb.logp_old.float(), advantages=adv))
    close(loss, [-0.031250])


# ---------------------------------------------------------------- §3 DAPO table
DAPO_L = [-0.957104, -1.108511, -0.823787, -0.866024, 0.692819, 8.660239, 0.866024,
          -0.910426, -0.866024, -1.108511, -0.866024, 0.692819, 0.957104, 0.866024]
DAPO_GRAD = [-0.957104, 0, -0.823787, -0.866024, 0, 0, 0.866024,
             -0.910426, -0.866024, 0, -0.866024, 0, 0.957104, 0.866024]


def test_dapo_per_token_and_mean(tb):
    logp = g1_logp(tb)
    out = ppo_clip_loss(logp, tb.logp_old[G1].float(), tb.advantages[G1].float(), 0.2, 0.28, 10.0)
    close(out.ratio, [1.105171, 1.491825, 0.951229, 1, 0.740818, 12.182494, 1,
                      1.051271, 1, 1.349859, 1, 0.778801, 1.105171, 1])
    close(out.loss, DAPO_L)
    out.loss.sum().backward()
    close(logp.grad, DAPO_GRAD)  # ∂L/∂logπ, zero where clipped or dual-clipped
    cfg = AlgoConfig()
    loss, metrics = policy_loss(cfg, loss_inputs(tb, cfg, g1_logp(tb), G1))
    close(loss, [0.373473])
    close(metrics["dual_clip_frac"], [1 / 14])
    close(metrics["clip_frac"], [4 / 14])


# ---------------------------------------------------------------- §4 GSPO
def test_gspo(tb):
    cfg = apply_overrides(AlgoConfig(), ["loss.name=gspo"])
    assert cfg.resolved_aggregation == "seq-mean-token-mean"
    logp = g1_logp(tb)
    loss, _ = policy_loss(cfg, loss_inputs(tb, cfg, logp, G1))
    close(loss, [0.234023])
    loss.backward()
    grad = logp.grad.view(-1)
    assert torch.all(grad[:4] == 0) and torch.all(grad[7:] == 0)  # only y2 carries a gradient
    # y2 (A<0, s=2.082009 unclipped): ∂/∂logπ_t of −A·s/|y|/4 = 0.866024·2.082009/3/4
    close(grad[4:7], [0.866024 * 2.082009 / 12] * 3)


# ---------------------------------------------------------------- §5 SAPO
def test_sapo(tb):
    ratio = torch.exp(tb.log_ratio[G1])
    gate = sapo_gate(ratio, tb.advantages[G1], 1.0, 1.05)
    close(gate, [2.105074, 2.482145, 1.951239, 2, 1.647168, 3.809494, 1.904762,
                 2.051260, 2, 2.346333, 2, 1.684552, 2.009826, 1.904762])
    cfg = apply_overrides(AlgoConfig(), ["loss.name=sapo"])
    logp = g1_logp(tb)
    loss, _ = policy_loss(cfg, loss_inputs(tb, cfg, logp, G1))
    close(loss, [0.018657])
    # per-token ∂L/∂logπ: undo the seq-mean-token-mean coefficient 1/(|y_i|·4)
    lengths = torch.tensor([4] * 4 + [3] * 3 + [4] * 4 + [3] * 3, dtype=torch.float64)
    loss.backward()
    close(logp.grad.double() * lengths * 4,
          [-0.954463, -1.216873, -0.823298, -0.866024, 0.629833, 0.000336, 0.866024,
           -0.909828, -0.866024, -1.133955, -0.866024, 0.665445, 0.954192, 0.866024])


# ---------------------------------------------------------------- §6 FIPO
def test_fipo_future_kl_vectors(tb):
    delta = tb.log_ratio[G1].clone()
    delta[5] = 0.0  # y2[1]: Δ=2.5 > ln 10 → M = 0
    fkl = future_kl(delta, tb.seq_index[G1], 4, gamma=0.5)
    close(fkl, [0.2875, 0.375, -0.05, 0, -0.30, 0, 0, 0.125, 0.15, 0.30, 0, -0.20, 0.10, 0])
    fkl32 = future_kl(delta, tb.seq_index[G1], 4, gamma=2 ** (-1 / 32))
    close(fkl32[0], 0.443549)


def test_future_kl_chunking_matches_loop():
    torch.manual_seed(0)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 7, 129]))
    delta = torch.randn(seq.numel(), dtype=torch.float64)
    gamma = 0.97
    expected = torch.zeros_like(delta)
    for s in range(3):
        idx = (seq == s).nonzero().flatten()
        acc = 0.0
        for t in reversed(idx.tolist()):
            acc = delta[t].item() + gamma * acc
            expected[t] = acc
    close(future_kl(delta, seq, 3, gamma, chunk=128), expected, 1e-9)
    close(future_kl(delta, seq, 3, gamma, chunk=5), expected, 1e-9)


@pytest.mark.parametrize("overrides,expected", [
    (["loss.fipo.decay_rate=1", "loss.fipo.f_range=[1.0,1.2]", "loss.fipo.safety_thresh=10"], 0.316649),
    (["loss.fipo.decay_rate=1", "loss.fipo.f_range=[0.8,1.2]", "loss.fipo.safety_thresh=3"], 0.300650),
    (["loss.fipo.decay_rate=32", "loss.fipo.f_range=[1.0,1.2]", "loss.fipo.safety_thresh=10"], 0.309940),
])
def test_fipo_losses(tb, overrides, expected):
    cfg = apply_overrides(AlgoConfig(), ["loss.name=fipo"] + overrides)
    loss, _ = policy_loss(cfg, loss_inputs(tb, cfg, g1_logp(tb), G1))
    close(loss, [expected])


def test_fipo_on_policy_equals_dapo(tb):
    cfg = apply_overrides(AlgoConfig(), ["loss.name=fipo"])
    fipo, _ = policy_loss(cfg, loss_inputs(tb, cfg, tb.logp_old.float()))
    dapo, _ = policy_loss(AlgoConfig(), loss_inputs(tb, AlgoConfig(), tb.logp_old.float()))
    close(fipo, [dapo.item()], 1e-7)


def test_fipo_sequence_filter_drops_response():
    # one response, A<0, two tokens above the dual-clip bound → dropped from the numerator
    cfg = apply_overrides(AlgoConfig(), ["loss.name=fipo"])
    logp_old = torch.log(torch.tensor([0.1, 0.1, 0.5]))
    logp = logp_old + torch.tensor([3.0, 3.0, 0.0])
    inp = PolicyLossInputs(logp=logp, logp_old=logp_old, advantages=torch.full((3,), -1.0),
                           mask=torch.ones(3, dtype=torch.bool), seq_index=torch.zeros(3, dtype=torch.long),
                           seq_lengths=torch.tensor([3]), num_seqs=1, normalizer=LossNormalizer(3.0, 1.0))
    loss, _ = policy_loss(cfg, inp)
    assert loss.item() == 0.0
    loss_kept, _ = policy_loss(apply_overrides(cfg, ["loss.fipo.seq_filter=false"]), inp)
    assert loss_kept.item() > 0


# ---------------------------------------------------------------- §3 overlong shaping, dynamic sampling
def test_overlong_table():
    lengths = torch.tensor([16000, 16384, 16385, 18432, 20480])
    close(overlong_penalty(lengths, 20480, 4096, 1.0), [0.0, 0.0, -0.000244, -0.5, -1.0])


def test_dynamic_sampling_keep():
    acc = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert keep_groups(acc, groups).tolist() == [True, True, False, False, False, False, True]
