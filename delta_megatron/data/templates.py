"""Prompt templates: how an :class:`Example` becomes the text the policy continues.

* ``chat``: the tokenizer's own chat template (instruct models, and the synthetic tokenizer's minimal
  one), with the generation prompt appended;
* ``plain``: a fixed ``User: ... Assistant:`` template for base models that asks for the final answer
  in ``\\boxed{}`` (the DeepSeek-R1 / DAPO-era convention our extractor reads first);
* ``none``: the raw question (the synthetic task, or datasets whose prompts are already formatted).

The boxed instruction is added only to bare questions: verl-style message lists carry their own.
"""

from __future__ import annotations

from typing import Any, Literal

from delta_megatron.data.datasets import Example, Message

__all__ = ["TemplateName", "BOXED_INSTRUCTION", "PLAIN_TEMPLATE", "to_messages", "render_prompt",
           "encode_prompt"]

TemplateName = Literal["chat", "plain", "none"]
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "User: {problem}\n{instruction}\n\nAssistant:"


def to_messages(example: Example, instruction: str | None = BOXED_INSTRUCTION) -> list[Message]:
    """Chat messages for ``example``: its own list, or one user turn (question + instruction)."""
    if example.messages is not None:
        return [dict(m) for m in example.messages]
    content = example.problem if not instruction else f"{example.problem}\n{instruction}"
    return [{"role": "user", "content": content}]


def render_prompt(example: Example, template: TemplateName, tokenizer: Any = None,
                  instruction: str | None = BOXED_INSTRUCTION) -> str:
    """The prompt text for ``example`` under ``template`` (``chat`` needs a tokenizer with a chat
    template; pass ``instruction=None`` for tasks that must not get the boxed instruction)."""
    if template == "none":
        if example.messages is None:
            return example.problem
        return "\n\n".join(m["content"] for m in example.messages)
    if template == "plain":
        if example.messages is None:
            if not instruction:
                return f"User: {example.problem}\n\nAssistant:"
            return PLAIN_TEMPLATE.format(problem=example.problem, instruction=instruction)
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in example.messages]
        return "\n\n".join(turns) + "\n\nAssistant:"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template "
                             "(use 'plain' or 'none' for base models without one)")
        return tokenizer.apply_chat_template(to_messages(example, instruction), tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"template: {template!r} — one of 'chat', 'plain', 'none'")


def encode_prompt(tokenizer: Any, text: str, template: TemplateName) -> list[int]:
    """Token ids of a rendered prompt. Chat templates already emit BOS (if the model has one), so
    special tokens are added only for ``plain``/``none`` text — never twice."""
    return list(tokenizer(text, add_special_tokens=template != "chat")["input_ids"])
