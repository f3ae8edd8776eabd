"""Prompt datasets: jsonl / json / parquet files in either of two schemas, normalised to :class:`Example`.

Two schemas reach us: the plain ``{id, problem, answer, source}`` rows of our shared data, and verl's
RL parquet/jsonl rows (``prompt`` as a string or chat-message list, ``reward_model.ground_truth``,
``data_source``, ``extra_info.index``). Everything downstream (templates, rollout, reward, eval) sees
only :class:`Example`, so the trainer never branches on where data came from. A malformed row raises
:class:`DatasetError` naming the file and row, rather than being skipped: a silently shrunken eval set
changes the numbers. That includes bytes that are not UTF-8, an unreadable parquet file, and numeric
answers that cannot be the intended gold string: NaN, infinities (``1e400`` overflows) and numbers
whose digits a float cannot hold (``12345678901234567890.5``) — JSON numbers are checked against
their source text, so ``0.1`` passes and a 20-digit float does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from delta_megatron.data.synthetic import synthetic_dataset
from delta_megatron.data.types import DatasetError, Example, Message, Prompt, PromptDataset

__all__ = ["Example", "Message", "PromptDataset", "DatasetError", "load_dataset", "read_rows",
           "row_to_example", "resolve_path", "DATA_DIR"]

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
"""The repository's ``data/`` (eval sets under ``eval/``, training subsets under ``train/``)."""

_SUFFIXES = (".jsonl", ".json", ".parquet")


def resolve_path(spec: str | Path, data_dirs: Sequence[Path] | None = None) -> Path:
    """An existing file path, or a short name (``aime24``, ``train/dapo_math_1k``) looked up as
    ``<dir>/<name>.<jsonl|parquet|json>`` and ``<dir>/{eval,train}/<name>.*`` under each data dir."""
    path = Path(spec)
    if path.is_file():
        return path
    dirs = list(data_dirs) if data_dirs is not None else [DATA_DIR]
    tried = []
    for base in dirs:
        for sub in ("", "eval", "train"):
            for suffix in ("", *_SUFFIXES):
                cand = Path(base) / sub / f"{spec}{suffix}"
                tried.append(cand)
                if cand.is_file():
                    return cand
    raise DatasetError(f"dataset {str(spec)!r} not found: not a file, and no "
                       f"{{eval,train}}/{spec}{{.jsonl,.parquet,.json}} under {[str(d) for d in dirs]}")


class _JsonFloat(float):
    """A JSON number parsed as float, keeping its source text (to detect digits the float lost)."""

    text: str


def _json_float(text: str) -> float:
    value = _JsonFloat(text)
    value.text = text
    return value


def _loads(text: str) -> Any:
    return json.loads(text, parse_float=_json_float)


def _decode(data: bytes, where: str, line_offset: int = 0) -> str:
    """UTF-8 text (a leading BOM dropped), or DatasetError naming the line and column of the bad byte."""
    try:
        return data.decode("utf-8-sig" if line_offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        line = line_offset + data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(f"{where}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                           f"{column}); re-encode the file as UTF-8") from None


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` with ``where`` = ``file:line`` (jsonl) or ``file:row`` for messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, str(path), lineno - 1)
                if not line.strip():
                    continue
                try:
                    row = _loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                yield f"{path}:{lineno}", row
    elif suffix == ".json":
        text = _decode(path.read_bytes(), str(path))
        try:
            rows = _loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: a .json dataset must hold a list of rows")
        for i, row in enumerate(rows):
            yield f"{path}:row {i}", row
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use one of {_SUFFIXES}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    except (pa.ArrowException, OSError) as err:
        where = f"{path}: not a readable parquet file" if i == 0 else \
            f"{path}:row {i}: unreadable from this row's batch on (rows 0..{i - 1} read)"
        raise DatasetError(f"{where} ({type(err).__name__}: {str(err)[:200]})") from None


_EXACT_FLOAT_INT = 2**53  # above this, not every integer is a float: 2**53 + 1 reads back as 2**53


def _float_answer(value: float, where: str) -> str:
    """The gold string of a numeric answer; NaN, infinities and lost digits are data errors."""
    text = getattr(value, "text", None)
    if not math.isfinite(value):
        raise DatasetError(f"{where}: answer {text or repr(value)} is not a finite number"
                           + (" (it overflows a float)" if text else ""))
    if text is not None:
        try:
            lost = Decimal(text) != Decimal(repr(float(value)))
        except InvalidOperation:
            lost = False
        if lost:
            raise DatasetError(f"{where}: answer {text} has more digits than a float holds (it would "
                               f"become {float(value)!r}); write it as a string")
    elif value.is_integer() and abs(value) >= _EXACT_FLOAT_INT:
        raise DatasetError(f"{where}: answer {float(value)!r} is an integer beyond 2**53 stored as a float, "
                           "so its last digits are lost; store it as a string or integer")
    shortest = repr(float(value))  # the decimal the float stands for: 1e23, not int(1e23) = 99999999999999991611392
    return str(int(Decimal(shortest))) if value.is_integer() else shortest


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"{where}: answer {value!r} is not a string or number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_answer(value, where)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _answer_text(value[0], where)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: answer {value!r:.80} is not a string or number "
                           "(lists of several acceptable answers are not supported)")
    text = value.strip()
    if not text:
        raise DatasetError(f"{where}: empty answer")
    return text


def _prompt(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise DatasetError(f"{where}: empty prompt")
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for j, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                raise DatasetError(f"{where}: prompt[{j}] = {msg!r:.80} is not a "
                                   "{'role': str, 'content': str} chat message")
            messages.append({"role": msg["role"], "content": msg["content"]})
        return messages
    raise DatasetError(f"{where}: prompt {value!r:.80} is neither a string nor a list of chat messages")


def row_to_example(row: Any, *, where: str, stem: str, index: int) -> Example:
    """Normalise one row of either schema; see the module docstring for the fields read.

    The id is the row's ``id``, else ``<stem>/<extra_info.index>``, else ``<stem>/<row index>``; the
    source is ``source``, else ``data_source``, else the file stem."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if "problem" in row or "question" in row:
        prompt = _prompt(row.get("problem", row.get("question")), where)
    elif "prompt" in row:
        prompt = _prompt(row["prompt"], where)
    else:
        raise DatasetError(f"{where}: no prompt field (expected 'problem', 'question' or verl's 'prompt'); "
                           f"keys: {sorted(row)}")
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        answer = _answer_text(reward_model["ground_truth"], where)
    elif "answer" in row:
        answer = _answer_text(row["answer"], where)
    elif "ground_truth" in row:
        answer = _answer_text(row["ground_truth"], where)
    else:
        raise DatasetError(f"{where}: no answer (expected 'answer' or verl's 'reward_model.ground_truth')")
    source = row.get("source") or row.get("data_source") or stem
    if row.get("id") is not None:
        ex_id = str(row["id"])
    elif extra.get("index") is not None:
        ex_id = f"{stem}/{extra['index']}"
    else:
        ex_id = f"{stem}/{index}"
    return Example(id=ex_id, prompt=prompt, answer=answer, source=str(source), origin=where)


def load_dataset(spec: str | Path, *, name: str | None = None, max_rows: int | None = None,
                 data_dirs: Sequence[Path] | None = None, synthetic: Any = None) -> PromptDataset:
    """Load a dataset by path, short name (see :func:`resolve_path`) or ``synthetic:<task>`` spec.

    ``synthetic:arith``, ``synthetic:arith-reversed`` and ``synthetic:arith-scratchpad`` build RL prompts
    of the arithmetic task; ``synthetic`` may pass an ``ArithmeticConfig`` for digits, size and seed.
    ``max_rows`` keeps the first rows (file order), for quick evaluations.
    """
    spec_s = str(spec)
    if spec_s.startswith("synthetic:"):
        ds = synthetic_dataset(spec_s, synthetic)
        return ds[:max_rows] if max_rows is not None else ds
    path = resolve_path(spec_s, data_dirs)
    stem = path.stem
    examples = []
    for i, (where, row) in enumerate(read_rows(path)):
        if max_rows is not None and i >= max_rows:
            break
        examples.append(row_to_example(row, where=where, stem=stem, index=i))
    if not examples:
        raise DatasetError(f"{path}: no rows")
    return PromptDataset(name or stem, examples, str(path))
