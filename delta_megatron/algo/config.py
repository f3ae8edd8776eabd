"""The ``algo`` section: advantage estimator, policy loss, aggregation, KL, reward shaping, filters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.algo.advantages import ADVANTAGE_ESTIMATORS
from delta_megatron.algo.dynamic_sampling import DynamicSamplingConfig
from delta_megatron.algo.fipo import FIPOConfig
from delta_megatron.algo.gspo import GSPOConfig
from delta_megatron.algo.loss_api import POLICY_LOSSES
from delta_megatron.algo.overlong import OverlongConfig
from delta_megatron.algo.rollout_correction import ROLLOUT_CORRECTIONS, MismatchConfig
from delta_megatron.algo.sapo import SAPOConfig
from delta_megatron.utils.configs import Section, fail, option


@dataclass
class AdvantageConfig(Section):
    estimator: str = option("grpo", "a registered advantage estimator: grpo, drgrpo, rloo")
    std: Literal["unbiased", "population"] = option("unbiased", "group std estimator of GRPO's normaliser")
    eps: float = option(1e-6, "added to the group std before dividing", ge=0)
    norm_by_std: bool | None = option(None, "divide by the group std; null = true for grpo only")

    def validate(self) -> None:
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            fail("estimator", self.estimator, ADVANTAGE_ESTIMATORS.unknown(self.estimator))


@dataclass
class LossConfig(Section):
    name: str = option("ppo", "a registered policy loss: ppo, gspo, sapo, fipo")
    clip_low: float = option(0.2, "PPO clip ε_low (ratio >= 1 - ε_low)", ge=0, lt=1)
    clip_high: float = option(0.28, "PPO clip ε_high (ratio <= 1 + ε_high; clip-higher)", ge=0)
    dual_clip_c: float | None = option(10.0, "dual-clip threshold c for negative advantages; null = off",
                                       gt=1)
    gspo: GSPOConfig = option(doc="GSPO's sequence-ratio clip", default_factory=GSPOConfig)
    sapo: SAPOConfig = option(doc="SAPO's gate temperatures", default_factory=SAPOConfig)
    fipo: FIPOConfig = option(doc="FIPO's future-KL weighting", default_factory=FIPOConfig)

    def validate(self) -> None:
        if self.name not in POLICY_LOSSES:
            fail("name", self.name, POLICY_LOSSES.unknown(self.name))
        if self.name == "fipo" and self.dual_clip_c is None:
            fail("dual_clip_c", None, "FIPO needs the dual-clip threshold c (its mask uses ln c)")


@dataclass
class KLConfig(Section):
    estimator: Literal["none", "k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"] = option(
        "none", "KL-to-reference estimator in the loss; none = no KL term")
    coef: float = option(0.001, "KL loss coefficient", ge=0)
    reference_offload: bool = option(True, "keep the reference weights in host memory (false: on the "
                                           "device, faster, +1x weights)")


@dataclass
class AlgoConfig(Section):
    advantage: AdvantageConfig = option(doc="advantage estimator", default_factory=AdvantageConfig)
    loss: LossConfig = option(doc="policy loss", default_factory=LossConfig)
    aggregation: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = option(
        "auto", "loss aggregation; auto: token-mean for ppo/fipo, seq-mean-token-mean for gspo/sapo")
    loss_const: float | None = option(None, "Dr.GRPO L_const; null = rollout.max_new_tokens", gt=0)
    const_times_seqs: bool = option(True, "Dr.GRPO normaliser B*L_const (TRL, spec toy) instead of "
                                          "L_const (verl)")
    kl: KLConfig = option(doc="KL to the initial policy", default_factory=KLConfig)
    overlong: OverlongConfig = option(doc="DAPO soft overlong punishment", default_factory=OverlongConfig)
    dynamic_sampling: DynamicSamplingConfig = option(doc="DAPO dynamic sampling group filter",
                                                     default_factory=DynamicSamplingConfig)
    rollout_correction: str = option(
        "none", "train/inference mismatch correction from the engine's log-probs: none, tis, icepop, "
        "seq-mask-tis (docs/methods/fidelity.md §5)")
    mismatch: MismatchConfig = option(doc="the rollout correction's bounds", default_factory=MismatchConfig)

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
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            fail("rollout_correction", self.rollout_correction,
                 ROLLOUT_CORRECTIONS.unknown(self.rollout_correction))
        if self.loss.name == "fipo" and self.loss.fipo.normalizer == "kept" and self.kl.estimator != "none":
            fail("loss.fipo.normalizer", "kept", "the kept-token normaliser is applied as one gradient scale "
                 "after the backward, which would rescale the KL loss too (the reference divides the KL "
                 "by all tokens); with algo.kl.estimator set use 'all'")
