"""Context-parallel micro-batches (TE THD layout): per-sequence 2·CP padding, chunks r and 2·CP−1−r per
rank, global cu_seqlens — checked against megatron's own THD RoPE on 2 and 4 gloo ranks, and for
coverage and shapes in one process. (CP attention itself needs TE: tests/models/test_gpu.py.)"""

import pytest
import torch

from delta_megatron.actor.microbatch import build_microbatch, padded_row_length
from delta_megatron.batch import RolloutBatch
from tests.dist.mg_common import torchrun


def _batch() -> RolloutBatch:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    resps = [torch.randint(3, 50, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g).tolist()
             for _ in range(6)]
    return RolloutBatch.from_samples(prompts, resps)


@pytest.mark.parametrize("cp,tp", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_cp_ranks_split_one_row_and_cover_every_target_once(cp, tp):
    batch, samples = _batch(), [0, 1, 3, 5]
    whole = build_microbatch(batch, samples, backend="te")
    ranks = [build_microbatch(batch, samples, tp, backend="te", cp_size=cp, cp_rank=r) for r in range(cp)]
    psp = ranks[0].packed_seq_params
    cu, real_cu = psp.cu_seqlens_q_padded.cpu(), psp.cu_seqlens_q.cpu()
    seg = (cu[1:] - cu[:-1]).tolist()
    assert all(n % (2 * cp * tp) == 0 for n in seg)  # 2·CP chunks per sequence, each a multiple of TP
    assert int(cu[-1]) >= padded_row_length(batch.seq_lens[samples].tolist(), cp, tp)
    real = (real_cu[1:] - real_cu[:-1]).tolist()
    assert real[:len(samples)] == batch.seq_lens[samples].tolist()  # TE sees the real lengths
    assert all(r <= p for r, p in zip(real, seg))
    for mb in ranks:
        assert mb.seq_len * cp == int(cu[-1]) and mb.seq_len % tp == 0
        valid = mb.target_index >= 0
        assert torch.equal(mb.targets[valid], batch.tokens[mb.target_index[valid]])
        assert (mb.targets[~valid] == -1).all()
    counts = torch.zeros(batch.num_tokens, dtype=torch.long)
    for mb in ranks:
        counts[mb.target_index[mb.target_index >= 0]] += 1
    expected = torch.zeros(batch.num_tokens, dtype=torch.long)
    expected[whole.target_index[whole.target_index >= 0]] = 1
    assert torch.equal(counts, expected)
    assert sum(mb.num_response_tokens for mb in ranks) == whole.num_response_tokens


def test_cp_needs_the_te_backend():
    with pytest.raises(ValueError, match="Transformer Engine"):
        build_microbatch(_batch(), [0, 1], backend="local", cp_size=2, cp_rank=0)


@pytest.mark.dist
@pytest.mark.parametrize("cp,tp", [(2, 1), (4, 2)])
def test_cp_layout_matches_megatron_thd_rope(cp, tp):
    assert "ok" in torchrun("cp_rope_worker.py", cp, [str(tp)], timeout=120)
