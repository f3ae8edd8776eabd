"""The ``credit`` section: which token-credit methods run, in the composition order of baselines.md §12.

Several methods may be combined (e.g. ``[lowprob, delta]``); each has its own sub-config, living in the
method's file, under the name the method is registered with (``credit.<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from delta_megatron.credit.base import CREDIT_METHODS
from delta_megatron.credit.counterfactual import CounterfactualConfig
from delta_megatron.credit.delta import DeltaConfig
from delta_megatron.credit.forking import ForkingConfig
from delta_megatron.credit.ktae import KTAEConfig
from delta_megatron.credit.lowprob import LowProbConfig
from delta_megatron.utils.configs import Section, fail, option


@dataclass
class CreditConfig(Section):
    methods: list[str] = option(doc="token-credit methods in composition order; [] = plain DAPO/GRPO credit",
                                default_factory=list)
    delta: DeltaConfig = option(doc="DelTA", default_factory=DeltaConfig)
    ktae: KTAEConfig = option(doc="KTAE key-token advantages", default_factory=KTAEConfig)
    lowprob: LowProbConfig = option(doc="low-probability token re-weighting", default_factory=LowProbConfig)
    forking: ForkingConfig = option(doc="Forking Tokens (top-entropy tokens only)",
                                    default_factory=ForkingConfig)
    counterfactual: CounterfactualConfig = option(doc="counterfactual span importance",
                                                  default_factory=CounterfactualConfig)

    def validate(self) -> None:
        for i, name in enumerate(self.methods):
            if name not in CREDIT_METHODS:
                fail(f"methods[{i}]", name, CREDIT_METHODS.unknown(name))
        if len(set(self.methods)) != len(self.methods):
            fail("methods", self.methods, "each method at most once")
        per_microbatch = [n for n in self.methods if getattr(CREDIT_METHODS.get(n), "per_microbatch", False)]
        if len(per_microbatch) > 1:
            fail("methods", self.methods, f"at most one per-micro-batch selector, got {per_microbatch}")
