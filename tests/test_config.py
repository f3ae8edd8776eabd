"""Config loading, dotted overrides, YAML round trip, and validation that is honest: every bad setting
(issue 12's list) is rejected up front with the full field path, the value and what is allowed; Python
assignments are type-checked and unknown attributes rejected."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from delta_megatron.actor.config import ActorConfig
from delta_megatron.config import Config, ConfigError, dump_yaml, load_config
from delta_megatron.data.synthetic import ArithmeticConfig
from delta_megatron.eval.evaluate import EvalSettings
from delta_megatron.planner import Hardware, PlanOptions, load_recipe, recipe_registry
from delta_megatron.rollout.extrapolation import ExtrapolationConfig
from delta_megatron.train import parse as parse_train
from delta_megatron.utils.configs import (
    Bounds,
    Section,
    field_bounds,
    field_doc,
    option,
    validate,
    walk_fields,
)

REPO = Path(__file__).resolve().parents[1]


def roots() -> tuple[type, ...]:
    """Every config tree: the run config and the configs that are not YAML sections of it (launchers
    imported here, not at collection: tests/launch/conftest.py must set NEMORUN_HOME first)."""
    from launchers.executors import ClusterProfile

    return (Config, ActorConfig, EvalSettings, ExtrapolationConfig, ArithmeticConfig, Hardware, PlanOptions,
            ClusterProfile)


def config_classes() -> set[type]:
    found = set()
    for root in roots():
        found.add(root)
        found |= {tp for _, _, tp in walk_fields(root) if dataclasses.is_dataclass(tp)}
    return found


def test_defaults_validate_and_yaml_round_trip(tmp_path):
    cfg = load_config(overrides=["algo.loss.name=sapo", "credit.methods=[delta]", "train.lr=1e-6"])
    assert cfg.algo.loss.name == "sapo" and cfg.credit.methods == ["delta"] and cfg.train.lr == 1e-6
    path = tmp_path / "run.yaml"
    dump_yaml(cfg, path)
    again = load_config(path)
    assert again == cfg


# Issue 12 ("silently accepted", "late or unclear"): each bad setting fails in validation, before any
# work, naming the full path, the value and what is allowed.
@pytest.mark.parametrize("override,fragment", [
    ("checkpoint.keep=0", "checkpoint.keep: 0 — must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every: -1 — must be >= 0"),
    ("logging.dir=", "logging.dir: '' — a run directory (an empty path would write into the working directory)"),
    ("train.lr=nan", "train.lr: nan — must be a finite number"),
    ("reward.timeout_s=nan", "reward.timeout_s: nan — must be a finite number"),
    ("reward.timeout_s=inf", "reward.timeout_s: inf — must be a finite number"),
    ("reward.timeout_s=.inf", "reward.timeout_s: inf — must be a finite number"),
    ("rollout.temperature=nan", "rollout.temperature: nan — must be a finite number"),
    ("train.grad_clip=nan", "train.grad_clip: nan — must be a finite number"),
    ("rollout.sglang.request_timeout_s=-5", "rollout.sglang.request_timeout_s: -5.0 — must be > 0"),
    ("rollout.sglang.max_retries=-1", "rollout.sglang.max_retries: -1 — must be >= 0"),
    ("rollout.sglang.max_concurrency=0", "rollout.sglang.max_concurrency: 0 — must be >= 1"),
    ("eval.temperature=-1", "eval.temperature: -1.0 — must be >= 0"),
    ("train.min_lr=10", "train.min_lr: 10.0 — must be <= lr=0.0005"),
    ("train.lr=abc", "train.lr: 'abc' — expected a number"),
    ("algo.loss.name=reinforce", "algo.loss.name: 'reinforce' — allowed: 'ppo', 'gspo', 'sapo', 'fipo'"),
    ("logging.log_every=0", "logging.log_every: 0 — must be >= 1"),
    ("model.vocab_size=5", "model.vocab_size: 5 — must be >= 17, the size of the synthetic task's tokenizer"),
    ("eval.k=0", "eval.k: 0 — must be >= 1"),
    ("data.synthetic_digits=0", "data.synthetic_digits: 0 — must be in [1, 30]"),
    ("train.warmup_steps=61", "train.warmup_steps: 61 — must be <= steps=60"),
    ("train.stepz=3", "train.stepz: 3 — unknown key; TrainConfig accepts (closest first): steps, "),
    ("credit.forking.scope=batch", "credit.forking.scope: 'batch' — unknown key; ForkingConfig accepts"),
    ("modle.vocab_size=8", "modle: {'vocab_size': 8} — unknown key; Config accepts (closest first): model, "),
    ("train.lr.x=1", "train.lr: '1' — is a value, not a config section"),
    ("eval.max_prompts=0", "eval.max_prompts: 0 — must be >= 1"),
    ("train.adam_betas=[0.9,1.0]", "train.adam_betas[1]: 1.0 — must be in [0, 1)"),
    ("credit.ktae.ignore_ids=[1,-2]", "credit.ktae.ignore_ids[1]: -2 — must be >= 0"),
    ("data.train=synthetic:words", "data.train: 'synthetic:words' — unknown synthetic dataset"),
    ("checkpoint.resume=", "checkpoint.resume: '' — none, auto or a checkpoint path"),
    ("rollout.top_k=0", "rollout.top_k: 0 — -1 (off) or >= 1"),
    ("train.mini_batches=3", "train.mini_batches: 3 — must divide prompts_per_step=64"),
    ("algo.loss.clip_low=1.5", "algo.loss.clip_low: 1.5 — must be in [0, 1)"),
    ("model.hidden_size=abc", "model.hidden_size: 'abc' — expected an integer"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads: 3 — must divide num_attention_heads=4"),
    ("parallel.pp=3", "parallel.pp: 3 — must divide model.num_layers=4"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel: True — needs tp > 1"),
    ("credit.methods=[delta,magic]", "credit.methods[1]: 'magic' — allowed: 'delta', 'ktae'"),
    ("algo.loss.fipo.f_range=[1.1,1.2]", "algo.loss.fipo.f_range: (1.1, 1.2) — need 0 < lower <= 1 <= upper"),
    ("algo.loss.dual_clip_c=0.5", "algo.loss.dual_clip_c: 0.5 — must be > 1"),
    ("train.recompute_granularity=some", "train.recompute_granularity: 'some' — allowed: 'none', 'full'"),
    ("train.recompute_modules=[layernorm]", "train.recompute_modules: ['layernorm'] — a non-empty subset of "
                                            "core_attn, mlp"),
    ("train.recompute_num_layers=0", "train.recompute_num_layers: 0 — must be >= 1"),
])
def test_bad_values_name_field_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_recompute_layers_must_fit_a_model_chunk():
    full = ["train.recompute_granularity=full", "parallel.pp=2"]  # 4 layers: 2 per stage
    assert load_config(overrides=full + ["train.recompute_num_layers=2"]).train.recompute_overrides() == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2}
    with pytest.raises(ConfigError, match="uniform recompute needs a divisor of the 2 layers per model chunk"):
        load_config(overrides=full + ["train.recompute_num_layers=3"])
    with pytest.raises(ConfigError, match="block recompute: at most the 2 layers"):
        load_config(overrides=full + ["train.recompute_method=block", "train.recompute_num_layers=3"])
    assert load_config().train.recompute_overrides() == {}


def test_unknown_key_lists_the_valid_names_closest_first(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    names = str(err.value).split("(closest first): ")[1].split(", ")
    assert names[0] == "steps" and sorted(names) == sorted(f.name for f in dataclasses.fields(Config().train))


def test_python_assignments_are_checked_with_the_full_path():
    cfg = Config()
    with pytest.raises(ConfigError, match=r"^algo\.reward: 'dapo' — unknown key; AlgoConfig accepts"):
        cfg.algo.reward = "dapo"  # the B200 recipes' old bug: silently dropped from the YAML
    with pytest.raises(ConfigError, match=r"^train\.lr: 'abc' — expected a number"):
        cfg.train.lr = "abc"
    with pytest.raises(ConfigError, match=r"^rollout\.sglang\.max_retries: 1\.5 — expected an integer"):
        cfg.rollout.sglang.max_retries = 1.5
    with pytest.raises(ConfigError, match=r"^parallel\.fp8: 'fp4' — allowed: 'none'"):
        cfg.parallel.fp8 = "fp4"
    cfg.train.lr = 1  # an int for a float field is stored as the float
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    cfg.algo.loss.name = "reinforce"  # a registry name can only be checked against the registry
    with pytest.raises(ConfigError, match=r"^algo\.loss\.name: 'reinforce' — allowed"):
        validate(cfg)


def test_path_survives_copy_and_pickle():
    import copy
    import pickle

    for cfg in (copy.deepcopy(Config()), pickle.loads(pickle.dumps(Config()))):
        assert cfg == Config()
        with pytest.raises(ConfigError, match=r"^credit\.delta\.K: 'x' — expected an integer"):
            cfg.credit.delta.K = "x"


def test_override_accepted_anywhere_on_the_command_line():
    recipe = ["--recipe", "pipelines.tiny_arith_cpu:smoke_config"]
    for argv in (recipe + ["--resume", "auto", "train.steps=3"],
                 ["train.steps=3", *recipe, "--resume", "auto"],
                 [*recipe, "train.steps=3", "--resume", "auto", "logging.log_every=2"]):
        cfg = parse_train(argv)
        assert cfg.train.steps == 3 and cfg.checkpoint.resume == "auto", argv


def test_cp_and_fp8_without_te_rejected():
    with pytest.raises(ConfigError, match="parallel.cp: 2 — context parallelism needs the Transformer Engine"):
        load_config(overrides=["parallel.cp=2", "parallel.layer_spec=local"])
    with pytest.raises(ConfigError, match="parallel.fp8: 'delayed' — FP8 needs the Transformer Engine"):
        load_config(overrides=["parallel.fp8=delayed", "parallel.layer_spec=local"])


def test_default_config_is_the_dataclass_default():
    assert load_config() == Config()


def test_topk_proxy_k_beyond_the_vocab_rejected():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.vocab_size=20", "credit.delta.proxy=topk_hidden", "credit.delta.topk_k=32"])
    assert "credit.delta.topk_k: 32 — must be <= model.vocab_size=20" in str(err.value)
    load_config(overrides=["model.vocab_size=20", "credit.delta.proxy=topk_hidden", "credit.delta.topk_k=20"])


def test_b200_recipes_use_the_dapo_reward():
    """DAPO's +1/-1 reward (verl math_dapo), reaching the YAML every job trains with."""
    for name in recipe_registry():
        if "qwen3" not in name:
            continue
        loaded = load_recipe(name)
        for cfg in (loaded.values() if isinstance(loaded, dict) else [loaded]):
            assert (cfg.reward.kind, cfg.reward.variant) == ("math", "dapo"), name
            assert "variant: dapo" in dump_yaml(cfg)


# ------------------------------------------------------------------ every field declared honestly
def _numeric(tp) -> bool:
    args = getattr(tp, "__args__", ()) or ()
    return tp in (int, float) or any(_numeric(a) for a in args if a is not type(None) and a is not Ellipsis)


def test_every_config_class_is_a_section_with_documented_ranged_fields():
    for cls in config_classes():
        assert issubclass(cls, Section), f"{cls.__name__} must subclass utils.configs.Section"
        for f in dataclasses.fields(cls):
            assert field_doc(f), f"{cls.__name__}.{f.name}: declare it with option(default, 'meaning')"
    for root in roots():
        for path, f, tp in walk_fields(root):
            if _numeric(tp) and not dataclasses.is_dataclass(tp):
                assert field_bounds(f) is not None, f"{root.__name__}: {path} declares no range (ge/gt/le/lt)"


def test_every_dataclass_named_like_a_config_is_a_section():
    """Source scan, so a config class added later (in any module) cannot skip the base class."""
    bad = []
    suffixes = ("Config", "Settings", "Options", "Profile", "Hardware")
    for root in ("delta_megatron", "launchers", "pipelines"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ClassDef) and node.name.endswith(suffixes)):
                    continue
                decorated = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                frozen = any("frozen=True" in ast.unparse(d) for d in node.decorator_list)
                if decorated and not frozen and "Section" not in [ast.unparse(b) for b in node.bases]:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not bad, "config dataclasses that do not subclass Section:\n" + "\n".join(bad)


def test_option_bounds_and_finiteness():
    from dataclasses import dataclass

    @dataclass
    class Toy(Section):
        rate: float = option(0.5, "a rate", gt=0, le=1)
        count: int | None = option(None, "a count", ge=1)
        pair: tuple[float, float] = option((0.1, 0.2), "two numbers", ge=0)
        offset: float = option(0.0, "anything finite", unbounded=True)

    validate(Toy(rate=1.0, count=1, offset=-1e9))
    for kwargs, fragment in [({"rate": 0.0}, "rate: 0.0 — must be in (0, 1]"),
                             ({"rate": math.nan}, "rate: nan — must be a finite number"),
                             ({"count": 0}, "count: 0 — must be >= 1"),
                             ({"pair": (0.1, -0.2)}, "pair[1]: -0.2 — must be >= 0"),
                             ({"offset": math.inf}, "offset: inf — must be a finite number")]:
        with pytest.raises(ConfigError) as err:
            validate(Toy(**kwargs), "toy")
        assert f"toy.{fragment}" in str(err.value)
    assert Bounds().describe() == "any finite number" and Bounds(ge=0, lt=1).describe() == "[0, 1)"
