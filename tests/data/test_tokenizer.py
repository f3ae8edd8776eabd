"""The synthetic task's character tokenizer: ids, round trips, HF file layout and AutoTokenizer."""

import json

import pytest

from delta_megatron.data import ArithmeticTask, build_char_tokenizer, load_hf_tokenizer, save_char_tokenizer

PROMPT_IDS = [1, 4, 5, 6, 13, 12, 11, 12, 14]  # <bos> 1 2 3 + 9 8 9 =


def test_ids_and_round_trip():
    tok = build_char_tokenizer()
    assert tok.get_vocab_size() == 17
    assert tok.encode("123+989=").ids == PROMPT_IDS
    text = "0123456789+=>,"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.ids == list(range(3, 17))
    assert tok.decode(enc.ids) == text
    assert tok.encode("<bos>12<eos><pad>", add_special_tokens=False).ids == [1, 4, 5, 2, 0]
    completion = ArithmeticTask().completion(123, 989)
    assert tok.decode(tok.encode(completion + "<eos>").ids, skip_special_tokens=True) == completion


def test_unknown_characters_raise():
    with pytest.raises(Exception, match="UNK"):
        build_char_tokenizer().encode("1a")
    with pytest.raises(ValueError, match="only single characters"):
        build_char_tokenizer(("<pad>", "<bos>", "<eos>", "12"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_char_tokenizer(tmp_path_factory.mktemp("tok"))


def test_saved_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((saved / "special_tokens_map.json").read_text()) == {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config


def test_auto_tokenizer_loads_it(saved, tmp_path):
    tok = load_hf_tokenizer(saved)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (17, 1, 2, 0)
    assert tok("123+989=").input_ids == PROMPT_IDS
    assert tok.decode(PROMPT_IDS) == "<bos>123+989="
    assert tok.decode(PROMPT_IDS, skip_special_tokens=True) == "123+989="
    assert tok(["1+2=", "12+34="], padding=True).input_ids == [[0, 0, 1, 4, 13, 5, 14],
                                                               [1, 4, 5, 13, 6, 7, 14]]
    chat = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<bos>1+2=3<eos>"
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == "<bos>1+2="
    tok.save_pretrained(tmp_path)  # the loaded tokenizer's own save_pretrained round-trips too
    assert load_hf_tokenizer(tmp_path)("99+1=").input_ids == [1, 12, 12, 13, 4, 14]


def test_pretrained_tokenizer_fast_loads_it(saved):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(saved))
    assert tok("5+5=").input_ids == [1, 8, 13, 8, 14]
