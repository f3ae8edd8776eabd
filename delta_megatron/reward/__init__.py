"""Verifiable rewards: answer extraction, math-verify in a killable process pool, exact match."""

from delta_megatron.reward.config import RewardConfig
from delta_megatron.reward.exact_match import ExactMatchReward, apply_variant
from delta_megatron.reward.extract import answer_line, extract_answer, last_boxed, wrap_math
from delta_megatron.reward.math_reward import MathReward, RewardFn, build_reward
from delta_megatron.reward.verifier_pool import ScoreFn, VerifierPool, VerifyStats

__all__ = [
    "RewardConfig", "ExactMatchReward", "MathReward", "RewardFn", "build_reward", "apply_variant",
    "VerifierPool", "VerifyStats", "ScoreFn", "extract_answer", "last_boxed", "answer_line", "wrap_math",
]
