"""Config loading, dotted overrides, YAML round trip, and validation messages naming field/value/allowed."""

import pytest

from delta_megatron.config import Config, ConfigError, dump_yaml, load_config


def test_defaults_validate_and_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["algo.loss.name=sapo", "credit.methods=[delta]", "train.lr=1e-6"])
    assert cfg.algo.loss.name == "sapo" and cfg.credit.methods == ["delta"] and cfg.train.lr == 1e-6
    path = tmp_path / "run.yaml"
    dump_yaml(cfg, path)
    again = load_config(path)
    assert again == cfg


@pytest.mark.parametrize("override,fragment", [
    ("algo.loss.name=reinforce", "algo.loss.name: 'reinforce' — allowed: 'ppo', 'gspo', 'sapo', 'fipo'"),
    ("train.mini_batches=3", "train.mini_batches: 3 — must divide prompts_per_step=64"),
    ("algo.loss.clip_low=1.5", "algo.loss.clip_low: 1.5 — must be in [0, 1)"),
    ("model.hidden_size=abc", "model.hidden_size: 'abc' — expected an integer"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads: 3 — must divide num_attention_heads=4"),
    ("parallel.pp=3", "parallel.pp: 3 — must divide model.num_layers=4"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel: True — needs tp > 1"),
    ("credit.methods=[delta,magic]", "credit.methods[1]: 'magic' — allowed: 'delta', 'ktae'"),
    ("algo.loss.fipo.f_range=[1.1,1.2]", "algo.loss.fipo.f_range: (1.1, 1.2) — need 0 < lower <= 1 <= upper"),
    ("model.nope=1", "model.nope: '1' — no such config field"),
    ("algo.loss.dual_clip_c=0.5", "algo.loss.dual_clip_c: 0.5 — must be > 1"),
])
def test_bad_values_name_field_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train.stepz: 3 — unknown key; TrainConfig accepts: .*steps"):
        load_config(path)


def test_cp_and_fp8_without_te_rejected():
    with pytest.raises(ConfigError, match="parallel.cp: 2 — context parallelism needs the Transformer Engine"):
        load_config(overrides=["parallel.cp=2", "parallel.layer_spec=local"])
    with pytest.raises(ConfigError, match="parallel.fp8: 'delayed' — FP8 needs the Transformer Engine"):
        load_config(overrides=["parallel.fp8=delayed", "parallel.layer_spec=local"])


def test_default_config_is_the_dataclass_default():
    assert load_config() == Config()


def test_topk_proxy_k_beyond_the_vocab_rejected():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.vocab_size=8", "credit.delta.proxy=topk_hidden", "credit.delta.topk_k=16"])
    assert "credit.delta.topk_k: 16 — must be <= model.vocab_size=8" in str(err.value)
    load_config(overrides=["model.vocab_size=8", "credit.delta.proxy=topk_hidden", "credit.delta.topk_k=8"])
