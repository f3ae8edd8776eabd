"""A character-level tokenizer for the synthetic task, built with ``tokenizers`` and saved as HF files.

The tiny demo model needs a tokenizer that the embedded engine, the SFT step and HF exports all load
the same way, so it is a real ``tokenizer.json`` (WordLevel over single characters, special tokens
atomic) plus ``tokenizer_config.json`` and ``special_tokens_map.json`` that both transformers 4.x and
5.x read with ``AutoTokenizer``/``PreTrainedTokenizerFast``. Unknown characters are an error (no UNK
token), so a prompt outside the vocabulary fails loudly instead of training on garbage.

Conventions (Llama-style): plain ``encode`` prepends BOS (post-processor); the chat template also emits
``bos_token``, so rendered chat text is encoded with ``add_special_tokens=False``
(``data.templates.encode_prompt`` does this). The chat template just concatenates message contents and
ends each assistant turn with EOS: the vocabulary has no room for role markers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from delta_megatron.data.synthetic import BOS, EOS, PAD, VOCAB

__all__ = ["CHAT_TEMPLATE", "build_char_tokenizer", "arithmetic_tokenizer", "save_char_tokenizer",
           "load_hf_tokenizer"]

CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def build_char_tokenizer(vocab: Sequence[str] = VOCAB, bos: str = BOS, eos: str = EOS,
                         pad: str = PAD, words: Sequence[str] = ()) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with one id per entry of ``vocab`` (in order); multi-character
    entries must be special tokens (``bos``/``eos``/``pad``) or listed in ``words`` (matched whole,
    longest first, before single characters: the scaffolded scratchpad's ``digit``, ``carry``, ...)."""
    specials = [pad, bos, eos]
    for tok in vocab:
        if len(tok) != 1 and tok not in specials and tok not in words:
            raise ValueError(f"vocab entry {tok!r}: only single characters, the special tokens {specials} "
                             f"or declared words {list(words)}")
    if any(w not in vocab for w in words):
        raise ValueError(f"words {list(words)} must all be in the vocab")
    if len(set(vocab)) != len(vocab) or any(s not in vocab for s in specials):
        raise ValueError(f"vocab must be unique and contain {specials}: {list(vocab)}")
    ids = {tok: i for i, tok in enumerate(vocab)}
    # unk_token is deliberately absent from the vocabulary: encoding an unknown character raises.
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    whole = "".join(f"{re.escape(w)}|" for w in sorted(words, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(whole + "."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])])
    return tok


def save_char_tokenizer(path: str | Path, tokenizer: Tokenizer | None = None, *, bos: str = BOS,
                        eos: str = EOS, pad: str = PAD, chat_template: str = CHAT_TEMPLATE,
                        model_max_length: int = 2048) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``path``
    (the files ``save_pretrained`` writes; the class name is the one every transformers version knows)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_char_tokenizer()
    tokenizer.save(str(path / "tokenizer.json"))
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads prompts on the left
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return path


def load_hf_tokenizer(path: str | Path):
    """``transformers.AutoTokenizer.from_pretrained(path)`` (imported lazily: transformers is slow)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def arithmetic_tokenizer():
    """The synthetic task's tokenizer as a ``transformers.PreTrainedTokenizerFast`` (its own
    ``save_pretrained`` works; :func:`save_char_tokenizer` writes the version-neutral layout)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_char_tokenizer(), bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE, padding_side="left",
                                   clean_up_tokenization_spaces=False)
