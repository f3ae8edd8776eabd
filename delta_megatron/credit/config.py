"""The ``credit`` section: which token-credit methods run, in the composition order of baselines.md §12.

Several methods may be combined (e.g. ``[lowprob, delta]``); each has its own sub-config, living in the
method's file, under the name the method is registered with (``credit.<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delta_megatron.credit.base import CREDIT_METHODS
from delta_megatron.credit.counterfactual import CounterfactualConfig
from delta_megatron.credit.delta import DeltaConfig
from delta_megatron.credit.forking import ForkingConfig
from delta_megatron.credit.ktae import KTAEConfig
from delta_megatron.credit.lowprob import LowProbConfig
from delta_megatron.utils.configs import fail


@dataclass
class CreditConfig:
    methods: list[str] = field(default_factory=list)  # [] = plain DAPO/GRPO token credit
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    ktae: KTAEConfig = field(default_factory=KTAEConfig)
    lowprob: LowProbConfig = field(default_factory=LowProbConfig)
    forking: ForkingConfig = field(default_factory=ForkingConfig)
    counterfactual: CounterfactualConfig = field(default_factory=CounterfactualConfig)

    def validate(self) -> None:
        for i, name in enumerate(self.methods):
            if name not in CREDIT_METHODS:
                fail(f"methods[{i}]", name, CREDIT_METHODS.unknown(name))
        if len(set(self.methods)) != len(self.methods):
            fail("methods", self.methods, "each method at most once")
        per_microbatch = [n for n in self.methods if getattr(CREDIT_METHODS.get(n), "per_microbatch", False)]
        if len(per_microbatch) > 1:
            fail("methods", self.methods, f"at most one per-micro-batch selector, got {per_microbatch}")
