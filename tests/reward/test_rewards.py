"""Reward config, the factory, the variant mapping and the in-process exact-match reward."""

import pytest

from delta_megatron.reward import (
    ExactMatchReward,
    MathReward,
    RewardConfig,
    apply_variant,
    build_reward,
)
from delta_megatron.utils.configs import ConfigError, from_dict, validate


def test_variant_mapping():
    assert apply_variant([1.0, 0.0, 1.0], "binary") == [1.0, 0.0, 1.0]
    assert apply_variant([1.0, 0.0, 1.0], "dapo") == [1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="variant"):
        apply_variant([1.0], "ternary")


def test_exact_match_reward_default_extraction():
    r = ExactMatchReward()
    rewards, stats = r.score([("\\boxed{12}", "12"), ("Answer: 12", "12"), ("\\boxed{12.0}", "12"),
                              ("twelve", "12")])
    assert rewards == [1.0, 1.0, 0.0, 0.0]  # exact string match: 12.0 is not 12
    assert (stats.total, stats.correct, stats.no_answer, stats.errors) == (4, 2, 1, 0)
    assert r.totals.total == 4


def test_exact_match_reward_custom_extractor_and_dapo():
    def extract(text):
        if text == "boom":
            raise RuntimeError("bad extractor")
        return text.strip() or None

    r = ExactMatchReward(extract, variant="dapo")
    rewards, stats = r.score([("7", "7"), (" ", "7"), ("8", "7"), ("boom", "7")])
    assert rewards == [1.0, -1.0, -1.0, -1.0]
    assert (stats.correct, stats.no_answer, stats.errors) == (1, 1, 1)


def test_reward_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"^num_workers: 0 — must be >= 1"):
        validate(RewardConfig(num_workers=0))
    with pytest.raises(ConfigError, match=r"^timeout_s: 0\.0"):
        validate(RewardConfig(timeout_s=0.0))
    with pytest.raises(ConfigError, match=r"^max_memory_mb: 16"):
        validate(RewardConfig(max_memory_mb=16))
    with pytest.raises(ConfigError, match=r"variant"):
        from_dict(RewardConfig, {"variant": "ternary"})
    validate(RewardConfig())


def test_build_reward_resolves_auto():
    cfg = RewardConfig()
    assert cfg.resolved_kind("synthetic:arith") == "exact_match"
    assert cfg.resolved_kind("data/train/dapo_math_1k.jsonl") == "math"
    r = build_reward(cfg, "synthetic:arith", extract_fn=str.strip)
    assert isinstance(r, ExactMatchReward) and r.score([(" 5 ", "5")])[0] == [1.0]
    with build_reward(RewardConfig(kind="math", num_workers=1, variant="dapo"), "x.jsonl") as m:
        assert isinstance(m, MathReward)
        assert m.score([("\\boxed{\\frac{2}{4}}", "0.5"), ("\\boxed{2}", "0.5")])[0] == [1.0, -1.0]
