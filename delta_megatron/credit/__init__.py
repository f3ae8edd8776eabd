"""Token credit assignment: DelTA, KTAE, low-probability re-weighting, Forking Tokens, counterfactual
spans — each registers itself (``credit.base.CREDIT_METHODS``) in its own module; importing them here,
in this order, fills the registry before any config is validated and fixes the order errors list them in.
"""

from delta_megatron.credit import delta, ktae, lowprob, forking, counterfactual  # noqa: F401, I001 (registration order)
