"""Low-probability advantage re-weighting (baselines.md §9.2): toy Ã vectors and the ablation variants;
the perplexity-based sequence variants (fidelity.md §4): toy numbers (on 2 and 4 gloo ranks whose
shards split the prompt groups: tests/dist/fidelity_cases.py, run by tests/test_cp_token_sharding.py)."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.credit.lowprob import LowProbConfig, LowProbCredit, lowprob_weight
from delta_megatron.utils.configs import ConfigError, validate
from tests.credit.toy_batch import toy_batch

TOL = 1e-5

# §9.2 worked example, α = 0.1 [X]
FACTORS_Y1 = [1.01, 1.05, 1.08, 1.001]
FACTORS_Y2 = [1.02, 1.09, 1.005]
A_TILDE = {
    0: [0.874684, 0.909325, 0.935306, 0.866890],
    1: [-0.883344, -0.943966, -0.870354],
    3: [-0.917985, -0.948296, -0.874684],
    4: [1.544997, 1.612497, 1.502997],
    7: [-0.507499, -0.527499, -0.542499, -0.501999],
}


def test_toy_reweighted_advantages():
    tb = toy_batch()
    out = LowProbCredit(LowProbConfig(alpha=0.1)).assign(tb.credit_inputs())
    assert out.target == "advantage_scale"
    factors = tb.split(out.values.double())
    assert factors[0] == pytest.approx(FACTORS_Y1, abs=1e-6)
    assert factors[1] == pytest.approx(FACTORS_Y2, abs=1e-6)
    a_tilde = tb.split(tb.advantages * out.values.double())
    for resp, want in A_TILDE.items():
        assert a_tilde[resp] == pytest.approx(want, abs=TOL), resp
    # every token is scaled regardless of sign, by 1 + α(1 − π_old) >= 1
    assert bool((out.values >= 1.0).all())
    assert out.metrics["lowprob/weight_mean"] == pytest.approx(float((1 + 0.1 * (1 - tb.pi_old)).mean()), abs=1e-6)


@pytest.mark.parametrize("variant,expected", [
    ("reshape_reversed", lambda p, a: 1 + a - a * p),
    ("reshape", lambda p, a: a * p + 1 - a),
    ("middle", lambda p, a: a + p * (1 - p)),
    ("normalize", lambda p, a: 1 / (1 + a - p)),
])
def test_variants(variant, expected):
    p = torch.tensor([0.05, 0.2, 0.5, 0.9, 0.99], dtype=torch.float64)
    for a in (0.1, 0.2):
        want = torch.tensor([expected(float(x), a) for x in p], dtype=torch.float64)
        assert torch.allclose(lowprob_weight(p, a, variant), want, atol=1e-12)
    # spot values at α = 0.1, π = 0.5
    spot = {"reshape_reversed": 1.05, "reshape": 0.95, "middle": 0.35, "normalize": 1 / 0.6}
    assert float(lowprob_weight(torch.tensor(0.5), 0.1, variant)) == pytest.approx(spot[variant], abs=1e-6)


def test_adv_sign_and_mask():
    tb = toy_batch()
    inputs = tb.credit_inputs()
    inputs.mask[0] = False
    out = LowProbCredit(LowProbConfig(alpha=0.2, adv_sign="negative")).assign(inputs)
    vals = out.values.double()
    neg = tb.advantages < 0
    assert bool((vals[~neg] == 1.0).all())
    assert torch.allclose(vals[neg], (1 + 0.2 * (1 - tb.pi_old))[neg].float().double(), atol=1e-6)
    out = LowProbCredit(LowProbConfig(alpha=0.2)).assign(inputs)
    assert float(out.values[0]) == 1.0  # invalid token untouched
    assert float(out.values[1]) == pytest.approx(1 + 0.2 * 0.5, abs=1e-6)


def test_config_validation():
    with pytest.raises(ConfigError, match="alpha"):
        validate(LowProbConfig(alpha=-0.1))
    with pytest.raises(ConfigError, match="alpha"):
        validate(LowProbConfig(alpha=1.0, variant="reshape"))
    with pytest.raises(ConfigError, match="variant"):
        validate(LowProbConfig(variant="perplexity"))  # type: ignore[arg-type]
    validate(LowProbConfig(variant="ppl-norm-clamp"))
    assert LowProbConfig().alpha == 0.1 and LowProbConfig().variant == "reshape_reversed"


# fidelity.md §4 worked example [X]: ℓ_i = −mean_t log π_old per response, groups g1 = y1..y4, g2 = y5..y8
ELL = [0.604499, 0.859007, 0.520381, 1.339128, 0.587724, 0.411477, 0.529936, 0.724742]
PPL = {  # variant, c -> (w_i, Ã_i = A_i·w_i)
    ("ppl", 0.1): ([0.939550, 0.914099, 0.947962, 0.866087, 0.941228, 0.958852, 0.947006, 0.927526],
                   [0.813673, -0.791632, 0.820958, -0.750052, 1.411839, -0.479425, -0.473502, -0.463762]),
    ("ppl-norm", 0.1): ([1.070950, 0.991140, 1.097329, 0.840581, 0.978483, 1.134840, 1.029749, 0.856928],
                        [0.927469, -0.858351, 0.950313, -0.727963, 1.467722, -0.567419, -0.514874, -0.428463]),
    ("ppl-norm-clamp", 0.5): ([1.2, 0.955700, 1.2, 0.8, 0.892416, 1.2, 1.148746, 0.8],
                              [1.039229, -0.827659, 1.039229, -0.692819, 1.338621, -0.599999, -0.574372,
                               -0.399999]),
}


def per_response(tb, values: torch.Tensor) -> list[float]:
    """The (constant) per-token value of each response, checking it is constant."""
    rows = tb.split(values.double())
    assert all(max(r) - min(r) < 1e-12 for r in rows)
    return [r[0] for r in rows]


@pytest.mark.parametrize("variant,c", list(PPL))
def test_ppl_sequence_variants_toy(variant, c):
    tb = toy_batch()
    ell = [-float(tb.logp_old[tb.seq_index == i].mean()) for i in range(8)]
    assert ell == pytest.approx(ELL, abs=1e-6)
    out = LowProbCredit(LowProbConfig(alpha=c, variant=variant)).assign(tb.credit_inputs(torch.float64))
    w, a_tilde = PPL[(variant, c)]
    assert per_response(tb, out.values) == pytest.approx(w, abs=1e-6)
    assert per_response(tb, out.values.double() * tb.advantages) == pytest.approx(a_tilde, abs=1e-6)
    assert out.metrics["lowprob/weight_min"] == pytest.approx(min(w), abs=1e-6)


def test_ppl_group_statistics_are_per_prompt():
    """A response moved to another group changes the z-scores of both groups (population std), and a
    group of one gets z = 0, i.e. w = 1."""
    tb = toy_batch()
    inputs = tb.credit_inputs(torch.float64)
    inputs.group_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])  # y8 alone
    w = per_response(tb, LowProbCredit(LowProbConfig(variant="ppl-norm")).assign(inputs).values)
    assert w[7] == pytest.approx(1.0, abs=1e-12)
    g2 = torch.tensor(ELL[4:7], dtype=torch.float64)
    z = (g2 - g2.mean()) / (g2.std(unbiased=False) + 1e-6)
    assert w[4:7] == pytest.approx((1 - 0.1 * z).tolist(), abs=1e-6)
    assert w[:4] == pytest.approx(PPL[("ppl-norm", 0.1)][0][:4], abs=1e-6)
