"""THD + CP micro-batches against megatron's own THD RoPE: on every CP rank, megatron's
``_apply_rotary_pos_emb_thd`` (given the micro-batch's global ``cu_seqlens`` and the CP group) must
rotate each local real token by the angle of its true position in its sequence. A wrong chunk
layout (order, padding, offsets) rotates tokens by other positions' angles."""

import sys

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

from delta_megatron.actor.microbatch import build_microbatch
from delta_megatron.batch import RolloutBatch

DIM = 8


def rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference RoPE (non-interleaved halves) of rows ``x`` [n, DIM] at positions ``pos`` [n]."""
    inv = 1.0 / 10000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[:, : DIM // 2], x[:, DIM // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def main(pad_multiple: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(5)]
    resps = [torch.randint(3, 50, (int(torch.randint(1, 17, (1,), generator=g)),), generator=g).tolist()
             for _ in range(5)]
    batch = RolloutBatch.from_samples(prompts, resps)
    mb = build_microbatch(batch, [0, 2, 3, 4], pad_multiple, backend="te", cp_size=world, cp_rank=rank)
    cu = mb.packed_seq_params.cu_seqlens_q_padded.cpu()  # what megatron's THD RoPE reads under CP
    assert mb.seq_len * world == int(cu[-1]) and mb.seq_len % pad_multiple == 0
    max_len = int((cu[1:] - cu[:-1]).max())
    inv = 1.0 / 10000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
    freqs = torch.cat([ang, ang], -1)[:, None, None, :]  # [max_s, 1, 1, DIM], megatron's layout
    x = torch.ones(mb.seq_len, 1, DIM, dtype=torch.float64)
    got = _apply_rotary_pos_emb_thd(x, cu, freqs, cp_group=dist.group.WORLD)[:, 0]
    real = mb.input_ids[0] != 0  # pad id 0; real tokens are >= 3
    want = rotate(x[:, 0], mb.position_ids[0])
    err = float((got[real] - want[real]).abs().max())
    assert err < 1e-12, (rank, err)
    # the ranks' real tokens together are the micro-batch's tokens, each once
    tokens = torch.zeros(batch.num_tokens, dtype=torch.long)
    valid = mb.target_index >= 0
    tokens[mb.target_index[valid]] += 1
    dist.all_reduce(tokens)
    want_targets = build_microbatch(batch, [0, 2, 3, 4], backend="te").target_index
    expected = torch.zeros(batch.num_tokens, dtype=torch.long)
    expected[want_targets[want_targets >= 0]] = 1
    assert torch.equal(tokens, expected), (rank, tokens, expected)
    if rank == 0:
        print("ok", int(real.sum()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
