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


def build_microbatch(batch: RolloutBatch, samples: list[int], pad_to_multiple: int = 1,
                     pad_token_id: int = 0, backend: str = "local", min_length: int = 1) -> MicroBatch:
    """Pack ``samples`` of ``batch`` into one row of at least ``min_length`` tokens, padded to a
    multiple of ``pad_to_multiple`` (TP for sequence parallelism)."""
    token_idx = batch.token_indices(samples)  # [n]
    lens = batch.seq_lens[samples].tolist()
    n = token_idx.numel()
    total = -(-max(n, min_length, 1) // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((total,), pad_token_id, dtype=torch.long)
    input_ids[:n] = batch.tokens[token_idx]
    positions = torch.zeros(total, dtype=torch.long)
    positions[:n] = batch.positions[token_idx]
    # target of row position j is the next token of the same sequence
    target_index = torch.full((total,), -1, dtype=torch.long)
    if n > 1:
        nxt = token_idx[1:]
        same_seq = batch.seq_index[token_idx[1:]] == batch.seq_index[token_idx[:-1]]
        target_index[: n - 1] = torch.where(same_seq, nxt, torch.full_like(nxt, -1))
    valid = target_index >= 0
    targets = torch.full((total,), -1, dtype=torch.long)
    targets[valid] = batch.tokens[target_index[valid]]
    response = torch.zeros(total, dtype=torch.bool)
    response[valid] = batch.loss_mask[target_index[valid]]
    mask, packed = None, None
    if backend == "local":
        mask = block_causal_mask(lens, total)
    else:
        packed = packed_seq_params(lens, total)
    return MicroBatch(samples=list(samples), input_ids=input_ids[None], position_ids=positions[None],
                      attention_mask=mask, packed_seq_params=packed, targets=targets,
                      target_index=target_index, response=response,
                      num_response_tokens=int(response.sum()))


def packed_seq_params(seq_lens: list[int], total: int):
    """THD metadata for Transformer Engine attention; the pad tail is one extra sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lens = list(seq_lens) + ([total - sum(seq_lens)] if total > sum(seq_lens) else [])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    if torch.cuda.is_available():
        cu = cu.cuda()
    longest = max(lens) if lens else 0
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
