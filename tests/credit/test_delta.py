"""DelTA (docs/methods/delta.md): hand-computed example, proxies, config, properties, TokenCredit."""

from __future__ import annotations

import math

import pytest
import torch

from delta_megatron.credit.base import CreditInputs, TokenCredit
from delta_megatron.credit.delta import (
    DeltaConfig,
    DeltaCredit,
    margin,
    output_row_proxy,
    topk_hidden_proxy,
    topk_logits_from_hidden,
)
from delta_megatron.utils.configs import ConfigError, from_dict, validate
from tests.oracles.delta_reference import delta_reference

F64 = torch.float64

# ------------------------------------------------------------------ the hand-checkable example
# d = 2, three responses per side, one Z0 response and one padding token (masked out):
#   r1 A=+1: v=(2,0),(0,2)   r2 A=+1: v=(2,2)   r3 A=+2: v=(1,1)
#   r4 A=-1: v=(-2,0),(0,-2) r5 A=-1: v=(-1,1)  r6 A=-2: v=(0,-1)
#   r7 A=0 : v=(3,-1)        pad: v=(9,9), A=+1, mask False
HAND_V = [(2, 0), (0, 2), (2, 2), (1, 1), (-2, 0), (0, -2), (-1, 1), (0, -1), (3, -1), (9, 9)]
HAND_A = [1, 1, 1, 2, -1, -1, -1, -2, 0, 1]
HAND_MASK = [True] * 9 + [False]


def hand_inputs(dtype=F64):
    v = torch.tensor(HAND_V, dtype=dtype)
    return v, torch.tensor(HAND_A, dtype=dtype), torch.tensor(HAND_MASK)


def hand_credit_inputs(dtype=F64) -> CreditInputs:
    """Same tokens through the output-row proxy: p = 1/2 everywhere, h = 2v, so (1-p)h = v."""
    v, a, mask = hand_inputs(dtype)
    n = len(HAND_V)
    return CreditInputs(advantages=a, mask=mask, seq_index=torch.arange(n), hidden=2 * v,
                        logp=torch.full((n,), math.log(0.5), dtype=dtype))


def test_hand_example_k0():
    """K = 0 (w/o refinement), by hand.

    μ+ = [1(2,0)+1(0,2)+1(2,2)+2(1,1)] / 5 = (6,6)/5 = (1.2, 1.2)
    μ- = [1(-2,0)+1(0,-2)+1(-1,1)+2(0,-1)] / 5 = (-3,-3)/5 = (-0.6, -0.6)   (Z0 and pad: no mass)
    D = μ+ - μ- = (1.8, 1.8), c = ‖μ-‖² - ‖μ+‖² = 0.72 - 2.88 = -2.16, m = 3.6 (v1+v2) - 2.16
      e.g. (2,0): ‖v-μ-‖² - ‖v-μ+‖² = (2.6²+0.6²) - (0.8²+1.2²) = 7.12 - 2.08 = 5.04 = 7.2 - 2.16
    Δ+ = m on P      = [5.04, 5.04, 12.24, 5.04]   mean 6.84, E[Δ²] = 56.5056, var 9.72
    Δ- = -m on N     = [9.36, 9.36, 2.16, 5.76]    mean 6.66, E[Δ²] = 53.2656, var 8.91
    γ+ = √9.72 = 3.117691, γ- = √8.91 = 2.984962
    α = σ(Δ/γ): P [0.834323, 0.834323, 0.980659, 0.834323], N [0.958342, 0.958342, 0.673405, 0.873213]
    λ = 0.8 + 0.4 α: P [1.133729, 1.133729, 1.192263, 1.133729], N [1.183337, 1.183337, 1.069362,
      1.149285], Z0 0.8;  N_tok = 9, Z = Σλ = 9.978772,  λ̄ = 9 λ / Z.
    """
    v, a, mask = hand_inputs()
    details: dict = {}
    lam_bar = delta_reference(v, a, mask, DeltaConfig(K=0), details=details)
    expected = [1.0225268807, 1.0225268807, 1.0753197879, 1.0225268807, 1.0672687815, 1.0672687815,
                0.9644732464, 1.0365571154, 0.7215316451, 0.0]
    torch.testing.assert_close(lam_bar, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(details["gamma0"], torch.tensor([9.72, 8.91], dtype=F64).sqrt())
    out = DeltaCredit(DeltaConfig(K=0)).assign(hand_credit_inputs())
    torch.testing.assert_close(out.values, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=0)


def test_hand_example_k1():
    """K = 1 (the paper's default), continuing the K = 0 numbers above.

    α^(0) (above) reweights the masses: M+ = 1(0.834323)+1(0.834323)+1(0.980659)+2(0.834323)
      = 4.317951, μ+^(1) = [0.834323(2,0)+0.834323(0,2)+0.980659(2,2)+2·0.834323(1,1)] / M+
      = (1.227112, 1.227112);  M- = 4.336516, μ-^(1) = (-0.597274, -0.689426).
    γ^(1) = std of the margins at μ^(0) = γ^(0) (the lag, §4.2): final α uses γ+ = 3.117691,
      γ- = 2.984962 with margins at μ^(1):
    Δ+ = [5.117982, 5.486587, 12.784133, 5.302285],  Δ- = [9.477109, 9.845715, 1.995261, 6.012639]
    α  = P [0.837752, 0.853188, 0.983706, 0.845627],  N [0.959881, 0.964375, 0.661153, 0.882291]
    λ  = P [1.135101, 1.141275, 1.193482, 1.138251],  N [1.183952, 1.185750, 1.064461, 1.152917],
         Z0 0.8;   Z = 9.995189,  λ̄ = 9 λ / Z.
    """
    expected = [1.0220823099, 1.0276419215, 1.0746510664, 1.0249188956, 1.0660699250, 1.0676887313,
                0.9584762730, 1.0381243232, 0.7203465541, 0.0]
    v, a, mask = hand_inputs()
    details: dict = {}
    lam_bar = delta_reference(v, a, mask, DeltaConfig(K=1), details=details)
    torch.testing.assert_close(lam_bar, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(details["mu_pos"], torch.tensor([1.2271120580, 1.2271120580], dtype=F64))
    torch.testing.assert_close(details["mu_neg"], torch.tensor([-0.5972743335, -0.6894256894], dtype=F64))
    for mode in ("cache", "moments", "recompute"):
        out = DeltaCredit(DeltaConfig(K=1, mode=mode)).assign(hand_credit_inputs())
        torch.testing.assert_close(out.values, torch.tensor(expected, dtype=F64), atol=1e-6, rtol=0)
        assert out.target == "loss_weight"
        assert out.metrics["delta/gamma0_pos"] == pytest.approx(math.sqrt(9.72), abs=1e-9)
        assert out.metrics["delta/gamma_neg"] == pytest.approx(math.sqrt(8.91), abs=1e-9)  # lagged
        assert out.metrics["delta/mass_pos"] == pytest.approx(5.0)
        assert (out.metrics["delta/n_pos"], out.metrics["delta/n_neg"], out.metrics["delta/n_zero"]) \
            == (4.0, 4.0, 1.0)
        assert out.metrics["delta/lambda_bar_min"] == pytest.approx(0.7203465541, abs=1e-9)
        assert out.metrics["delta/lambda_bar_max"] == pytest.approx(1.0746510664, abs=1e-9)
        assert out.metrics["delta/lambda_bar_mean"] == pytest.approx(1.0, abs=1e-12)
        assert out.metrics["delta/degenerate"] == 0.0
    # fp32 compute stays within 1e-6 of the float64 hand values
    out32 = DeltaCredit(DeltaConfig(K=1)).assign(hand_credit_inputs(torch.float32))
    assert out32.values.dtype == torch.float32
    torch.testing.assert_close(out32.values.double(), torch.tensor(expected, dtype=F64), atol=1e-6, rtol=0)


def test_hand_example_ablations():
    """Hard assignment: α = 1[Δ>0] = 1 for every sided token here, so λ = 1.2 on P∪N and 0.8 on Z0;
    Z = 8·1.2 + 0.8 = 10.4, λ̄ = 9·1.2/10.4 = 1.0384615 and 9·0.8/10.4 = 0.6923077.
    No λ-norm: λ itself (K=0 values above). No range map (A14): weight α, Z0 gets 0,
    Z = Σα = 7.103117 (K=0), λ̄ = 9 α / Z."""
    v, a, mask = hand_inputs()
    hard = delta_reference(v, a, mask, DeltaConfig(hard_assignment=True))
    torch.testing.assert_close(hard[:9], torch.tensor([10.8 / 10.4] * 8 + [7.2 / 10.4], dtype=F64))
    raw = delta_reference(v, a, mask, DeltaConfig(K=0, lambda_norm=False))
    torch.testing.assert_close(raw[[0, 2, 6, 8]], torch.tensor([1.1337292136, 1.1922634804, 1.0693621026,
                                                                0.8], dtype=F64))
    alpha = [0.8343230340] * 2 + [0.9806587009, 0.8343230340, 0.9583422676, 0.9583422676, 0.6734052565,
                                  0.8732131778, 0.0]
    no_map = delta_reference(v, a, mask, DeltaConfig(K=0, range_map=False))
    torch.testing.assert_close(no_map[:9], 9 * torch.tensor(alpha, dtype=F64) / sum(alpha))
    # within-side only: α = σ(−‖v−μ_own‖²/γ_own) ≤ 1/2, so λ ≤ 1.0 before normalisation
    within = delta_reference(v, a, mask, DeltaConfig(K=0, within_side_only=True, lambda_norm=False))
    d_pos = ((v[:4] - torch.tensor([1.2, 1.2], dtype=F64)) ** 2).sum(-1)  # [0.64+1.44, ..]
    gamma = (-d_pos).var(unbiased=False).sqrt()
    torch.testing.assert_close(within[:4], 0.8 + 0.4 * torch.sigmoid(-d_pos / gamma))


# ------------------------------------------------------------------------------- proxies (§2)

def test_output_row_proxy_is_lm_head_row_gradient():
    """Autograd brute force (V=11, d=5): ∂ log softmax(W h)[y] / ∂W_y = (1 − p_y) h, and the other
    rows' gradients −p_j h are what the proxy drops (App. F)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(11, 5, generator=gen, dtype=F64, requires_grad=True)
    for y in (0, 4, 10):
        h = torch.randn(5, generator=gen, dtype=F64)
        logp = torch.log_softmax(W @ h, -1)[y]
        (grad,) = torch.autograd.grad(logp, W)
        v = output_row_proxy(h[None], logp.detach()[None])[0]
        torch.testing.assert_close(grad[y], v, atol=1e-12, rtol=0)
        p = torch.softmax(W @ h, -1).detach()
        torch.testing.assert_close(grad[(y + 1) % 11], -p[(y + 1) % 11] * h, atol=1e-12, rtol=0)


def test_one_scalar_margin_equals_two_distances():
    gen = torch.Generator().manual_seed(1)
    v, mu_p, mu_n = (torch.randn(s, generator=gen, dtype=F64) for s in ((50, 7), (7,), (7,)))
    explicit = ((v - mu_n) ** 2).sum(-1) - ((v - mu_p) ** 2).sum(-1)
    torch.testing.assert_close(margin(v, mu_p, mu_n), explicit, atol=1e-12, rtol=0)


def test_topk_hidden_proxy():
    """With K = V the proxy is exactly ∇_h log p(y) (autograd); with K < V it matches a per-token loop
    over the K largest logits with the softmax renormalised on them (§2.2)."""
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(11, 5, generator=gen, dtype=F64)
    h = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 3, 3, 7, 10, 5])
    logp = torch.log_softmax(h @ W.T, -1).gather(1, y[:, None]).sum()
    (grad_h,) = torch.autograd.grad(logp, h)
    ids, logits = topk_logits_from_hidden(h.detach(), W, k=11, chunk_tokens=4)
    torch.testing.assert_close(topk_hidden_proxy(W, y, ids, logits), grad_h, atol=1e-12, rtol=0)
    ids, logits = topk_logits_from_hidden(h.detach(), W, k=3, chunk_tokens=4)
    v_hat = topk_hidden_proxy(W, y, ids, logits)
    for t in range(6):
        z = W @ h[t].detach()
        top = sorted(range(11), key=lambda j: -z[j].item())[:3]
        p = torch.softmax(z[top], -1)
        ref = W[y[t]] - sum(p[i] * W[j] for i, j in enumerate(top))
        torch.testing.assert_close(v_hat[t], ref, atol=1e-12, rtol=0)
    # through DeltaCredit: the topk_hidden proxy replaces v, the rest is unchanged
    cfg = DeltaConfig(proxy="topk_hidden", topk_k=3)
    credit = DeltaCredit(cfg)
    assert credit.needs.topk == 3 and not credit.needs.logp
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, -2.0], dtype=F64)
    inputs = CreditInputs(advantages=adv, mask=torch.ones(6, dtype=torch.bool), seq_index=torch.arange(6),
                          token_ids=y, hidden=h.detach(), extra={"lm_head_weight": W})
    expected = delta_reference(v_hat, adv, inputs.mask, cfg)
    torch.testing.assert_close(credit.assign(inputs).values, expected, atol=1e-9, rtol=0)


def test_topk_hidden_proxy_vocab_shards_sum_to_the_whole():
    """§9.5: each vocab-parallel rank forms the terms of the rows it owns; the sum over ranks is v̂.
    Shards of 4 rows over V = 11 (the last one short), targets < 0 contribute nothing."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(11, 5, generator=gen, dtype=F64)
    h = torch.randn(7, 5, generator=gen, dtype=F64)
    y = torch.tensor([0, 3, 4, 7, 10, 8, -1])
    ids, logits = topk_logits_from_hidden(h, W, k=5)
    whole = topk_hidden_proxy(W, y, ids, logits)
    parts = [topk_hidden_proxy(W[start:start + 4], y, ids, logits, vocab_start=start) for start in (0, 4, 8)]
    torch.testing.assert_close(sum(parts), whole, atol=1e-12, rtol=0)
    p = torch.softmax(logits[6], -1)
    torch.testing.assert_close(whole[6], -(p[:, None] * W[ids[6]]).sum(0), atol=1e-12, rtol=0)
    assert all(part.abs().sum() > 0 for part in parts)


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("override, field", [
    ({"K": 4}, "credit.delta.K"),
    ({"lambda_range": [1.2, 0.8]}, "credit.delta.lambda_range"),
    ({"mode": "moments", "within_side_only": True}, "credit.delta.mode"),
    ({"eps_gamma": 0.0}, "credit.delta.eps_gamma"),
    ({"random_lambda": True, "hard_assignment": True}, "credit.delta.hard_assignment"),
    ({"frozen_gamma": True, "hard_assignment": True}, "credit.delta.frozen_gamma"),
    ({"topk_k": 0}, "credit.delta.topk_k"),
    ({"within_side_only": True, "hard_assignment": True}, "credit.delta.hard_assignment"),
])
def test_config_errors_name_the_field(override, field):
    cfg = from_dict(DeltaConfig, override, "credit.delta")
    with pytest.raises(ConfigError) as err:
        validate(cfg, "credit.delta")
    assert err.value.path == field


def test_config_literals_rejected():
    with pytest.raises(ConfigError, match="selection"):
        from_dict(DeltaConfig, {"selection": "top20"}, "credit.delta")
    with pytest.raises(ConfigError, match="credit.delta.mode: 'fast' — allowed: 'cache'"):
        from_dict(DeltaConfig, {"mode": "fast"}, "credit.delta")
    with pytest.raises(ConfigError, match="^mode: 'fast' — allowed: 'cache'"):
        DeltaConfig(mode="fast")  # type: ignore[arg-type]
    validate(DeltaConfig(), "credit.delta")


# -------------------------------------------------------------------------------- properties

def random_batch(seed: int, responses: int = 24, d: int = 6, dtype=F64):
    """Responses of random length with group-style advantages (some exactly 0), random v, padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (responses,), generator=gen)
    seq_adv = torch.randn(responses, generator=gen, dtype=dtype)
    seq_adv[torch.randperm(responses, generator=gen)[: responses // 6]] = 0.0
    seq = torch.repeat_interleave(torch.arange(responses), lengths)
    n = int(lengths.sum())
    v = torch.randn(n, d, generator=gen, dtype=dtype) + 0.5 * seq_adv[seq, None]
    mask = torch.rand(n, generator=gen) > 0.1
    return v, seq_adv[seq], mask, seq


def test_properties_mean_one_and_range():
    v, a, mask, _ = random_batch(3)
    for K in range(4):
        lam_bar = delta_reference(v, a, mask, DeltaConfig(K=K))
        assert lam_bar[mask].mean().item() == pytest.approx(1.0, abs=1e-12)
        assert bool((lam_bar[~mask] == 0).all())
        lam = delta_reference(v, a, mask, DeltaConfig(K=K, lambda_norm=False))[mask]
        assert bool(((lam >= 0.8) & (lam <= 1.2)).all())
        assert bool((lam[a[mask] == 0] == 0.8).all())
        torch.testing.assert_close(lam * mask.sum() / lam.sum(), lam_bar[mask])


def test_permuting_responses_permutes_coefficients():
    v, a, mask, seq = random_batch(4)
    order = torch.randperm(int(seq.max()) + 1, generator=torch.Generator().manual_seed(0))
    perm = torch.cat([(seq == r).nonzero().flatten() for r in order.tolist()])
    for cfg in (DeltaConfig(K=1), DeltaConfig(K=2, within_side_only=True)):
        lam = delta_reference(v, a, mask, cfg)
        torch.testing.assert_close(delta_reference(v[perm], a[perm], mask[perm], cfg), lam[perm])


@pytest.mark.parametrize("mode", ["cache", "moments", "recompute"])
def test_degenerate_batch_is_plain_dapo(mode):
    """A8: one side empty in the scope -> λ̄ = 1 on valid tokens, counted, and no further passes."""
    v, a, mask, _ = random_batch(5)
    a = a.abs()  # no negative side
    credit = DeltaCredit(DeltaConfig(mode=mode, K=2))
    inputs = CreditInputs(advantages=a, mask=mask, seq_index=torch.zeros_like(a, dtype=torch.long),
                          hidden=v, logp=torch.full_like(a, -30.0))
    out = credit.assign(inputs)
    torch.testing.assert_close(out.values, mask.to(F64))
    assert out.metrics["delta/degenerate"] == 1.0 and out.metrics["delta/data_passes"] == 1.0
    assert credit.state.degenerate_batches == 1
    torch.testing.assert_close(delta_reference(v, a, mask, DeltaConfig()), mask.to(F64))
    out = credit.assign(inputs)
    assert out.metrics["delta/degenerate_batches"] == 2.0


# fidelity.md §6: one side empty. d = 2, all A >= 0: v = (1,0) A=1, (0,1) A=1, (2,1) A=2, Z0 (1,1) A=0.
ONE_SIDED_V = [(1.0, 0.0), (0.0, 1.0), (2.0, 1.0), (1.0, 1.0)]
ONE_SIDED_A = [1.0, 1.0, 2.0, 0.0]
ONE_SIDED_LAMBDA_BAR = {0: [1.032296, 0.985571, 1.170352, 0.811781],  # [X]
                        1: [1.029119, 0.965617, 1.186458, 0.818806]}


@pytest.mark.parametrize("K", [0, 1])
@pytest.mark.parametrize("mode", ["cache", "moments", "recompute"])
def test_one_sided_batch_zero_centroid(K, mode):
    """``empty_side = zero_centroid`` (the released code): μ- = 0 (mass clamped at ε), γ- from a
    count clamped >= 1, λ computed as usual. By hand (K = 0): μ+ = (5/4, 3/4), Δ+ = 2vᵀμ+ − ‖μ+‖² =
    [0.375, −0.625, 4.375] (‖μ+‖² = 2.125), γ+ = population std = √(14/3) = 2.160247,
    α = σ(Δ/γ) = [0.543289, 0.428171, 0.883421], λ = 0.8 + 0.4α and 0.8 on the Z0 token,
    Z = 3.941952, λ̄ = 4λ/Z. Negating every advantage mirrors the sides and gives the same λ̄."""
    v = torch.tensor(ONE_SIDED_V, dtype=F64)
    mask = torch.ones(4, dtype=torch.bool)
    for sign in (1.0, -1.0):
        a = sign * torch.tensor(ONE_SIDED_A, dtype=F64)
        credit = DeltaCredit(DeltaConfig(K=K, mode=mode, empty_side="zero_centroid"))
        out = credit.assign(CreditInputs(advantages=a, mask=mask, seq_index=torch.arange(4), hidden=2 * v,
                                         logp=torch.full((4,), math.log(0.5), dtype=F64)))
        assert out.values.tolist() == pytest.approx(ONE_SIDED_LAMBDA_BAR[K], abs=1e-6)
        assert out.metrics["delta/one_sided"] == 1.0 and out.metrics["delta/degenerate"] == 0.0
        assert credit.state.degenerate_batches == 0
        oracle = delta_reference(v, a, mask, DeltaConfig(K=K, empty_side="zero_centroid"))
        torch.testing.assert_close(out.values, oracle, atol=1e-12, rtol=0)
        uniform = DeltaCredit(DeltaConfig(K=K, mode=mode)).assign(  # the default: plain DAPO
            CreditInputs(advantages=a, mask=mask, seq_index=torch.arange(4), hidden=2 * v,
                         logp=torch.full((4,), math.log(0.5), dtype=F64)))
        assert uniform.values.tolist() == [1.0] * 4 and uniform.metrics["delta/degenerate"] == 1.0


def test_empty_side_config():
    assert DeltaConfig().empty_side == "uniform"
    with pytest.raises(ConfigError, match="empty_side"):
        validate(DeltaConfig(empty_side="zero"), "credit.delta")  # type: ignore[arg-type]
    two_sided = DeltaCredit(DeltaConfig(empty_side="zero_centroid")).assign(hand_credit_inputs())
    torch.testing.assert_close(two_sided.values, DeltaCredit().assign(hand_credit_inputs()).values)  # no effect


def test_selection_diagnostic():
    """Top / bottom 50 % by λ over the scope (ties at the cut kept), random 50 %; output is a mask."""
    v, a, mask, _ = random_batch(6)
    n_valid = int(mask.sum())
    lam = delta_reference(v, a, mask, DeltaConfig(lambda_norm=False))
    top = delta_reference(v, a, mask, DeltaConfig(selection="top50"))
    bottom = delta_reference(v, a, mask, DeltaConfig(selection="bottom50"))
    rand = delta_reference(v, a, mask, DeltaConfig(selection="random50"), seed=1)
    assert top.dtype == torch.bool and not bool((top & ~mask).any())
    assert int(top.sum()) == (n_valid + 1) // 2  # the sided λ are distinct
    assert lam[top].min() > lam[mask & ~top].max()
    assert int(bottom.sum()) >= (n_valid + 1) // 2  # Z0 tokens tie at λ_min
    assert lam[bottom].max() < lam[mask & ~bottom].min()
    assert int(rand.sum()) == (n_valid + 1) // 2 and not bool((rand & ~mask).any())
    credit = DeltaCredit(DeltaConfig(selection="top50"))
    assert credit.target == "loss_mask"
    out = credit.assign(CreditInputs(advantages=a, mask=mask, seq_index=torch.zeros_like(a).long(),
                                     hidden=2 * v, logp=torch.full_like(a, math.log(0.5))))
    assert torch.equal(out.values, top)


def test_credit_protocol_frozen_gamma_and_state():
    """A3: γ measured on the first non-degenerate batch, then frozen for later batches; the state
    survives a state_dict round trip."""
    credit = DeltaCredit(DeltaConfig(frozen_gamma=True, K=2))
    assert isinstance(credit, TokenCredit)
    assert credit.needs.hidden and credit.needs.logp and credit.per_microbatch is False
    batches = [random_batch(s) for s in (7, 8)]
    outs = []
    for v, a, mask, _ in batches:
        inputs = CreditInputs(advantages=a, mask=mask, seq_index=torch.zeros_like(a).long(),
                              hidden=2 * v, logp=torch.full_like(a, math.log(0.5)))
        outs.append(credit.assign(inputs).values)
    v, a, mask, _ = batches[0]
    details: dict = {}
    first = delta_reference(v, a, mask, DeltaConfig(frozen_gamma=True, K=2), details=details)
    gamma0 = tuple(details["gamma0"].tolist())
    torch.testing.assert_close(outs[0], first)
    assert credit.state.frozen_gamma == pytest.approx(gamma0, abs=1e-12)
    v, a, mask, _ = batches[1]
    second = delta_reference(v, a, mask, DeltaConfig(frozen_gamma=True, K=2), frozen_gamma=gamma0)
    torch.testing.assert_close(outs[1], second)
    adaptive = delta_reference(v, a, mask, DeltaConfig(K=2))
    assert (second - adaptive).abs().max() > 1e-4  # the frozen γ really differs from re-estimation
    restored = DeltaCredit(DeltaConfig(frozen_gamma=True, K=2))
    restored.load_state_dict(credit.state_dict())
    assert restored.state == credit.state


def test_random_lambda_is_uniform_control():
    v, a, mask, _ = random_batch(9, responses=200)
    lam = delta_reference(v, a, mask, DeltaConfig(random_lambda=True, lambda_norm=False), seed=5)[mask]
    sided = a[mask] != 0
    assert bool((lam[~sided] == 0.8).all())
    u = (lam[sided] - 0.8) / 0.4
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.05  # ~600 draws: std of the mean ≈ 0.012
    again = delta_reference(v, a, mask, DeltaConfig(random_lambda=True, lambda_norm=False), seed=5)[mask]
    assert torch.equal(lam, again)


def test_bad_inputs_raise():
    credit = DeltaCredit()
    a = torch.ones(4)
    with pytest.raises(ValueError, match="hidden"):
        credit.assign(CreditInputs(advantages=a, mask=a.bool(), seq_index=a.long()))
    with pytest.raises(ValueError, match="logp"):
        credit.assign(CreditInputs(advantages=a, mask=a.bool(), seq_index=a.long(), hidden=torch.ones(4, 3)))
    with pytest.raises(ValueError, match="mask must be bool"):
        credit.assign(CreditInputs(advantages=a, mask=a, seq_index=a.long(), hidden=torch.ones(4, 3),
                                   logp=-a))
