"""Low-probability advantage re-weighting (baselines.md §9.2): toy Ã vectors and the ablation variants."""

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
        validate(LowProbConfig(variant="ppl"))
    assert LowProbConfig().alpha == 0.1 and LowProbConfig().variant == "reshape_reversed"
