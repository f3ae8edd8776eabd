"""The synthetic addition task for tiny models (docs: DEMO-SIZING.md).

``a+b=`` -> the sum, over a 17-token character vocabulary (digits, ``+ = > ,``, BOS, EOS, PAD). It lets
the whole RL pipeline run on 2 CPU cores in minutes with an exact, unhackable reward. Difficulty is the
number of digits; SFT pairs use operands of 1..``digits`` digits, RL and eval prompts exactly
``digits`` digits, so RL starts from a partly-solved task. Variants of the completion:

* ``plain``: the sum, most significant digit first (``123+989=1112``) — the forgiving default;
* ``reversed``: the sum's digits least significant first (``123+989=2111``), the order carries flow;
* ``scratchpad``: per-digit ``(sum digit, carry)`` pairs least significant first, then ``>`` and the
  sum (``123+989=21,11,11>1112``); the reward reads only the final answer.

The scratchpad's ``scaffold_share`` knob (0 = the compact form above) grows it into a task where token
credit matters: every digit step becomes a sentence like ``digit 2: 3 plus 9 is 12, write 2 carry 1;``
whose *scaffold* tokens (words, punctuation, spaces, the step index: the same in right and wrong
answers) make up about ``scaffold_share`` of the response, while the few operand-dependent tokens
(the copied digits, the intermediate sum and its digit/carry) decide the answer. Scaffold words are
single tokens of an extended vocabulary (:data:`SCAFFOLD_VOCAB`); see :meth:`ArithmeticTask.step_tokens`.

``Example.answer`` is always the true sum in ordinary notation; :meth:`ArithmeticTask.extract` turns a
completion of any variant back into that notation. Everything is deterministic under ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from delta_megatron.data.types import Example, PromptDataset
from delta_megatron.utils.configs import Section, fail, option, validate

__all__ = ["ArithmeticConfig", "ArithmeticTask", "synthetic_dataset", "spec_variant", "VOCAB", "PAD", "BOS", "EOS",
           "SPECIAL_TOKENS", "CHARS", "SCAFFOLD_VOCAB", "SCAFFOLD_WORDS", "MAX_SCAFFOLD_SHARE"]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
CHARS = "0123456789+=>,"
VOCAB: tuple[str, ...] = (*SPECIAL_TOKENS, *CHARS)
"""Token strings in id order: PAD=0, BOS=1, EOS=2, digits 3..12, '+'=13, '='=14, '>'=15, ','=16."""
SCAFFOLD_WORDS = ("digit", "plus", "is", "write", "carry")
SCAFFOLD_VOCAB: tuple[str, ...] = (*VOCAB, ":", ";", " ", *SCAFFOLD_WORDS)
"""The scaffolded scratchpad's vocabulary: :data:`VOCAB` (same ids) + ':' ';' ' ' and five word tokens."""

# One digit step of the scaffolded scratchpad in reading order: ("s", token) is scaffold, ("c", slot)
# is content — a (operand a's digit), b, s (the digit sum with carry-in, 1-2 tokens), w (sum digit),
# c (carry); "i" (the 1-based step index) is scaffold too: it does not depend on the operands.
_FRAME: tuple[tuple[str, str], ...] = (
    ("s", "digit"), ("s", " "), ("s", "i"), ("s", ":"), ("s", " "), ("c", "a"), ("s", " "), ("s", "plus"),
    ("s", " "), ("c", "b"), ("s", " "), ("s", "is"), ("s", " "), ("c", "s"), ("s", ","), ("s", " "),
    ("s", "write"), ("s", " "), ("c", "w"), ("s", " "), ("s", "carry"), ("s", " "), ("c", "c"),
    ("s", ";"), ("s", " "))
_SCAFFOLD_SLOTS = [i for i, (kind, _) in enumerate(_FRAME) if kind == "s"]
# which scaffold slots a step keeps as the share grows: the separator, words, index and punctuation,
# then the spaces in reading order
_SCAFFOLD_PRIORITY = [i for tok in (";", "is", "write", "carry", "plus", "digit", "i", ":", ",")
                      for i in _SCAFFOLD_SLOTS if _FRAME[i][1] == tok] + \
                     [i for i in _SCAFFOLD_SLOTS if _FRAME[i][1] == " "]
_CONTENT_PER_STEP = 5.45  # a, b, w, c and the 1-2 digit sum (1.45 tokens on average for random digits)
MAX_SCAFFOLD_SHARE = 0.75  # all 20 scaffold slots per step: ≈ 0.75 of the response

Variant = Literal["plain", "reversed", "scratchpad"]
_SPEC_VARIANTS: dict[str, Variant] = {"synthetic:arith": "plain", "synthetic:arith-plain": "plain",
                                      "synthetic:arith-reversed": "reversed",
                                      "synthetic:arith-scratchpad": "scratchpad"}


@dataclass
class ArithmeticConfig(Section):
    """``digits``: RL/eval operand length (SFT uses 1..digits); ``size``: RL prompts in the training set."""

    digits: int = option(3, "operand digits of RL/eval prompts (SFT: 1..digits)", ge=1, le=30)
    variant: Variant = option("plain", "completion notation: plain, reversed or scratchpad")
    size: int = option(4096, "RL prompts in the training set", ge=1)
    seed: int = option(0, "seed of the generated prompts", ge=0)
    scaffold_share: float = option(0.0, "scratchpad only: target share of scaffold tokens (0 = compact pairs)",
                                   ge=0.0, le=MAX_SCAFFOLD_SHARE)

    def validate(self) -> None:
        if self.scaffold_share and self.variant != "scratchpad":
            fail("scaffold_share", self.scaffold_share, "only the scratchpad variant has a scaffold (or 0)")


class ArithmeticTask:
    """Prompt/target construction, answer extraction and generators for one task configuration."""

    def __init__(self, cfg: ArithmeticConfig | None = None):
        self.cfg = cfg or ArithmeticConfig()
        validate(self.cfg)

    @property
    def source(self) -> str:
        return f"synthetic:arith-{self.cfg.variant}"

    @property
    def scaffolded(self) -> bool:
        return self.cfg.scaffold_share > 0

    @property
    def vocab(self) -> tuple[str, ...]:
        """Token strings in id order (the scaffolded scratchpad extends :data:`VOCAB`)."""
        return SCAFFOLD_VOCAB if self.scaffolded else VOCAB

    @property
    def words(self) -> tuple[str, ...]:
        """Multi-character tokens of the vocabulary (the tokenizer matches them whole)."""
        return SCAFFOLD_WORDS if self.scaffolded else ()

    @property
    def scaffold_per_step(self) -> int:
        """Scaffold tokens per digit step, chosen so that the expected scaffold share of a response
        (steps + ``>`` + the answer's ``digits + ½`` digits, per step) is closest to ``scaffold_share``."""
        share, d = self.cfg.scaffold_share, self.cfg.digits
        if not share:
            return 0
        content, fixed = _CONTENT_PER_STEP + (d + 0.5) / d, 1.0 / d  # per step; '>' is scaffold
        n = round(share / (1.0 - share) * content - fixed)
        return max(1, min(n, len(_SCAFFOLD_PRIORITY)))

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    def completion(self, a: int, b: int) -> str:
        """The target completion (without EOS) in this task's variant."""
        return "".join(tok for tok, _ in self.completion_tokens(a, b))

    def completion_tokens(self, a: int, b: int) -> list[tuple[str, bool]]:
        """The target completion as (token, is_scaffold) pairs; tokens are the tokenizer's."""
        total = str(a + b)
        if self.cfg.variant == "plain":
            return [(ch, False) for ch in total]
        if self.cfg.variant == "reversed":
            return [(ch, False) for ch in total[::-1]]
        da, db = str(a)[::-1], str(b)[::-1]
        out: list[tuple[str, bool]] = []
        carry = 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i] if i < len(da) else 0), int(db[i] if i < len(db) else 0)
            s = x + y + carry
            if self.scaffolded:
                out += self.step_tokens(i + 1, x, y, s)
            else:
                out += ([(",", True)] if i else []) + [(str(s % 10), False), (str(s // 10), False)]
            carry = s // 10
        return out + [(">", True)] + [(ch, False) for ch in total]

    def step_tokens(self, index: int, x: int, y: int, s: int) -> list[tuple[str, bool]]:
        """One digit step of the scaffolded scratchpad: ``digit 2: 3 plus 9 is 12, write 2 carry 1;``
        with the first :attr:`scaffold_per_step` scaffold slots of the priority order kept (the
        separator, then words, index and punctuation, then spaces), content always."""
        keep = set(_SCAFFOLD_PRIORITY[: self.scaffold_per_step])
        content = {"a": str(x), "b": str(y), "s": str(s), "w": str(s % 10), "c": str(s // 10)}
        out = []
        for slot, (kind, tok) in enumerate(_FRAME):
            if kind == "c":
                out += [(ch, False) for ch in content[tok]]
            elif slot in keep:
                out += [(ch, True) for ch in str(index)] if tok == "i" else [(tok, True)]
        return out

    def extract(self, completion: str) -> str | None:
        """The sum a completion claims, in ordinary notation; None if it is not well-formed.

        Reads up to the first EOS; PAD/BOS and surrounding whitespace are ignored. No normalisation:
        ``0123`` is not ``123`` (exact match)."""
        text = completion.split(EOS, 1)[0].replace(PAD, "").replace(BOS, "").strip()
        if self.cfg.variant == "scratchpad":
            if ">" not in text:
                return None
            text = text.rsplit(">", 1)[1]
        if not text or not text.isdigit() or not text.isascii():
            return None
        return text[::-1] if self.cfg.variant == "reversed" else text

    def reward(self, completion: str, answer: str) -> float:
        """1.0 for the exact sum, else 0.0 (for batches use ``ExactMatchReward(task.extract)``)."""
        return 1.0 if self.extract(completion) == answer else 0.0

    def _rng(self, purpose: str, seed: int | None) -> random.Random:
        # String seeds hash with SHA-512 in ``random``: stable across runs and Python versions.
        return random.Random(f"arith/{purpose}/{self.cfg.seed if seed is None else seed}")

    @staticmethod
    def _operand(rng: random.Random, digits: int) -> int:
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(lo, 10**digits - 1)

    def sft_pairs(self, n: int, seed: int | None = None) -> list[tuple[str, str]]:
        """``n`` (prompt, completion) pairs, each operand with a uniform 1..digits digit count.
        The completion has no EOS: the SFT collator appends it."""
        rng = self._rng("sft", seed)
        out = []
        for _ in range(n):
            a = self._operand(rng, rng.randint(1, self.cfg.digits))
            b = self._operand(rng, rng.randint(1, self.cfg.digits))
            out.append((self.prompt(a, b), self.completion(a, b)))
        return out

    def rl_examples(self, n: int | None = None, seed: int | None = None,
                    split: Literal["train", "eval"] = "train") -> list[Example]:
        """``n`` (default ``cfg.size``) RL prompts with exactly ``digits``-digit operands. ``split``
        picks an independent random stream, so eval prompts are not the training prompts' prefix."""
        n = self.cfg.size if n is None else n
        rng = self._rng(f"rl-{split}", seed)
        out = []
        for i in range(n):
            a, b = self._operand(rng, self.cfg.digits), self._operand(rng, self.cfg.digits)
            out.append(Example(id=f"arith{self.cfg.digits}-{split}/{i}", prompt=self.prompt(a, b),
                               answer=str(a + b), source=self.source))
        return out

    def dataset(self, n: int | None = None, split: Literal["train", "eval"] = "train") -> PromptDataset:
        name = f"arith{self.cfg.digits}" + ("" if split == "train" else "_eval")
        return PromptDataset(name, self.rl_examples(n, split=split))


def spec_variant(spec: str) -> Variant:
    """The completion variant named by ``synthetic:arith[-plain|-reversed|-scratchpad][@split]``."""
    base, _, split = spec.partition("@")
    if base not in _SPEC_VARIANTS or split not in ("", "train", "eval"):
        raise ValueError(f"unknown synthetic dataset {spec!r}; known: "
                         f"{sorted(_SPEC_VARIANTS)} (optionally with @eval)")
    return _SPEC_VARIANTS[base]


def synthetic_dataset(spec: str, cfg: ArithmeticConfig | None = None) -> PromptDataset:
    """The dataset for ``synthetic:arith[-plain|-reversed|-scratchpad][@eval]``; the variant in the spec
    overrides ``cfg.variant``, ``@eval`` selects the held-out prompt stream."""
    variant = spec_variant(spec)
    base, _, split = spec.partition("@")
    cfg = cfg or ArithmeticConfig()
    if base != "synthetic:arith":
        cfg = ArithmeticConfig(digits=cfg.digits, variant=variant, size=cfg.size, seed=cfg.seed,
                               scaffold_share=cfg.scaffold_share)
    return ArithmeticTask(cfg).dataset(split="eval" if split == "eval" else "train")
