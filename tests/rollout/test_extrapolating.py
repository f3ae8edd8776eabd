"""ExtrapolatingEngine (§9.3 decoding with two models): the worked example through the batched step
and the engine, a slow per-row reference (full forwards, the per-step reference function), seeds,
and the errors a user can hit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from delta_megatron.rollout.engine import GenerateRequest, RolloutEngine, RolloutError, SamplingParams
from delta_megatron.rollout.extrapolating import ExtrapolatingEngine, row_seed
from delta_megatron.rollout.extrapolation import (
    ExtrapolationConfig,
    extrapolation_step,
    resample_probs,
    sample_with_uniforms,
    selective_extrapolation,
    top_p_filter,
)
from delta_megatron.utils.configs import ConfigError, validate
from tests.rollout.tiny import EOS, PAD, tiny_model

BASE_P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
RL_P = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31]]


# ------------------------------------------------------------------ the worked example (3 tokens)
@pytest.mark.parametrize("gamma,final", [(0.05, [0.0, 0.756442, 0.243558]), (0.1, [0.0, 0.762770, 0.237230])])
def test_worked_example_batched_resample(gamma, final):
    cfg = ExtrapolationConfig(tau=-0.3, gamma=gamma, temperature=1.0, top_p=0.7)
    probs = resample_probs(BASE_P.log()[None], RL_P.log()[None], torch.ones(1, 3, dtype=torch.bool), cfg)
    assert probs[0].tolist() == pytest.approx(final, abs=1e-6)


def test_worked_example_step_with_chosen_uniforms():
    """Base top-p 0.7 keeps {0: .625, 1: .375}; u0 = 0.1 draws y* = 0, Δ = log(.2/.5) <= −0.3, so the
    position resamples from {1: .756442, 2: .243558} (cdf .756442): u2 = 0.5 -> 1, u2 = 0.8 -> 2."""
    cfg = ExtrapolationConfig(tau=-0.3, gamma=0.05, top_p=0.7)
    logits_b, logits_r = BASE_P.log().repeat(3, 1), RL_P.log().repeat(3, 1)
    u = torch.tensor([[0.1, 0.0, 0.5], [0.1, 0.0, 0.8], [0.7, 0.0, 0.5]], dtype=torch.float64)
    step = extrapolation_step(logits_b, logits_r, cfg, u)
    assert step.base_tokens.tolist() == [0, 0, 1]
    assert step.delta.tolist() == pytest.approx([math.log(0.4)] * 2 + [math.log(2.0)], abs=1e-12)
    assert step.selected.tolist() == [True, True, False]
    assert step.tokens.tolist() == [1, 2, 1]


class _ConstantLM(torch.nn.Module):
    """A model whose next-token logits are always ``logits`` (HF call signature, a real config so
    the engine's KV cache can be built)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        from transformers import Qwen3Config

        self.config = Qwen3Config(vocab_size=len(logits), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                  intermediate_size=8, eos_token_id=None)
        self.head = torch.nn.Linear(1, len(logits), bias=False)
        self.register_buffer("fixed", logits.float())

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **_kw):
        return SimpleNamespace(logits=self.fixed.expand(input_ids.shape[0], input_ids.shape[1], -1), cache=cache)


def test_worked_example_through_the_engine():
    """Final-token law of the toy: P(1) = .625·.756442 + .375, P(2) = .625·.243558, P(0) = 0; the
    fraction of resampled positions is P(y* = 0) = .625. 8000 rows in one batch, 5σ bounds."""
    engine = ExtrapolatingEngine(_ConstantLM(BASE_P.log()), _ConstantLM(RL_P.log()), pad_token_id=0,
                                 eos_token_id=[], config=ExtrapolationConfig(tau=-0.3, gamma=0.05))
    n = 8000
    params = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=1, n=n, seed=5)
    samples = engine.generate([GenerateRequest("toy", [1, 2], params)])
    counts = torch.bincount(torch.tensor([s.response_ids[0] for s in samples]), minlength=3).double() / n
    want = [0.0, 0.625 * 0.756442 + 0.375, 0.625 * 0.243558]
    sigma = math.sqrt(0.25 / n)
    assert counts[0] == 0.0
    assert abs(counts[1] - want[1]) < 5 * sigma and abs(counts[2] - want[2]) < 5 * sigma
    assert engine.stats.tokens == n and abs(engine.stats.selected_frac - 0.625) < 5 * sigma
    assert engine.stats.changed == engine.stats.selected  # y* = 0 never survives top-p


def test_random_selection_rate_across_prompts_with_one_seed():
    """Callers give every prompt of a call one seed: the rows must still draw independent uniforms,
    or a random selection would pick the same positions in every response."""
    engine = ExtrapolatingEngine(_ConstantLM(BASE_P.log()), _ConstantLM(RL_P.log()), pad_token_id=0,
                                 eos_token_id=[], config=ExtrapolationConfig(select="random", threshold=0.3))
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1, n=1, seed=5)
    engine.generate([GenerateRequest(f"p{i}", [1, 2], params) for i in range(2000)])
    assert engine.stats.tokens == 2000
    assert abs(engine.stats.selected_frac - 0.3) < 5 * math.sqrt(0.21 / 2000)


# ------------------------------------------------------------------ engine vs a slow reference
def _rl_model():
    """The base model with perturbed weights: Δlog p of both signs, candidates that differ."""
    model = tiny_model(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model


def _reference(base, rl, prompt, seed, cfg, max_new):
    """One row, full forwards (no KV cache, no padding), the per-step reference function on the
    returned top-k (ids, log-probs); γ = 0 is written out as "sample π_RL over the base candidates"."""
    gen = torch.Generator().manual_seed(seed)
    seq, out = list(prompt), []
    k = cfg.num_logprobs
    with torch.no_grad():
        for _ in range(max_new):
            u = torch.rand(3, generator=gen, dtype=torch.float64)
            lb = torch.log_softmax(base(torch.tensor([seq])).logits[0, -1].double(), -1)
            lr = torch.log_softmax(rl(torch.tensor([seq])).logits[0, -1].double(), -1)
            base_probs = top_p_filter(torch.softmax(lb / cfg.temperature, -1), cfg.top_p)
            y = int(sample_with_uniforms(base_probs[None], u[None, 0])[0])
            base_ids = lb.topk(k).indices
            if y not in base_ids.tolist():
                base_ids = torch.cat([base_ids, torch.tensor([y])])
            rl_top = lr.topk(k)
            step = selective_extrapolation(base_ids, lb[base_ids], rl_top.indices, rl_top.values, y, cfg)
            tok = y
            if step.resample:
                if cfg.gamma == 0:  # selective replace, from its definition
                    aligned = torch.tensor([lr[i] if i in rl_top.indices.tolist() else rl_top.values.min()
                                            for i in base_ids.tolist()], dtype=torch.float64)
                    local = top_p_filter(torch.softmax(aligned / cfg.temperature, -1), cfg.top_p, lb[base_ids])
                    assert torch.allclose(local, step.probs, atol=1e-12)
                else:
                    local = step.probs
                full = torch.zeros_like(lb).scatter(0, base_ids, local)
                tok = int(sample_with_uniforms(full[None], u[None, 2])[0])
            out.append(tok)
            seq.append(tok)
            if tok == EOS:
                break
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_engine_matches_per_row_reference(model, gamma):
    rl = _rl_model()
    # top-p 0.85, not 0.9: ten tied candidates (none in the RL top-10) put the 0.9 cut exactly on a
    # cumulative sum, where float32 and float64 legitimately disagree
    cfg = ExtrapolationConfig(tau=-0.3, gamma=gamma, num_logprobs=10, top_p=0.85, temperature=0.8)
    engine = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg, batch_size=3)
    assert isinstance(engine, RolloutEngine)
    params = SamplingParams(temperature=0.8, top_p=0.85, max_new_tokens=8, n=2, seed=21)
    samples = engine.generate([GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    assert 0.05 < engine.stats.selected_frac < 0.95  # both branches are exercised
    for s in samples:
        seed = row_seed(21, s.request_id, s.index)
        assert s.response_ids == _reference(model, rl, s.prompt_ids, seed, cfg, 8), s.sample_id


def test_gamma_zero_is_selective_replace_and_gamma_moves_tokens(model):
    """γ = 0 and explicit replace weights agree token for token; γ > 0 changes some resampled tokens
    (same uniforms), and select='none' is the base model alone (nothing resampled)."""
    rl = _rl_model()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, n=4, seed=3)
    reqs = [GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]

    def run(**kw):
        engine = ExtrapolatingEngine(model, rl, PAD, EOS, config=ExtrapolationConfig(num_logprobs=48, **kw))
        return [s.response_ids for s in engine.generate(reqs)], engine.stats

    replace, _ = run(gamma=0.0)
    strong, _ = run(gamma=2.0)
    none, stats = run(select="none")
    assert replace != strong
    assert stats.selected == 0 and none != replace


def test_seed_reproducible_and_independent_of_batch(model):
    rl = _rl_model()
    cfg = ExtrapolationConfig(num_logprobs=10)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, n=3, seed=7)
    reqs = [GenerateRequest(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg).generate(reqs)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    again = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg, batch_size=1).generate(reqs)
    assert [s.response_ids for s in again] == [s.response_ids for s in first]
    alone = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg).generate(reqs[1:2])
    assert [s.response_ids for s in alone] == [s.response_ids for s in first[3:6]]
    other = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg).generate(
        [GenerateRequest(r.request_id, r.prompt_ids, params.replace(seed=8)) for r in reqs])
    assert [s.response_ids for s in other] != [s.response_ids for s in first]
    assert len({tuple(s.response_ids) for s in first[:3]}) > 1
    twins = ExtrapolatingEngine(model, rl, PAD, EOS, config=cfg).generate(
        [GenerateRequest(name, PROMPTS[0], params) for name in ("a", "b")])  # same prompt and seed
    assert [s.response_ids for s in twins[:3]] != [s.response_ids for s in twins[3:]]


def test_samples_stop_at_the_shorter_context():
    """As every engine: prompt + response never exceed max_position_embeddings, here the RL model's 6
    (the base model allows 8); a prompt that fills the context is an error naming the request."""
    base, rl = _ConstantLM(BASE_P.log()), _ConstantLM(RL_P.log())
    base.config.max_position_embeddings, rl.config.max_position_embeddings = 8, 6
    engine = ExtrapolatingEngine(base, rl, pad_token_id=0, eos_token_id=[])
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=2, seed=1)
    samples = engine.generate([GenerateRequest("two", [1, 2], params), GenerateRequest("five", [1] * 5, params)])
    assert [len(s.response_ids) for s in samples] == [4, 4, 1, 1]
    assert {s.finish_reason for s in samples} == {"length"}
    with pytest.raises(RolloutError, match="'six' has 6 prompt tokens.*context of 6"):
        engine.generate([GenerateRequest("six", [1] * 6, params)])


# ------------------------------------------------------------------ errors
def test_mismatched_vocabularies_are_refused(model):
    other = _ConstantLM(torch.zeros(20))
    with pytest.raises(ValueError, match="20-token vocabulary.*48.*share one tokenizer"):
        ExtrapolatingEngine(model, other, PAD, EOS)


def test_bad_settings_name_the_field(model):
    with pytest.raises(ConfigError, match="threshold"):
        validate(ExtrapolationConfig(select="kl"))
    with pytest.raises(ConfigError, match="threshold.*probability"):
        validate(ExtrapolationConfig(select="random", threshold=1.5))
    with pytest.raises(ConfigError, match="select"):
        validate(ExtrapolationConfig(select="loudest"))
    with pytest.raises(ConfigError, match="num_logprobs"):
        ExtrapolatingEngine(model, model, PAD, EOS, config=ExtrapolationConfig(num_logprobs=0))
    engine = ExtrapolatingEngine(model, model, PAD, EOS)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([GenerateRequest("g", [5], SamplingParams(temperature=0.0))])
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([GenerateRequest("k", [5], SamplingParams(top_k=5))])
    with pytest.raises(RolloutError, match="no weight updates"):
        engine.update_weights([])
    with pytest.raises(RolloutError, match="not colocated"):
        engine.release_memory_occupation(["kv_cache"])
