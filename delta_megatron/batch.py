"""RolloutBatch: the one structure that flows through a training step (ARCHITECTURE.md, contract 1).

Sequences (prompt + response) are stored packed in THD layout: one flat token axis plus
``cu_seqlens``. Stages add fields and never rewrite another stage's field:

* per-token fields ``[T, ...]`` (``logp_rollout``, ``logp_old``, ``entropy``, ``advantage``, ``credit``,
  ...). Alignment: the value at flat index ``t`` describes token ``tokens[t]`` given the tokens before
  it (e.g. ``logp_old[t] = log π_old(tokens[t] | tokens[<t])``); it is meaningful only where
  ``response_mask`` is True.
* per-sample fields ``[B, ...]`` (``reward``, ``group_id``, ``truncated``, ...).

Data-parallel shards, micro-batches and context-parallel chunks are views computed from the same
batch: the partition helpers return sample or token indices, and :meth:`RolloutBatch.select` builds a
smaller batch, so every split is reversible and deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def _lengths_to_cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths.long(), 0)])


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [T] long, prompt+response of every sample, packed
    cu_seqlens: torch.Tensor  # [B+1] long
    prompt_lens: torch.Tensor  # [B] long
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_fields: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_meta: dict[str, list[Any]] = field(default_factory=dict)  # non-tensor per-sample data

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     **sample_fields: Any) -> RolloutBatch:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if any(len(r) == 0 for r in responses):
            raise ValueError("every response needs at least one token (the EOS or the truncation point)")
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        batch = cls(tokens=torch.tensor([t for s in seqs for t in s], dtype=torch.long),
                    cu_seqlens=_lengths_to_cu(lengths),
                    prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.long))
        for name, value in sample_fields.items():
            if isinstance(value, torch.Tensor):
                batch.add_sample_field(name, value)
            else:
                batch.sample_meta[name] = list(value)
        return batch

    def __post_init__(self) -> None:
        if self.cu_seqlens.numel() != self.prompt_lens.numel() + 1:
            raise ValueError("cu_seqlens must have one more entry than prompt_lens")
        if int(self.cu_seqlens[-1]) != self.tokens.numel():
            raise ValueError(f"cu_seqlens ends at {int(self.cu_seqlens[-1])} but there are "
                             f"{self.tokens.numel()} tokens")

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_seqs(self) -> int:
        return self.prompt_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def seq_lens(self) -> torch.Tensor:  # [B]
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def response_lens(self) -> torch.Tensor:  # [B], EOS included
        return self.seq_lens - self.prompt_lens

    @property
    def seq_index(self) -> torch.Tensor:  # [T] sample of each token
        return torch.repeat_interleave(torch.arange(self.num_seqs), self.seq_lens)

    @property
    def positions(self) -> torch.Tensor:  # [T] position inside its sequence (RoPE position id)
        return torch.arange(self.num_tokens) - self.cu_seqlens[:-1][self.seq_index]

    @property
    def response_mask(self) -> torch.Tensor:  # [T] bool: token belongs to the response
        return self.positions >= self.prompt_lens[self.seq_index]

    @property
    def loss_mask(self) -> torch.Tensor:
        """Response tokens that enter the loss (a stage may add a narrower ``loss_mask`` field)."""
        mask = self.response_mask
        if "loss_mask" in self.token_fields:
            mask = mask & self.token_fields["loss_mask"].bool()
        return mask

    def responses(self) -> list[list[int]]:
        return [self.tokens[int(s) + int(p): int(e)].tolist()
                for s, e, p in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:], self.prompt_lens)]

    # ------------------------------------------------------------------ fields
    def add_token_field(self, name: str, value: torch.Tensor, overwrite: bool = False) -> RolloutBatch:
        if value.shape[0] != self.num_tokens:
            raise ValueError(f"token field {name!r} has {value.shape[0]} rows, batch has "
                             f"{self.num_tokens} tokens")
        if name in self.token_fields and not overwrite:
            raise KeyError(f"token field {name!r} already set by an earlier stage")
        self.token_fields[name] = value
        return self

    def add_sample_field(self, name: str, value: torch.Tensor, overwrite: bool = False) -> RolloutBatch:
        if value.shape[0] != self.num_seqs:
            raise ValueError(f"sample field {name!r} has {value.shape[0]} rows, batch has "
                             f"{self.num_seqs} samples")
        if name in self.sample_fields and not overwrite:
            raise KeyError(f"sample field {name!r} already set by an earlier stage")
        self.sample_fields[name] = value
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.token_fields:
            return self.token_fields[name]
        if name in self.sample_fields:
            return self.sample_fields[name]
        raise KeyError(f"no field {name!r}; token fields: {sorted(self.token_fields)}, "
                       f"sample fields: {sorted(self.sample_fields)}")

    def __contains__(self, name: str) -> bool:
        return name in self.token_fields or name in self.sample_fields

    def per_token(self, name: str) -> torch.Tensor:
        """A sample field broadcast to the tokens (e.g. the advantage of each token's response)."""
        return self.sample_fields[name][self.seq_index]

    # ------------------------------------------------------------------ selection
    def token_indices(self, sample_indices: Sequence[int]) -> torch.Tensor:
        """Flat token indices of the given samples, in the given order."""
        if len(sample_indices) == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1]))
                          for i in sample_indices])

    def select(self, sample_indices: Sequence[int]) -> RolloutBatch:
        """A new packed batch holding the given samples in the given order (fields carried along)."""
        idx = torch.as_tensor(list(sample_indices), dtype=torch.long)
        tok = self.token_indices(list(sample_indices))
        out = RolloutBatch(tokens=self.tokens[tok], cu_seqlens=_lengths_to_cu(self.seq_lens[idx]),
                           prompt_lens=self.prompt_lens[idx])
        out.token_fields = {k: v[tok] for k, v in self.token_fields.items()}
        out.sample_fields = {k: v[idx] for k, v in self.sample_fields.items()}
        out.sample_meta = {k: [v[i] for i in idx.tolist()] for k, v in self.sample_meta.items()}
        return out

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        first = batches[0]
        out = RolloutBatch(tokens=torch.cat([b.tokens for b in batches]),
                           cu_seqlens=_lengths_to_cu(torch.cat([b.seq_lens for b in batches])),
                           prompt_lens=torch.cat([b.prompt_lens for b in batches]))
        out.token_fields = {k: torch.cat([b.token_fields[k] for b in batches]) for k in first.token_fields}
        out.sample_fields = {k: torch.cat([b.sample_fields[k] for b in batches]) for k in first.sample_fields}
        out.sample_meta = {k: [x for b in batches for x in b.sample_meta[k]] for k in first.sample_meta}
        return out

    # ------------------------------------------------------------------ partitions
    def dp_partition(self, world_size: int) -> list[list[int]]:
        """Split samples over DP ranks balancing token counts (greedy longest-first, deterministic).

        Every rank gets ``B // world_size`` or one more samples; indices inside a shard keep batch
        order so groups stay readable in logs."""
        return balanced_partition(self.seq_lens.tolist(), world_size)

    def micro_batches(self, max_tokens: int, sample_indices: Sequence[int] | None = None) -> list[list[int]]:
        """Pack samples into micro-batches of at most ``max_tokens`` tokens (first-fit decreasing).

        A sample longer than the budget gets a micro-batch of its own (it cannot be split: its loss
        needs the whole sequence). Deterministic; micro-batches list samples in batch order."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        pool = list(range(self.num_seqs)) if sample_indices is None else list(sample_indices)
        lens = self.seq_lens
        order = sorted(pool, key=lambda i: (-int(lens[i]), i))
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            length = int(lens[i])
            for b, free in enumerate(room):
                if length <= free:
                    bins[b].append(i)
                    room[b] -= length
                    break
            else:
                bins.append([i])
                room.append(max_tokens - length)
        return [sorted(b) for b in sorted(bins, key=min)]


def balanced_partition(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Greedy LPT with equal-count constraint: sizes differ by at most one sample."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    n = len(lengths)
    cap = [n // parts + (1 if r < n % parts else 0) for r in range(parts)]
    heap = [(0, r) for r in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        skipped = []
        while True:
            load, r = heapq.heappop(heap)
            if len(out[r]) < cap[r]:
                break
            skipped.append((load, r))
        out[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
        for item in skipped:
            heapq.heappush(heap, item)
    return [sorted(p) for p in out]


# ---------------------------------------------------------------------- context parallelism
@dataclass
class CPShard:
    """The tokens one context-parallel rank owns under Megatron's load-balanced split.

    Each sequence is padded to a multiple of ``2·CP`` (times ``pad_multiple``) and cut into ``2·CP``
    equal chunks; rank ``r`` holds chunks ``r`` and ``2·CP−1−r`` so causal-attention work is
    balanced. ``token_index[j]`` is the flat index (into the full batch) of local token ``j``, or
    −1 for padding."""

    token_index: torch.Tensor  # [T_local] long
    cu_seqlens: torch.Tensor  # [B+1] local (padded) sequence boundaries
    cp_size: int
    cp_rank: int
    pad_multiple: int = 1

    @property
    def valid(self) -> torch.Tensor:
        return self.token_index >= 0

    def take(self, full: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
        """Local view of a per-token tensor of the full batch (padding filled with ``pad_value``)."""
        out = full.new_full((self.token_index.numel(),) + tuple(full.shape[1:]), pad_value)
        out[self.valid] = full[self.token_index[self.valid]]
        return out


def cp_split(batch: RolloutBatch, cp_size: int, cp_rank: int, pad_multiple: int = 1) -> CPShard:
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    unit = 2 * cp_size * pad_multiple
    pieces, local_lens = [], []
    for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        length = e - s
        padded = -(-length // unit) * unit
        idx = torch.full((padded,), -1, dtype=torch.long)
        idx[:length] = torch.arange(s, e)
        chunks = idx.view(2 * cp_size, padded // (2 * cp_size))
        local = torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])
        pieces.append(local)
        local_lens.append(local.numel())
    return CPShard(token_index=torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long),
                   cu_seqlens=_lengths_to_cu(torch.tensor(local_lens, dtype=torch.long)),
                   cp_size=cp_size, cp_rank=cp_rank, pad_multiple=pad_multiple)


def cp_gather(batch: RolloutBatch, shards: Sequence[CPShard], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`cp_split`: scatter every rank's local values back to the full token axis."""
    first = values[0]
    out = first.new_zeros((batch.num_tokens,) + tuple(first.shape[1:]))
    for shard, local in zip(shards, values):
        out[shard.token_index[shard.valid]] = local[shard.valid]
    return out
