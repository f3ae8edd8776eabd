"""Counterfactual span weighting (baselines.md §10): toy weights of both variants, span detection,
the ScoreFn batching contract and the skip/dedupe/ablation paths."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.credit.base import CreditInputs
from delta_megatron.credit.counterfactual import (
    CounterfactualConfig,
    CounterfactualCredit,
    aligntune_importance,
    aligntune_weights,
    blog_weights,
    conserve,
)
from delta_megatron.credit.spans import SpanLayout, arithmetic_spans, detect_spans, sentence_spans
from delta_megatron.utils.configs import ConfigError, validate

TOL = 1e-6
EOS = 151643

# §10 worked example [X]: 13 tokens, reasoning 0–9, answer 10–12, spans s1 = 1–3, s2 = 5–6, s3 = 8–9.
TOY_LAYOUT = SpanLayout(end=13, reasoning_end=10, answer_start=10, answer_marker="final answer",
                        spans=[(1, 4), (5, 7), (8, 10)], kinds=["sentence"] * 3)
BASELINE, MASKED = -0.5, [-3.0, -1.0, -0.3]
DROPS = torch.tensor([BASELINE - m for m in MASKED], dtype=torch.float64)  # I = [2.5, 0.5, −0.2]
BLOG_W = [1, 2, 2, 2, 1, 0.888889, 0.888889, 1, 0.5, 0.5, 1.5, 1.5, 1.5]
BLOG_WA = [1.5, 3, 3, 3, 1.5, 1.333333, 1.333333, 1.5, 0.75, 0.75, 2.25, 2.25, 2.25]
AT_IMPORTANCE = [0.537037, 1, 1, 1, 0.537037, 0.629630, 0.629630, 0.537037, 0.5, 0.5]
AT_RAW = [1.305556, 2, 2, 2, 1.305556, 1.444444, 1.444444, 1.305556, 1.25, 1.25, 1.5, 1.5, 1.5]
AT_CONSERVED = [0.856942, 1.312763, 1.312763, 1.312763, 0.856942, 0.948107, 0.948107, 0.856942,
                0.820477, 0.820477, 0.984572, 0.984572, 0.984572]

# A decoded completion whose detected layout is exactly TOY_LAYOUT (min_sentence_tokens = 2):
# "." alone is too short to be a sentence, so token 0 stays outside every span.
TOY_STRS = [".", " We", " add", ".", "!", " Ok", "?", ".", " So", " on", " Final", " answer", " 4", "<|endoftext|>"]
TOY_IDS = list(range(100, 113)) + [EOS]
PROMPT = [7, 8, 9]


class FakeScorer:
    """A ScoreFn: baseline −0.5, and the §10 masked scores keyed by the first masked position."""

    def __init__(self, prompt_len: int = len(PROMPT)):
        self.p = prompt_len
        self.calls: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def __call__(self, seqs, masks):
        self.calls.append((seqs, masks))
        out = []
        for s in seqs:
            masked = (s[self.p:] == EOS).nonzero().flatten().tolist()
            masked = [j for j in masked if j < 13]
            out.append(BASELINE if not masked else {1: MASKED[0], 5: MASKED[1], 8: MASKED[2]}[masked[0]])
        return torch.tensor(out)


def toy_inputs(advantages: list[float], copies: int = 1, ids=TOY_IDS, strs=TOY_STRS) -> CreditInputs:
    n = len(ids)
    return CreditInputs(
        advantages=torch.tensor([a for a in advantages for _ in range(n)], dtype=torch.float32),
        mask=torch.ones(n * len(advantages), dtype=torch.bool),
        seq_index=torch.arange(len(advantages)).repeat_interleave(n),
        token_ids=torch.tensor(ids * len(advantages)),
        extra={"token_strs": [strs] * len(advantages), "prompt_ids": [PROMPT] * len(advantages)},
    )


# ---- pure importance -> weights --------------------------------------------------------------


def test_blog_toy_weights():
    cfg = CounterfactualConfig(variant="blog", gradient_conservation=False)
    w = blog_weights(TOY_LAYOUT, 13, DROPS, cfg)
    assert w.tolist() == pytest.approx(BLOG_W, abs=TOL)
    assert (1.5 * w).tolist() == pytest.approx(BLOG_WA, abs=TOL)
    i_hat = (DROPS - DROPS.min()) / (DROPS.max() - DROPS.min())
    assert i_hat.tolist() == pytest.approx([1, 0.259259, 0], abs=TOL)


def test_aligntune_toy_weights():
    cfg = CounterfactualConfig()
    imp = aligntune_importance(TOY_LAYOUT, 13, DROPS, base=0.2)
    assert imp[:10].tolist() == pytest.approx(AT_IMPORTANCE, abs=TOL)
    assert imp[10:].tolist() == [0.0, 0.0, 0.0]
    raw = aligntune_weights(imp, TOY_LAYOUT, cfg)
    assert raw.tolist() == pytest.approx(AT_RAW, abs=TOL)
    cons = conserve(raw, 13)
    assert cons.tolist() == pytest.approx(AT_CONSERVED, abs=TOL)
    assert float(cons.mean()) == pytest.approx(1.0, abs=1e-12)


def test_aligntune_reference_switches():
    # later reference revision: drop_k / |s_k| on each span token
    imp = aligntune_importance(TOY_LAYOUT, 13, DROPS, base=0.2, per_token=True)
    raw = torch.tensor([0.2, *[0.2 + 2.5 / 3] * 3, 0.2, 0.45, 0.45, 0.2, 0.1, 0.1])
    want = 0.5 + 0.5 * (raw - raw.min()) / (raw.max() - raw.min())
    assert imp[:10].tolist() == pytest.approx(want.tolist(), abs=TOL)
    # "\boxed{"-only answers keep w_min under the reference quirk
    boxed = SpanLayout(end=13, reasoning_end=10, answer_start=10, answer_marker="\\boxed{", spans=TOY_LAYOUT.spans)
    base_imp = aligntune_importance(boxed, 13, DROPS)
    quirk = aligntune_weights(base_imp, boxed, CounterfactualConfig(boxed_answer_keeps_min_weight=True))
    assert quirk[10:].tolist() == [0.5, 0.5, 0.5]
    assert aligntune_weights(base_imp, boxed, CounterfactualConfig())[10:].tolist() == [1.5, 1.5, 1.5]
    # formatting tokens: importance × 0.1
    fmt = torch.zeros(13, dtype=torch.bool)
    fmt[2] = True
    w = aligntune_weights(base_imp, TOY_LAYOUT, CounterfactualConfig(), fmt)
    assert float(w[2]) == pytest.approx(0.5 + 1.5 * 0.1, abs=TOL) and float(w[1]) == pytest.approx(2.0, abs=TOL)


# ---- span detection ----------------------------------------------------------------------------


def test_toy_strings_give_toy_layout():
    lay = detect_spans(TOY_STRS, end=13, min_sentence_tokens=2)
    assert (lay.end, lay.reasoning_end, lay.answer_start, lay.answer_marker) == (13, 10, 10, "final answer")
    assert lay.spans == TOY_LAYOUT.spans and lay.has_answer


REALISTIC = ["Lyn", "ne", " bought", " 7", " books", " about", " cats", ".", " Each", " book", " cost", " $",
             "7", ",", " so", " she", " paid", " 7", " ×", " 7", " =", " 49", " dollars", ".", "\n\n",
             "####", " 49", "<|endoftext|>"]


def test_realistic_completion_spans():
    lay = detect_spans(REALISTIC, end=27)
    assert lay.answer_marker == "####" and lay.answer_start == 25 and lay.reasoning_end == 25
    # sentence 0–7; arithmetic "7 × 7 = 49" = tokens 17–21; the sentence 8–23 overlaps it and is dropped
    assert lay.spans == [(0, 8), (17, 22)] and lay.kinds == ["sentence", "arithmetic"]
    assert "".join(REALISTIC[17:22]) == " 7 × 7 = 49"


def test_markers_priority_and_boxed_fallback():
    toks = [" so", " ####", " 3", ".", " Final", " Answer", ":", " 3"]
    assert detect_spans(toks).answer_marker == "final answer" and detect_spans(toks).answer_start == 4
    toks = [" thus", " \\", "boxed{", "3", "}"]
    lay = detect_spans(toks)
    assert lay.answer_marker == "\\boxed{" and lay.answer_start == 1
    assert detect_spans([" no", " marker"]).answer_start is None


def test_arithmetic_operator_quirk():
    latex = ["3", " \\times", " 4", " =", " 12"]
    assert arithmetic_spans(latex, 5, 5) == [(0, 5)]
    assert arithmetic_spans(latex, 5, 5, quirk=True) == []  # the class eats "\" then expects a digit
    letters = ["2", "e", "3", "=", "5"]  # "e" is in the accidental class
    assert arithmetic_spans(letters, 5, 5) == []
    assert arithmetic_spans(letters, 5, 5, quirk=True) == [(0, 5)]
    chain = ["12", " +", " 24", " +", " 72", " =", " 108", " and", " 1.5", "/", "3", "=", "0.5"]
    assert arithmetic_spans(chain, len(chain), 5) == [(0, 7), (8, 13)]
    assert arithmetic_spans(chain, len(chain), 1) == [(0, 7)]  # at most max_spans


def test_sentence_rules():
    # "\n\n" inside a token, two "\n" tokens, LaTeX filter (> 30% backslashes), min length
    toks = ["a", " b", " c", " d", " e\n\n", "\\", "\\", "\\", "x", ".", "f", " g", " h", " i", "\n", "\n",
            "j", " k"]
    assert sentence_spans(toks, len(toks), 10, min_tokens=5) == [(0, 5), (10, 15)]
    assert sentence_spans(toks, len(toks), 1, min_tokens=5) == [(0, 5)]  # capped: no trailing tail
    long = [" w"] * 60 + ["."]
    lay = detect_spans(long + [" Final", " answer", " 1"])
    assert lay.spans == []  # 61-token sentence exceeds max_span_tokens = 50


# ---- the TokenCredit: ScoreFn batching and the batch-level switches ----------------------------


@pytest.mark.parametrize("variant", ["aligntune", "blog"])
def test_assign_end_to_end_on_toy(variant):
    scorer = FakeScorer()
    cfg = CounterfactualConfig(variant=variant, min_sentence_tokens=2, dedupe=False,
                               gradient_conservation=variant == "aligntune")
    inputs = toy_inputs([1.5, -0.5])
    inputs.extra["score_fn"] = scorer
    out = CounterfactualCredit(cfg).assign(inputs)
    assert out.target == "loss_weight"
    want = AT_CONSERVED if variant == "aligntune" else BLOG_W
    for r in range(2):
        w = out.values[14 * r: 14 * (r + 1)]
        assert w[:13].tolist() == pytest.approx(want, abs=1e-5)
        assert float(w[13]) == 1.0  # EOS / padding
    assert (1.5 * out.values[:13].double()).tolist() == pytest.approx(
        [1.5 * v for v in want], abs=1e-5)
    # one ScoreFn call per completion with the baseline + 3 masked copies, prompt prepended
    assert len(scorer.calls) == 2
    seqs, masks = scorer.calls[0]
    assert len(seqs) == 4 and all(s[:3].tolist() == PROMPT for s in seqs)
    assert seqs[0][3:].tolist() == TOY_IDS
    assert seqs[1][3:][1:4].tolist() == [EOS] * 3 and seqs[1][3:][4] == TOY_IDS[4]
    assert masks[0].nonzero().flatten().tolist() == [3 + 11, 3 + 12]  # answer tokens after the marker
    assert out.metrics["cf/forwards"] == 8 and out.metrics["cf/distractor_spans"] == 2


def test_skip_equal_advantages_and_zero_advantage():
    def boom(seqs, masks):
        raise AssertionError("no forwards expected")

    inputs = toy_inputs([0.7, 0.7])
    inputs.extra["score_fn"] = boom
    credit = CounterfactualCredit(CounterfactualConfig(min_sentence_tokens=2))
    out = credit.assign(inputs)
    assert out.metrics["cf/skipped_batch"] == 1 and bool((out.values == 1).all())
    inputs = toy_inputs([0.0, 0.0, 1.0])
    scorer = FakeScorer()
    inputs.extra["score_fn"] = scorer
    out = credit.assign(inputs)
    assert bool((out.values[:28] == 1).all()) and len(scorer.calls) == 1
    assert out.values[28:41].tolist() == pytest.approx(AT_CONSERVED, abs=1e-5)


def test_duplicates_served_from_cache():
    scorer = FakeScorer()
    inputs = toy_inputs([1.0, 1.0, -2.0])
    inputs.extra["score_fn"] = scorer
    out = CounterfactualCredit(CounterfactualConfig(min_sentence_tokens=2)).assign(inputs)
    assert len(scorer.calls) == 1 and out.metrics["cf/cache_hits"] == 2
    assert torch.equal(out.values[:14], out.values[14:28]) and torch.equal(out.values[:14], out.values[28:])


def test_no_answer_marker_means_uniform_weights():
    strs = TOY_STRS[:10] + [" and", " more", " text", "<|endoftext|>"]
    inputs = toy_inputs([1.0, -1.0], strs=strs)
    inputs.extra["score_fn"] = FakeScorer()
    out = CounterfactualCredit(CounterfactualConfig(min_sentence_tokens=2, dedupe=False)).assign(inputs)
    assert out.values.tolist() == pytest.approx([1.0] * 28, abs=1e-6)
    assert out.metrics["cf/no_answer"] == 2 and out.metrics["cf/forwards"] == 0


def test_ablation_modes():
    inputs = toy_inputs([1.0, -1.0])
    inputs.extra["score_fn"] = FakeScorer()
    inv = CounterfactualCredit(CounterfactualConfig(mode="inverted", min_sentence_tokens=2,
                                                    gradient_conservation=False)).assign(inputs)
    # importance flipped within [0, 1]: the most important span (s1) now gets w_min
    w = inv.values[:14].double()
    assert w[1:4].tolist() == pytest.approx([0.5] * 3, abs=1e-6)
    assert w[8:10].tolist() == pytest.approx([0.5 + 1.5 * 0.5] * 2, abs=1e-6)
    assert w[10:13].tolist() == pytest.approx([1.5] * 3, abs=1e-6)

    def boom(seqs, masks):
        raise AssertionError("random mode needs no forwards")

    inputs.extra["score_fn"] = boom
    r1 = CounterfactualCredit(CounterfactualConfig(mode="random", seed=3)).assign(inputs).values
    r2 = CounterfactualCredit(CounterfactualConfig(mode="random", seed=3)).assign(inputs).values
    assert torch.equal(r1, r2)
    assert float(r1[:13].double().mean()) == pytest.approx(1.0, abs=1e-6)  # conservation on


def test_config_validation():
    with pytest.raises(ConfigError, match="w_max"):
        validate(CounterfactualConfig(w_max=0.4))
    with pytest.raises(ConfigError, match="variant"):
        validate(CounterfactualConfig(variant="paper"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_spans"):
        validate(CounterfactualConfig(max_spans=0))
    cfg = CounterfactualConfig()
    assert (cfg.variant, cfg.w_min, cfg.w_max, cfg.answer_weight, cfg.max_spans) == ("aligntune", 0.5, 2.0, 1.5, 10)
