"""The synthetic addition task: exact targets per variant, extraction, rewards, determinism."""

import pytest

from delta_megatron.data import ArithmeticConfig, ArithmeticTask, load_dataset
from delta_megatron.data.synthetic import VOCAB
from delta_megatron.reward import ExactMatchReward
from delta_megatron.utils.configs import ConfigError


def task(variant="plain", **kw):
    return ArithmeticTask(ArithmeticConfig(variant=variant, **kw))


def test_vocabulary_has_17_tokens():
    assert len(VOCAB) == 17
    assert VOCAB[:3] == ("<pad>", "<bos>", "<eos>") and "".join(VOCAB[3:]) == "0123456789+=>,"


@pytest.mark.parametrize("variant, a, b, completion", [
    ("plain", 123, 989, "1112"),
    ("reversed", 123, 989, "2111"),
    ("reversed", 50, 50, "001"),
    ("scratchpad", 123, 989, "21,11,11>1112"),
    ("scratchpad", 999, 1, "01,01,01>1000"),
    ("scratchpad", 98, 9, "71,01>107"),
])
def test_completions(variant, a, b, completion):
    t = task(variant)
    assert t.prompt(a, b) == f"{a}+{b}="
    assert t.completion(a, b) == completion
    assert t.extract(completion + "<eos><pad><pad>") == str(a + b)
    assert t.reward(completion, str(a + b)) == 1.0


@pytest.mark.parametrize("variant, completion, expected", [
    ("plain", "1112<eos>999", "1112"),           # text after EOS is ignored
    ("plain", "0112", "0112"),                   # no normalisation: exact match fails on "112"
    ("plain", "11a2", None),
    ("plain", "<eos>", None),
    ("plain", "", None),
    ("reversed", "2111", "1112"),
    ("scratchpad", "99,99>1112", "1112"),        # the scratchpad itself is not graded
    ("scratchpad", "21,11,11", None),            # no '>' before EOS: no answer
    ("scratchpad", "21>1+2", None),
])
def test_extract(variant, completion, expected):
    assert task(variant).extract(completion) == expected


def test_exact_match_reward_on_the_task():
    t = task("reversed")
    reward = ExactMatchReward(t.extract)
    rewards, stats = reward.score([("2111<eos>", "1112"), ("2112<eos>", "1112"), ("21+1", "1112"),
                                   ("001", "100")])
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert (stats.correct, stats.no_answer) == (2, 1)


def test_generators_are_deterministic_and_pinned():
    a, b = task(seed=0), task(seed=0)
    assert a.rl_examples(50) == b.rl_examples(50)
    assert a.sft_pairs(50) == b.sft_pairs(50)
    assert task(seed=1).rl_examples(50) != a.rl_examples(50)
    first = a.rl_examples(3)
    assert [(ex.id, ex.prompt, ex.answer, ex.source) for ex in first] == [
        ("arith3-train/0", "564+532=", "1096", "synthetic:arith-plain"),
        ("arith3-train/1", "193+664=", "857", "synthetic:arith-plain"),
        ("arith3-train/2", "683+447=", "1130", "synthetic:arith-plain")]
    assert a.sft_pairs(2) == [("98+9=", "107"), ("656+9=", "665")]
    assert task("scratchpad").sft_pairs(1) == [("98+9=", "71,01>107")]
    assert a.rl_examples(3, split="eval") != first


def test_digit_ranges():
    t = task(digits=3)
    rl = [ex.prompt[:-1].split("+") for ex in t.rl_examples(500)]
    assert {len(x) for pair in rl for x in pair} == {3}
    sft = [p[:-1].split("+") for p, _ in t.sft_pairs(600)]
    assert {len(p[0]) for p in sft} == {1, 2, 3} and {len(p[1]) for p in sft} == {1, 2, 3}
    assert all(int(p[0]) + int(p[1]) == int(c) for p, (_, c) in zip(sft, t.sft_pairs(600)))
    assert {len(x) for ex in task(digits=1).rl_examples(200) for x in ex.prompt[:-1].split("+")} == {1}


def test_dataset_specs_and_config_errors():
    ds = load_dataset("synthetic:arith", synthetic=ArithmeticConfig(digits=2, size=7, seed=5))
    assert (ds.name, len(ds)) == ("arith2", 7)
    assert all(len(ex.prompt) == 6 for ex in ds)  # "ab+cd="
    held_out = load_dataset("synthetic:arith-scratchpad@eval", synthetic=ArithmeticConfig(size=4))
    assert held_out.name == "arith3_eval" and held_out[0].source == "synthetic:arith-scratchpad"
    with pytest.raises(ConfigError, match=r"^digits: 0"):
        task(digits=0)
    with pytest.raises(ConfigError, match=r"^variant: 'words'"):
        task("words")
