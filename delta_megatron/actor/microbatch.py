"""Micro-batches for the Megatron actor: a set of samples packed into one row with index maps.

The model sees one packed row per micro-batch (``[1, S]``). Two backends, one abstraction
(PLATFORM.md): with megatron's local attention (CPU) the row carries an explicit block-diagonal
causal mask and per-sequence position ids (RoPE is shift-invariant, so packed == unpacked); with
Transformer Engine it carries ``PackedSeqParams`` (THD) instead.

Index maps tie the row back to the RolloutBatch: ``target_index[j]`` is the flat batch index of the
token predicted at row position ``j`` (−1 where nothing is predicted: last token of a sequence,
padding), so per-token fields (``logp_old``, advantages, λ̄) are gathered with one index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.ops.packing import cp_partition_index, packing_alignment


@dataclass
class MicroBatch:
    samples: list[int]  # rollout-batch sample indices in this micro-batch
    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S]
    attention_mask: torch.Tensor | None  # [1, 1, S, S] bool, True = masked (local backend)
    packed_seq_params: object | None  # megatron PackedSeqParams (TE backend)
    targets: torch.Tensor  # [S] next token id, −1 where none
    target_index: torch.Tensor  # [S] flat batch index of the target token, −1 where none
    response: torch.Tensor  # [S] bool: the target is a response token (enters loss/credit)
    num_response_tokens: int

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def gather(self, field: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token batch field at the row's target positions ``[S, ...]`` (``fill`` elsewhere)."""
        out = field.new_full((self.seq_len,) + tuple(field.shape[1:]), fill)
        valid = self.target_index >= 0
        out[valid] = field[self.target_index[valid]]
        return out


def block_causal_mask(seq_lens: list[int], total: int) -> torch.Tensor:
    """``[1, 1, S, S]`` bool mask, True = masked: causal within each sequence, nothing across.
    Padding positions (beyond ``sum(seq_lens)``) attend only to themselves."""
    seg = torch.full((total,), -1, dtype=torch.long)
    start = 0
    for i, n in enumerate(seq_lens):
        seg[start:start + n] = i
        start += n
    pad = seg < 0
    seg[pad] = -1 - torch.arange(int(pad.sum()))  # every pad position its own segment
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return ~(same & causal)[None, None]


def padded_row_length(seq_lens: list[int], cp_size: int = 1, pad_to_multiple: int = 1) -> int:
    """Tokens of the packed row before the CP split (sequences padded to their CP unit)."""
    unit = packing_alignment(pad_to_multiple, cp_size)  # 1 without CP: the row alone is padded
    return sum(-(-n // unit) * unit for n in seq_lens)


def build_microbatch(batch: RolloutBatch, samples: list[int], pad_to_multiple: int = 1,
                     pad_token_id: int = 0, backend: str = "local", min_length: int = 1,
                     cp_size: int = 1, cp_rank: int = 0) -> MicroBatch:
    """Pack ``samples`` of ``batch`` into one row of at least ``min_length`` tokens (before the CP
    split), padded so this rank's row is a multiple of ``pad_to_multiple`` (TP for sequence
    parallelism).

    With context parallelism (TE THD only) every sequence is padded to its CP unit and this rank keeps
    chunks ``cp_rank`` and ``2·CP−1−cp_rank`` of each (``ops.packing.cp_partition_index``);
    ``packed_seq_params`` carries the *global* real and padded ``cu_seqlens``, as TE's CP attention and
    megatron's THD RoPE expect. Targets come from the whole sequence, so the last token of a chunk
    still predicts the first token of the next one, wherever that lives.
    """
    if cp_size > 1 and backend == "local":
        raise ValueError("context parallelism needs the Transformer Engine backend (THD attention)")
    unit = packing_alignment(pad_to_multiple, cp_size)  # per sequence: 2·CP·TP chunks, 1 without CP
    lens = batch.seq_lens[samples].tolist()
    padded_lens = [-(-n // unit) * unit for n in lens]
    layout = [torch.full((p,), -1, dtype=torch.long) for p in padded_lens]  # batch token per position
    for seg, i, n in zip(layout, samples, lens):
        seg[:n] = torch.arange(int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i]) + n)
    n_row = sum(padded_lens)
    step = unit if cp_size > 1 else pad_to_multiple  # the pad tail is a multiple of the unit too
    total = -(-max(n_row, min_length, 1) // step) * step
    tail = [total - n_row] if total > n_row else []  # the pad tail is one extra sequence
    row = torch.cat(layout + [torch.full((t,), -1, dtype=torch.long) for t in tail])
    real = row >= 0
    input_ids = torch.full((total,), pad_token_id, dtype=torch.long)
    input_ids[real] = batch.tokens[row[real]]
    positions = torch.zeros(total, dtype=torch.long)
    positions[real] = batch.positions[row[real]]
    # target of row position j is the next token of the same sequence
    target_index = torch.full((total,), -1, dtype=torch.long)
    cur, nxt = row[:-1], row[1:]
    same_seq = (cur >= 0) & (nxt >= 0) & (batch.seq_index[cur.clamp(min=0)] == batch.seq_index[nxt.clamp(min=0)])
    target_index[:-1] = torch.where(same_seq, nxt, torch.full_like(nxt, -1))
    valid = target_index >= 0
    targets = torch.full((total,), -1, dtype=torch.long)
    targets[valid] = batch.tokens[target_index[valid]]
    response = torch.zeros(total, dtype=torch.bool)
    response[valid] = batch.loss_mask[target_index[valid]]
    padded_cu = torch.tensor([0] + padded_lens + tail).cumsum(0)
    if cp_size > 1:  # this rank's two chunks of every sequence (and of the pad tail)
        sel = cp_partition_index(padded_cu, cp_size, cp_rank)
        input_ids, positions, targets, target_index, response = (
            t[sel] for t in (input_ids, positions, targets, target_index, response))
    mask, packed = None, None
    if backend == "local":
        mask = block_causal_mask(lens, total)
    elif cp_size > 1:
        packed = packed_seq_params(lens + tail, padded_lens + tail)
    else:
        packed = packed_seq_params(lens + tail)
    return MicroBatch(samples=list(samples), input_ids=input_ids[None], position_ids=positions[None],
                      attention_mask=mask, packed_seq_params=packed, targets=targets,
                      target_index=target_index, response=response,
                      num_response_tokens=int(response.sum()))


def packed_seq_params(seq_lens: list[int], padded_lens: list[int] | None = None):
    """THD metadata for Transformer Engine attention over the row's segments (sequences, then the
    pad tail): real lengths, and with CP the padded ones (global offsets, before the CP split)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    def cumulative(lengths: list[int]) -> torch.Tensor:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return cu.cuda() if torch.cuda.is_available() else cu

    cu = cumulative(seq_lens)
    longest = max(padded_lens or seq_lens) if seq_lens else 0
    extra = {}
    if padded_lens is not None:
        cu_pad = cumulative(padded_lens)
        extra = dict(cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest, **extra)
