"""Pack variable-length sequences into one row for the megatron forward — one layout, two backends.

Layout (both backends): sequence ``i`` starts at ``cu_seqlens_padded[i]``, holds its ``seq_lens[i]``
real tokens, then pad tokens up to a multiple of ``align`` (``packing_alignment``: TP·CP·2 with
context parallelism so each sequence splits into 2·CP equal chunks, TP with sequence parallelism).
Position ids restart at 0 for every sequence.

* ``local`` (CPU / megatron's DotProductAttention, which rejects ``PackedSeqParams``): an explicit
  block-diagonal causal mask ``[1, 1, S, S]`` (True = masked). megatron's softmax uses a given mask
  instead of its default causal one; GPTModel's RoPE uses positions ``0..S-1`` of the row, but RoPE
  scores depend only on relative positions and no query sees another sequence, so every sequence's
  outputs equal its unpacked ones (checked in tests/models). The mask is O(S²): CPU/test sizes only.
* ``te`` (GPU / TEDotProductAttention): THD format, ``PackedSeqParams`` with real and padded
  ``cu_seqlens``; no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["PackedSeqs", "pack_sequences", "packing_alignment", "cp_partition_index"]


def packing_alignment(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> int:
    """Per-sequence padding multiple: CP needs 2·CP equal chunks (times TP for sequence parallel
    inside each chunk, as megatron's THD path requires); SP alone needs the row divisible by TP."""
    if cp > 1:
        return tp * cp * 2
    return tp if sequence_parallel else 1


@dataclass
class PackedSeqs:
    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S]
    seq_lens: torch.Tensor  # [n] real lengths (int64)
    cu_seqlens: torch.Tensor  # [n+1] int32, cumulative real lengths (THD cu_seqlens_q)
    cu_seqlens_padded: torch.Tensor  # [n+1] int32, start of each sequence in the row
    backend: Literal["local", "te"]
    attention_mask: torch.Tensor | None = None  # [1, 1, S, S] bool, True = masked (local)
    packed_seq_params: object | None = None  # megatron PackedSeqParams (te)

    @property
    def total_len(self) -> int:
        return int(self.cu_seqlens_padded[-1])

    def token_index(self) -> torch.Tensor:
        """Row positions of the real tokens, sequence after sequence: ``[sum(seq_lens)]``."""
        starts = self.cu_seqlens_padded[:-1].long()
        return torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in zip(starts, self.seq_lens)])

    def next_token_targets(self, ignore: int = -1) -> torch.Tensor:
        """``[1, S]``: the token each position predicts (its successor within the same sequence),
        ``ignore`` at each sequence's last token and at padding — the input of ops.logprob."""
        ids = self.input_ids[0]
        targets = torch.full_like(ids, ignore)
        for start, n in zip(self.cu_seqlens_padded[:-1].tolist(), self.seq_lens.tolist()):
            targets[start: start + n - 1] = ids[start + 1: start + n]
        return targets.unsqueeze(0)

    def unpack(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split per-token ``values`` ``[1, S, ...]`` or ``[S, ...]`` into per-sequence real parts."""
        if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == self.total_len:
            values = values[0]
        return [values[s: s + n] for s, n in
                zip(self.cu_seqlens_padded[:-1].tolist(), self.seq_lens.tolist())]

    def forward_kwargs(self) -> dict:
        """Keyword arguments for ``GPTModel.forward``."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    attention_mask=self.attention_mask, packed_seq_params=self.packed_seq_params)


def _block_causal_mask(starts: list[int], total: int) -> torch.Tensor:
    seg = torch.empty(total, dtype=torch.long)
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        seg[a:b] = i
    pos = torch.arange(total)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])  # [S, S] (q, k)
    return (~allowed).view(1, 1, total, total)


def pack_sequences(seqs: Sequence[torch.Tensor | list[int]], backend: Literal["local", "te"] = "local",
                   *, align: int = 1, pad_id: int = 0, device=None) -> PackedSeqs:
    """Pack token sequences (1-D) into one row; see the module docstring for the layout."""
    if not seqs:
        raise ValueError("pack_sequences: no sequences")
    tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    lens = torch.tensor([len(t) for t in tensors], dtype=torch.long)
    if (lens == 0).any():
        raise ValueError("pack_sequences: empty sequence")
    padded = (lens + align - 1) // align * align
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    cu_pad = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_pad[1:] = torch.cumsum(padded, 0)
    total = int(cu_pad[-1])
    ids = torch.full((total,), pad_id, dtype=torch.long)
    pos = torch.empty(total, dtype=torch.long)
    for t, start, p in zip(tensors, cu_pad[:-1].tolist(), padded.tolist()):
        ids[start: start + len(t)] = t
        pos[start: start + p] = torch.arange(p)
    packed = PackedSeqs(ids.unsqueeze(0), pos.unsqueeze(0), lens, cu, cu_pad, backend)
    if backend == "local":
        packed.attention_mask = _block_causal_mask(cu_pad.tolist(), total)
    elif backend == "te":
        from megatron.core.packed_seq_params import PackedSeqParams

        max_len = int(padded.max())
        packed.packed_seq_params = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max_len, max_seqlen_kv=max_len)
    else:
        raise ValueError(f"pack_sequences: backend {backend!r} (allowed: local, te)")
    if device is not None:
        for name in ("input_ids", "position_ids", "attention_mask", "cu_seqlens", "cu_seqlens_padded"):
            value = getattr(packed, name)
            if value is not None:
                setattr(packed, name, value.to(device))
        if packed.packed_seq_params is not None:
            psp = packed.packed_seq_params
            for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
                setattr(psp, name, getattr(psp, name).to(device))
    return packed


def cp_partition_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Row positions owned by ``cp_rank`` under megatron/TE's load-balanced THD split: every
    sequence is cut into 2·CP equal chunks and rank r keeps chunks r and 2·CP−1−r (so causal work
    is balanced). Same order as TE's ``thd_get_partitioned_indices``."""
    out = []
    for a, b in zip(cu_seqlens_padded[:-1].tolist(), cu_seqlens_padded[1:].tolist()):
        if (b - a) % (2 * cp_size):
            raise ValueError(f"sequence length {b - a} is not a multiple of 2*cp={2 * cp_size}")
        c = (b - a) // (2 * cp_size)
        for k in (cp_rank, 2 * cp_size - 1 - cp_rank):
            out.append(torch.arange(a + k * c, a + (k + 1) * c))
    return torch.cat(out)
