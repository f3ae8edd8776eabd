"""RLVR objectives: advantage estimators, policy losses, aggregation, KL, shaping, filters.

Each policy loss registers itself in its own module; importing them here, in this order, fills the
registry before any config is validated and fixes the order error messages list them in.
"""

from delta_megatron.algo import ppo_clip, gspo, sapo, fipo  # noqa: F401, I001 (registration order)
from delta_megatron.algo.advantages import ADVANTAGE_ESTIMATORS
from delta_megatron.algo.aggregation import LossNormalizer, aggregation_weights, normalizer_from_batch
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.algo.policy_loss import PolicyLossInputs, policy_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "AlgoConfig", "LossNormalizer", "PolicyLossInputs",
           "aggregation_weights", "normalizer_from_batch", "policy_loss", "compute_advantages"]


def compute_advantages(cfg: AlgoConfig, rewards, group_ids):
    """Per-response advantages from the configured estimator."""
    fn = ADVANTAGE_ESTIMATORS.get(cfg.advantage.estimator)
    return fn(rewards, group_ids, eps=cfg.advantage.eps, std=cfg.advantage.std,
              norm_by_std=cfg.norm_by_std)
