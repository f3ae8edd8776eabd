"""The ``algo`` section: advantage estimator, policy loss, aggregation, KL, reward shaping, filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from delta_megatron.algo.advantages import ADVANTAGE_ESTIMATORS
from delta_megatron.algo.dynamic_sampling import DynamicSamplingConfig
from delta_megatron.algo.fipo import FIPOConfig
from delta_megatron.algo.gspo import GSPOConfig
from delta_megatron.algo.loss_api import POLICY_LOSSES
from delta_megatron.algo.overlong import OverlongConfig
from delta_megatron.algo.rollout_correction import ROLLOUT_CORRECTIONS, MismatchConfig
from delta_megatron.algo.sapo import SAPOConfig
from delta_megatron.utils.configs import check_range, fail, option


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"  # a registered estimator: grpo, drgrpo, rloo
    std: Literal["unbiased", "population"] = "unbiased"
    eps: float = 1e-6
    norm_by_std: bool | None = None  # default: True for grpo, False for drgrpo/rloo

    def validate(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            fail("estimator", self.estimator, ADVANTAGE_ESTIMATORS.unknown(self.estimator))
        check_range("eps", self.eps, 0, None)


@dataclass
class LossConfig:
    name: str = "ppo"  # a registered policy loss: ppo, gspo, sapo, fipo
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: float | None = 10.0  # null disables the dual clip
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    fipo: FIPOConfig = field(default_factory=FIPOConfig)

    def validate(self) -> None:
        if self.name not in POLICY_LOSSES:
            fail("name", self.name, POLICY_LOSSES.unknown(self.name))
        check_range("clip_low", self.clip_low, 0, 1, hi_open=True)
        check_range("clip_high", self.clip_high, 0, None)
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            fail("dual_clip_c", self.dual_clip_c, "must be > 1 (or null to disable)")
        if self.name == "fipo" and self.dual_clip_c is None:
            fail("dual_clip_c", None, "FIPO needs the dual-clip threshold c (its mask uses ln c)")


@dataclass
class KLConfig:
    estimator: Literal["none", "k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"] = "none"
    coef: float = 0.001
    # The reference is the initial policy; the actor keeps a copy of its weights (in host memory
    # when True, swapped in for the reference pass; on the device when False: faster, +1× weights).
    reference_offload: bool = True

    def validate(self) -> None:
        check_range("coef", self.coef, 0, None)


@dataclass
class AlgoConfig:
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # auto: token-mean for ppo/fipo, seq-mean-token-mean for gspo/sapo (what verl enforces)
    aggregation: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "auto"
    loss_const: float | None = None  # Dr.GRPO L_const; default: rollout.max_new_tokens
    const_times_seqs: bool = True  # Dr.GRPO normaliser B·L_const (TRL, spec toy) vs L_const (verl)
    kl: KLConfig = field(default_factory=KLConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    rollout_correction: str = option(
        "none", "train/inference mismatch correction from the engine's log-probs: none, tis, icepop, "
        "seq-mask-tis (docs/methods/fidelity.md §5)")
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)  # the correction's bounds

    @property
    def resolved_aggregation(self) -> str:
        if self.aggregation != "auto":
            return self.aggregation
        return "seq-mean-token-mean" if self.loss.name in ("gspo", "sapo") else "token-mean"

    @property
    def norm_by_std(self) -> bool:
        if self.advantage.norm_by_std is not None:
            return self.advantage.norm_by_std
        return self.advantage.estimator == "grpo"

    def validate(self) -> None:
        if self.loss_const is not None and self.loss_const <= 0:
            fail("loss_const", self.loss_const, "must be > 0")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            fail("rollout_correction", self.rollout_correction,
                 ROLLOUT_CORRECTIONS.unknown(self.rollout_correction))
        if self.loss.name == "fipo" and self.loss.fipo.normalizer == "kept" and self.kl.estimator != "none":
            fail("loss.fipo.normalizer", "kept", "the kept-token normaliser is applied as one gradient scale "
                 "after the backward, which would rescale the KL loss too (the reference divides the KL "
                 "by all tokens); with algo.kl.estimator set use 'all'")
