"""Prompt data: datasets (jsonl/parquet, verl fields or {problem, answer}), templates, the synthetic
arithmetic task and its tokenizer, and the resumable epoch sampler."""

from delta_megatron.data.datasets import (
    DATA_DIR,
    DatasetError,
    Example,
    PromptDataset,
    load_dataset,
    read_rows,
    resolve_path,
    row_to_example,
)
from delta_megatron.data.sampler import EpochSampler, PromptStream
from delta_megatron.data.synthetic import ArithmeticConfig, ArithmeticTask, synthetic_dataset
from delta_megatron.data.templates import (
    BOXED_INSTRUCTION,
    TemplateName,
    encode_prompt,
    render_prompt,
    to_messages,
)
from delta_megatron.data.tokenizer import (
    CHAT_TEMPLATE,
    arithmetic_tokenizer,
    build_char_tokenizer,
    load_hf_tokenizer,
    save_char_tokenizer,
)

__all__ = [
    "DATA_DIR", "DatasetError", "Example", "PromptDataset", "load_dataset", "read_rows", "resolve_path",
    "row_to_example", "EpochSampler", "PromptStream", "ArithmeticConfig", "ArithmeticTask",
    "synthetic_dataset", "BOXED_INSTRUCTION", "TemplateName", "encode_prompt", "render_prompt",
    "to_messages", "CHAT_TEMPLATE", "arithmetic_tokenizer", "build_char_tokenizer", "load_hf_tokenizer",
    "save_char_tokenizer",
]
