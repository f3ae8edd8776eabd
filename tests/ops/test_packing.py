"""Packing layout: offsets, padding, restarting positions, the block-diagonal causal mask, next-token
targets, unpacking, THD PackedSeqParams and the load-balanced CP split. (That megatron's local
attention honours the mask — packed logits == each sequence alone — is tested in tests/models.)"""

from __future__ import annotations

import pytest
import torch

from delta_megatron.ops.packing import cp_partition_index, pack_sequences, packing_alignment

SEQS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


def test_layout_positions_targets_unpack():
    pk = pack_sequences(SEQS, align=4, pad_id=0)
    assert pk.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert pk.cu_seqlens_padded.tolist() == [0, 4, 8, 16]
    assert pk.input_ids.tolist() == [[5, 6, 7, 0, 8, 9, 0, 0, 10, 11, 12, 13, 14, 0, 0, 0]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert pk.next_token_targets().tolist() == [
        [6, 7, -1, -1, 9, -1, -1, -1, 11, 12, 13, 14, -1, -1, -1, -1]]
    assert [t.tolist() for t in pk.unpack(pk.input_ids)] == SEQS
    assert [t.tolist() for t in pk.unpack(pk.input_ids[0])] == SEQS
    assert pk.input_ids[0, pk.token_index()].tolist() == sum(SEQS, [])


def test_block_causal_mask_equals_per_sequence_causal_masks():
    pk = pack_sequences(SEQS, align=2)
    mask = pk.attention_mask
    assert mask.shape == (1, 1, pk.total_len, pk.total_len) and mask.dtype == torch.bool
    expected = torch.ones(pk.total_len, pk.total_len, dtype=torch.bool)  # True = masked
    for a, b in zip(pk.cu_seqlens_padded[:-1].tolist(), pk.cu_seqlens_padded[1:].tolist()):
        n = b - a
        expected[a:b, a:b] = ~torch.tril(torch.ones(n, n, dtype=torch.bool))
    assert torch.equal(mask[0, 0], expected)


def test_te_backend_builds_thd_params_without_mask():
    pk = pack_sequences(SEQS, "te", align=packing_alignment(tp=2, cp=2))
    psp = pk.packed_seq_params
    assert pk.attention_mask is None and psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == [0, 3, 5, 10] and psp.cu_seqlens_q.dtype == torch.int32
    assert psp.cu_seqlens_q_padded.tolist() == [0, 8, 16, 24]  # multiples of TP*CP*2 = 8
    assert psp.max_seqlen_q == 8 and torch.equal(psp.cu_seqlens_kv_padded, psp.cu_seqlens_q_padded)
    assert pk.forward_kwargs()["packed_seq_params"] is psp


def test_alignment_rules():
    assert packing_alignment() == 1
    assert packing_alignment(tp=4, sequence_parallel=True) == 4
    assert packing_alignment(tp=2, cp=4) == 16


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_cp_partition_is_load_balanced_permutation(cp):
    pk = pack_sequences(SEQS, "te", align=2 * cp)
    parts = [cp_partition_index(pk.cu_seqlens_padded, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(pk.total_len))
    for r, idx in enumerate(parts):
        for a, b in zip(pk.cu_seqlens_padded[:-1].tolist(), pk.cu_seqlens_padded[1:].tolist()):
            c = (b - a) // (2 * cp)
            mine = idx[(idx >= a) & (idx < b)]  # chunks r and 2cp-1-r of this sequence, in order
            want = list(range(a + r * c, a + (r + 1) * c)) + \
                list(range(a + (2 * cp - 1 - r) * c, a + (2 * cp - r) * c))
            assert mine.tolist() == want


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_sequences([])
    with pytest.raises(ValueError):
        pack_sequences([[1], []])
    with pytest.raises(ValueError):
        cp_partition_index(torch.tensor([0, 3]), 2, 0)
