"""RLVR objectives: advantage estimators, policy losses, aggregation, KL, shaping, filters."""

from delta_megatron.algo.advantages import ADVANTAGE_ESTIMATORS
from delta_megatron.algo.aggregation import LossNormalizer, aggregation_weights, normalizer_from_batch
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.algo.policy_loss import PolicyLossInputs, policy_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "AlgoConfig", "LossNormalizer", "PolicyLossInputs",
           "aggregation_weights", "normalizer_from_batch", "policy_loss", "compute_advantages"]


def compute_advantages(cfg: AlgoConfig, rewards, group_ids):
    """Per-response advantages from the configured estimator."""
    fn = ADVANTAGE_ESTIMATORS[cfg.advantage.estimator]
    return fn(rewards, group_ids, eps=cfg.advantage.eps, std=cfg.advantage.std,
              norm_by_std=cfg.norm_by_std)
