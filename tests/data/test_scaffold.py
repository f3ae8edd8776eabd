"""The scaffolded scratchpad (synthetic:arith-scratchpad with data.synthetic_scaffold_share > 0): exact
targets, the share knob, its tokenizer, extraction and config errors."""

import statistics

import pytest

from delta_megatron.config import load_config
from delta_megatron.data import ArithmeticConfig, ArithmeticTask, build_char_tokenizer
from delta_megatron.data.synthetic import SCAFFOLD_VOCAB, VOCAB
from delta_megatron.utils.configs import ConfigError


def task(share, digits=3):
    return ArithmeticTask(ArithmeticConfig(variant="scratchpad", scaffold_share=share, digits=digits))


def test_share_zero_is_the_compact_scratchpad():
    t = task(0.0)
    assert t.completion(123, 989) == "21,11,11>1112"
    assert t.vocab == VOCAB and t.words == ()


def test_full_scaffold_is_the_sentence_form():
    t = task(0.75)
    assert t.scaffold_per_step == 20  # every scaffold slot of the frame
    assert t.completion(23, 989) == ("digit 1: 3 plus 9 is 12, write 2 carry 1; "
                                     "digit 2: 2 plus 8 is 11, write 1 carry 1; "
                                     "digit 3: 0 plus 9 is 10, write 0 carry 1; >1012")
    tokens = t.completion_tokens(23, 989)
    decisive = [tok for tok, scaffold in tokens if not scaffold]
    # per step: a, b, the sum (two digits here), write digit, carry; then the answer
    assert decisive == list("39" "12" "21" "28" "11" "11" "09" "10" "01" "1012")
    scaffold = {tok for tok, s in tokens if s}
    assert scaffold == {"digit", " ", "1", "2", "3", ":", "plus", "is", ",", "write", "carry", ";", ">"}


def test_small_shares_keep_separator_and_words_first():
    t = task(0.3)
    assert t.scaffold_per_step == 3  # ';', 'is', 'write' — in reading order within the step
    assert t.completion(123, 989) == "39is12write21;28is11write11;19is11write11;>1112"


@pytest.mark.parametrize("share", [0.3, 0.5, 0.6, 0.7, 0.75])
@pytest.mark.parametrize("digits", [2, 3, 5])
def test_measured_share_tracks_the_knob(share, digits):
    t = task(share, digits)
    shares = []
    for ex in t.rl_examples(300):
        a, b = map(int, ex.prompt[:-1].split("+"))
        toks = t.completion_tokens(a, b)
        shares.append(sum(s for _, s in toks) / len(toks))
        assert t.extract(t.completion(a, b)) == ex.answer
    assert abs(statistics.mean(shares) - share) < 0.04


def test_tokenizer_keeps_words_whole_and_round_trips():
    t = task(0.75)
    tok = build_char_tokenizer(t.vocab, words=t.words)
    assert tok.get_vocab_size() == len(SCAFFOLD_VOCAB) == 25
    assert [tok.id_to_token(i) for i in range(17)] == list(VOCAB)  # the compact task's ids are unchanged
    text = t.completion(807, 95)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert [tok.id_to_token(i) for i in ids] == [x for x, _ in t.completion_tokens(807, 95)]
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="declared words"):
        build_char_tokenizer((*VOCAB, "digit"))


def test_extraction_and_reward_read_only_the_final_answer():
    t = task(0.6)
    right = t.completion(123, 989)
    wrong_scaffold = right.replace("write2", "write7")  # a wrong intermediate, right final answer
    assert t.reward(right + "<eos>", "1112") == 1.0
    assert t.reward(wrong_scaffold, "1112") == 1.0
    assert t.reward(right[:-1] + "3", "1112") == 0.0
    assert t.extract(right.split(">")[0]) is None  # no answer


def test_sft_pairs_use_the_scaffold():
    pairs = task(0.75).sft_pairs(50, seed=0)
    assert pairs[0] == ("98+9=", "digit 1: 8 plus 9 is 17, write 7 carry 1; "
                                 "digit 2: 9 plus 0 is 10, write 0 carry 1; >107")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^scaffold_share: 0.8"):
        task(0.8)
    with pytest.raises(ConfigError, match=r"only the scratchpad"):
        ArithmeticTask(ArithmeticConfig(variant="plain", scaffold_share=0.5))
    with pytest.raises(ConfigError, match=r"^data.synthetic_scaffold_share: 0.9"):
        load_config(overrides=["data.train=synthetic:arith-scratchpad", "data.synthetic_scaffold_share=0.9"])
    with pytest.raises(ConfigError, match=r"^data.synthetic_scaffold_share: 0.5 .*synthetic:arith-scratchpad"):
        load_config(overrides=["data.synthetic_scaffold_share=0.5", "model.vocab_size=25"])
    with pytest.raises(ConfigError, match=r"^model.vocab_size: 17 .*>= 25"):
        load_config(overrides=["data.train=synthetic:arith-scratchpad", "data.synthetic_scaffold_share=0.5",
                               "model.vocab_size=17"])
