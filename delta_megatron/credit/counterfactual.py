"""Counterfactual span importance weighting (Khandoga et al., baselines.md §10).

For each reasoning span s_k of a completion (arithmetic chains and sentences, see ``spans.py``), the
span's tokens are overwritten with the pad id and the completion is re-scored: the drop of the final
answer's log-probability, I(s_k) = log P(a | x, r) − log P(a | x, r∖s_k), says how much the answer
relied on that span. Spans the answer relies on get larger per-token loss weights (target
``loss_weight``); the advantage is unchanged. K+1 no-grad forwards per completion (baseline + one per
span) run through a ``ScoreFn`` supplied by the actor, one call per completion with all its copies.

Two ways to turn importance into weights:

- ``blog`` (paper/blog): Î = min-max of I over the completion's spans, w = w_min + Î(w_max − w_min)
  inside spans, 1 outside, ``answer_weight`` on the answer;
- ``aligntune`` (reference code, default): importance 0.2 on reasoning tokens plus drop_k on span
  tokens, min-max over the reasoning region to [0.5, 1], 0 after it, × 0.1 on formatting tokens;
  w = w_min + (boost − w_min)·importance, answer region (marker to end) = answer_weight, padding = 1.

Gradient conservation (on by default) rescales the non-padding weights of each completion to mean 1.
Ablations (no spec detail; the reference's behaviour): ``random`` draws importance U(0,1) per token
(aligntune) or Î per span (blog) with no forwards; ``inverted`` reflects the importance within its
[min, max] over the completion (aligntune) or negates I (blog).
Reference quirks kept as switches, off by default: ``drop_per_token`` (a later reference revision adds
drop_k / |s_k| instead of drop_k; the §10 toy numbers use drop_k) and
``boxed_answer_keeps_min_weight`` (the weight step only recognises "final answer"/"####", so
"\\boxed{"-only answers keep weight w_min).

Inputs (``CreditInputs.extra``): ``score_fn`` (ScoreFn, required unless mode is random),
``prompt_ids`` (per response id, prepended to every scored copy; optional), ``token_strs`` (per
response id: the decoded string of each response token; optional if the constructor got ``decode``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from delta_megatron.credit.base import (
    CREDIT_METHODS,
    CreditContext,
    CreditInputs,
    CreditNeeds,
    CreditOutput,
    CreditTarget,
    ScoreFn,
)
from delta_megatron.credit.spans import SpanLayout, detect_spans, formatting_mask
from delta_megatron.utils.configs import Section, fail, option, validate

EXTRA_SCORE_FN = "score_fn"
EXTRA_PROMPT_IDS = "prompt_ids"
EXTRA_TOKEN_STRS = "token_strs"


@dataclass
class CounterfactualConfig(Section):
    """§10 defaults (aligntune): w_min 0.5, boost 2.0, answer 1.5, ≤ 10 spans, conservation on."""

    variant: Literal["blog", "aligntune"] = option("aligntune", "importance formula: blog or aligntune")
    mode: Literal["counterfactual", "random", "inverted"] = option(
        "counterfactual", "span importance from masking (counterfactual) or the random/inverted controls")
    w_min: float = option(0.5, "min_weight: weight of the least important tokens", gt=0)
    w_max: float = option(2.0, "boost: weight of the most important tokens; >= w_min", gt=0)
    answer_weight: float = option(1.5, "weight of the answer tokens", gt=0)
    base_importance: float = option(0.2, "aligntune: importance of non-span reasoning tokens", ge=0)
    max_spans: int = option(10, "spans masked per completion", ge=1)
    min_sentence_tokens: int = option(5, "shortest sentence that forms a span", ge=1)
    max_span_tokens: int = option(50, "longest span", ge=1)
    latex_backslash_max: float = option(0.3, "spans with a larger backslash fraction count as LaTeX "
                                             "formatting", ge=0, le=1)
    formatting_factor: float = option(0.1, "importance factor of formatting spans", ge=0, le=1)
    gradient_conservation: bool = option(True, "rescale weights so their mean is 1 per completion")
    skip_equal_advantages: bool = option(True, "all advantages equal (std < equal_adv_std): weights 1")
    equal_adv_std: float = option(1e-6, "advantage std below which the group counts as equal", ge=0)
    skip_zero_advantage: bool = option(True, "A_i = 0: the weights cannot matter, spend no forwards")
    dedupe: bool = option(True, "hash cache for duplicate completions (per call)")
    arithmetic_quirk: bool = option(False, "reproduce the reference's operator character class")
    drop_per_token: bool = option(False, "aligntune: add drop_k/|s_k| (later reference) instead of drop_k")
    boxed_answer_keeps_min_weight: bool = option(False, "reference quirk, see the module docstring")
    mask_token_id: int = option(151643, "pad id written over masked spans (Qwen <|endoftext|>)", ge=0)
    stop_ids: list[int] = option(doc="pad/EOS ids that end the reasoning region", ge=0,
                                 default_factory=lambda: [151643, 151645])
    seed: int = option(0, "seed of the random mode", ge=0)

    def validate(self) -> None:
        if self.w_max < self.w_min:
            fail("w_max", self.w_max, f"must be >= w_min ({self.w_min})")


# ----------------------------------------------------------------------------------------------
# importance -> weights (pure, float64, one completion of length L)


def aligntune_importance(layout: SpanLayout, length: int, drops: torch.Tensor, base: float = 0.2,
                         per_token: bool = False) -> torch.Tensor:
    """Reference importance [L]: base + drop_k on span tokens, min-max over the reasoning region to
    [0.5, 1] (all 0.5 when flat), 0 from the reasoning end on."""
    imp = torch.zeros(length, dtype=torch.float64)
    r = layout.reasoning_end
    imp[:r] = base
    for (s, e), drop in zip(layout.spans, drops.tolist()):
        imp[s:e] += drop / (e - s) if per_token else drop
    if r > 0:
        region = imp[:r]
        lo, hi = region.min(), region.max()
        imp[:r] = 0.5 + 0.5 * (region - lo) / (hi - lo) if hi > lo else 0.5
    return imp


def aligntune_weights(importance: torch.Tensor, layout: SpanLayout, cfg: CounterfactualConfig,
                      formatting: torch.Tensor | None = None) -> torch.Tensor:
    """w = w_min + (boost − w_min)·importance; answer region = answer_weight; padding = 1. [L]"""
    imp = importance.clone()
    if formatting is not None:
        imp = torch.where(formatting & (imp > 0), imp * cfg.formatting_factor, imp)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * imp
    if layout.answer_start is not None and not (
            cfg.boxed_answer_keeps_min_weight and layout.answer_marker not in ("final answer", "####")):
        w[layout.answer_start: layout.end] = cfg.answer_weight
    w[layout.end:] = 1.0
    return w


def blog_weights(layout: SpanLayout, length: int, importance: torch.Tensor, cfg: CounterfactualConfig
                 ) -> torch.Tensor:
    """Paper/blog weights [L]: Î = min-max of I over spans; w = w_min + Î(w_max − w_min) in spans,
    1 elsewhere, answer_weight on the answer. All spans equal (or one span): no information, w = 1."""
    w = torch.ones(length, dtype=torch.float64)
    if layout.spans:
        lo, hi = importance.min(), importance.max()
        for (s, e), i_k in zip(layout.spans, importance.tolist()):
            w[s:e] = cfg.w_min + (i_k - lo) / (hi - lo) * (cfg.w_max - cfg.w_min) if hi > lo else 1.0
    if layout.answer_start is not None:
        w[layout.answer_start: layout.end] = cfg.answer_weight
    return w


def conserve(weights: torch.Tensor, end: int) -> torch.Tensor:
    """Gradient conservation: rescale weights[:end] (non-padding) to mean 1."""
    w = weights.clone()
    total = w[:end].sum()
    if end > 0 and total > 0:
        w[:end] *= end / total
    return w


# ----------------------------------------------------------------------------------------------


def tokenizer_decoder(tokenizer: Any) -> Callable[[list[int]], list[str]]:
    """Per-token strings as the reference builds them: ``tokenizer.decode([id])`` for each id."""
    return lambda ids: [tokenizer.decode([i]) for i in ids]


@CREDIT_METHODS.register("counterfactual")
class CounterfactualCredit:
    """TokenCredit for §10: per-token loss weights from counterfactual span masking."""

    target: CreditTarget = "loss_weight"
    per_microbatch = False

    def __init__(self, cfg: CounterfactualConfig | None = None,
                 decode: Callable[[list[int]], list[str]] | None = None):
        self.cfg = cfg or CounterfactualConfig()
        validate(self.cfg, "credit.counterfactual")
        self.decode = decode
        self.needs = CreditNeeds(extra_forward=True)
        self._rng = torch.Generator().manual_seed(self.cfg.seed)

    @classmethod
    def build(cls, cfg: CounterfactualConfig, context: CreditContext) -> CounterfactualCredit:
        return cls(cfg, decode=context.decode)

    # -- one completion --------------------------------------------------------------------------

    def layout(self, ids: list[int], token_strs: list[str]) -> SpanLayout:
        """Spans and answer marker of one completion; ``end`` is the first pad/EOS token."""
        stops = [j for j, t in enumerate(ids) if t in set(self.cfg.stop_ids)]
        c = self.cfg
        return detect_spans(token_strs, stops[0] if stops else len(ids), max_spans=c.max_spans,
                            min_sentence_tokens=c.min_sentence_tokens, max_span_tokens=c.max_span_tokens,
                            latex_max=c.latex_backslash_max, arithmetic_quirk=c.arithmetic_quirk)

    def span_drops(self, ids: torch.Tensor, layout: SpanLayout, prompt: torch.Tensor | None,
                   score_fn: ScoreFn) -> torch.Tensor:
        """drop_k = score(baseline) − score(s_k masked), one ScoreFn call with K+1 sequences. [K]

        The score is Σ log p of the answer tokens after the marker (marker excluded, up to ``end``)."""
        prompt = ids.new_zeros(0) if prompt is None else prompt.to(ids)
        p = prompt.numel()
        score_mask = torch.zeros(p + ids.numel(), dtype=torch.bool)
        score_mask[p + layout.answer_start + 1: p + layout.end] = True
        seqs = [torch.cat([prompt, ids])]
        for s, e in layout.spans:
            masked = ids.clone()
            masked[s:e] = self.cfg.mask_token_id
            seqs.append(torch.cat([prompt, masked]))
        scores = torch.as_tensor(score_fn(seqs, [score_mask] * len(seqs)), dtype=torch.float64).flatten()
        if scores.numel() != len(seqs):
            raise ValueError(f"score_fn returned {scores.numel()} scores for {len(seqs)} sequences")
        return scores[0] - scores[1:]

    def completion_weights(self, ids: torch.Tensor, token_strs: list[str], prompt: torch.Tensor | None,
                           score_fn: ScoreFn | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weights [L] float64 of one completion and a few counts for metrics."""
        c = self.cfg
        length = ids.numel()
        layout = self.layout(ids.tolist(), token_strs)
        k = len(layout.spans)
        stats = {"spans": float(k), "forwards": 0.0, "no_answer": float(not layout.has_answer),
                 "distractors": 0.0}
        drops = torch.zeros(k, dtype=torch.float64)
        if c.mode != "random" and k > 0 and layout.has_answer:
            if score_fn is None:
                raise ValueError(f"counterfactual weights need extra[{EXTRA_SCORE_FN!r}] (a ScoreFn)")
            drops = self.span_drops(ids, layout, prompt, score_fn)
            stats["forwards"] = float(k + 1)
            stats["distractors"] = float((drops < 0).sum())

        if c.variant == "blog":
            if c.mode == "random":
                drops = torch.rand(k, generator=self._rng, dtype=torch.float64)
            elif c.mode == "inverted":
                drops = -drops
            scored = layout.has_answer or c.mode == "random"
            w = blog_weights(layout, length, drops, c) if scored else torch.ones(length, dtype=torch.float64)
        else:
            if c.mode == "random":  # reference: uniform importance per token, no forwards
                imp = torch.rand(length, generator=self._rng, dtype=torch.float64)
            elif layout.has_answer:
                imp = aligntune_importance(layout, length, drops, c.base_importance, c.drop_per_token)
                if c.mode == "inverted":  # reference: flip within [min, max] over the completion
                    imp = imp.min() + imp.max() - imp
            else:
                imp = torch.zeros(length, dtype=torch.float64)  # nothing to score: importance 0
            fmt = torch.tensor(formatting_mask(token_strs), dtype=torch.bool) if token_strs else None
            w = aligntune_weights(imp, layout, c, fmt)
        if c.gradient_conservation:
            w = conserve(w, layout.end)
        return w, stats

    # -- the batch -------------------------------------------------------------------------------

    def _token_strs(self, inputs: CreditInputs, seq: int, ids: list[int]) -> list[str]:
        given = inputs.extra.get(EXTRA_TOKEN_STRS)
        if given is not None:
            strs = list(given[seq])
            if len(strs) != len(ids):
                raise ValueError(f"token_strs[{seq}] has {len(strs)} entries for {len(ids)} tokens")
            return strs
        if self.decode is None:
            raise ValueError(f"counterfactual spans need extra[{EXTRA_TOKEN_STRS!r}] or a decode function")
        return self.decode(ids)

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput:
        """Per-token weights for the local completions (each completion must be whole on this rank;
        ``group`` is unused). Invalid tokens and skipped completions get weight 1."""
        if inputs.token_ids is None:
            raise ValueError("counterfactual weighting needs token_ids")
        c = self.cfg
        weights = torch.ones(inputs.mask.shape, dtype=torch.float32)
        valid = inputs.mask.bool()
        metrics = {"cf/skipped_batch": 0.0, "cf/completions": 0.0, "cf/cache_hits": 0.0, "cf/forwards": 0.0,
                   "cf/spans": 0.0, "cf/no_answer": 0.0, "cf/distractor_spans": 0.0}
        # token positions of each response, in order, by one stable sort: {seq id: [L_i]}
        valid_pos = valid.nonzero().flatten()
        order = torch.argsort(inputs.seq_index[valid_pos], stable=True)
        seq_ids, counts = torch.unique_consecutive(inputs.seq_index[valid_pos][order], return_counts=True)
        seqs = seq_ids.tolist()
        positions = dict(zip(seqs, torch.split(valid_pos[order], counts.tolist())))
        seq_adv = torch.tensor([float(inputs.advantages[positions[s][0]]) for s in seqs], dtype=torch.float64)
        equal = seq_adv.numel() > 1 and float(seq_adv.std(unbiased=False)) < c.equal_adv_std
        if c.skip_equal_advantages and equal:
            metrics["cf/skipped_batch"] = 1.0
            return CreditOutput(target=self.target, values=weights, metrics=metrics)

        score_fn = inputs.extra.get(EXTRA_SCORE_FN)
        prompts = inputs.extra.get(EXTRA_PROMPT_IDS)
        cache: dict[str, torch.Tensor] = {}
        for s, adv in zip(seqs, seq_adv.tolist()):
            if c.skip_zero_advantage and adv == 0.0:
                continue
            pos = positions[s]
            ids = inputs.token_ids[pos].long().cpu()
            prompt = None if prompts is None else torch.as_tensor(prompts[s]).long().cpu()
            key = ""
            if c.dedupe:
                blob = (b"" if prompt is None else prompt.numpy().tobytes()) + b"|" + ids.numpy().tobytes()
                key = hashlib.sha256(blob).hexdigest()
                if key in cache:
                    weights[pos] = cache[key].to(weights.device)
                    metrics["cf/cache_hits"] += 1
                    continue
            strs = self._token_strs(inputs, s, ids.tolist())
            w, stats = self.completion_weights(ids, strs, prompt, score_fn)
            w = w.float()
            weights[pos] = w.to(weights.device)
            if c.dedupe:
                cache[key] = w
            metrics["cf/completions"] += 1
            metrics["cf/forwards"] += stats["forwards"]
            metrics["cf/spans"] += stats["spans"]
            metrics["cf/no_answer"] += stats["no_answer"]
            metrics["cf/distractor_spans"] += stats["distractors"]
        return CreditOutput(target=self.target, values=weights.to(inputs.mask.device), metrics=metrics)
