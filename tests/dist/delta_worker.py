"""torchrun worker for tests/credit/test_delta_dist.py (gloo, CPU).

Every rank builds the same global rollout batch (float64), computes the single-process reference
``delta_reference`` over all tokens, then runs ``DeltaEngine`` over its own shard, reduced over the
world group, for three layouts:

- dp: whole responses per rank (round robin);
- cp: each response split into 2·W chunks, rank r holds chunks r and 2W−1−r (Megatron's balanced CP);
- tp_seq: each rank holds a contiguous slice of every sequence (SP-sharded ``h``);

each in the three modes, plus ablations (top50/bottom50 selection via the distributed k-th value
search, within-side, hard assignment) and an fp32 run. With 4 ranks it also checks
``scope_group`` on megatron's parallel_state (TP=2 × DP=2). Each rank writes
``<out>/rank<r>.json``: {case: max |λ̄_rank − λ̄_ref| over its tokens} plus counts; the parent asserts.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from delta_megatron.credit.delta import DeltaConfig, DeltaCredit, DeltaEngine, scope_group
from tests.oracles.delta_reference import delta_reference

F64 = torch.float64


def global_batch(responses: int = 24, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 17, (responses,), generator=gen).tolist()  # ≥ 2·CP chunks for W ≤ 4
    seq_adv = torch.randn(responses, generator=gen, dtype=F64)
    seq_adv[::5] = 0.0  # Z0 responses
    seq = torch.repeat_interleave(torch.arange(responses), torch.tensor(lengths))
    n = len(seq)
    h = torch.randn(n, d, generator=gen, dtype=F64) + 0.4 * seq_adv[seq, None]
    logp = -torch.rand(n, generator=gen, dtype=F64) * 3
    mask = torch.rand(n, generator=gen) > 0.1
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return h, logp, seq_adv[seq], mask, starts


def shard(layout: str, starts: list[int], rank: int, world: int) -> list[torch.Tensor]:
    """Global token indices of this rank, as a list of micro-batch chunks."""
    spans = [torch.arange(starts[i], starts[i + 1]) for i in range(len(starts) - 1)]
    if layout == "dp":
        mine = [s for i, s in enumerate(spans) if i % world == rank]
    elif layout == "cp":
        mine = []
        for s in spans:
            parts = torch.tensor_split(s, 2 * world)
            mine.append(torch.cat([parts[rank], parts[2 * world - 1 - rank]]))
    elif layout == "tp_seq":
        mine = [torch.tensor_split(s, world)[rank] for s in spans]
    else:
        raise ValueError(layout)
    # three micro-batches of consecutive local sequences (the last may be empty on small shards)
    return [torch.cat(part) if part else torch.zeros(0, dtype=torch.long)
            for part in (mine[0::3], mine[1::3], mine[2::3])]


def run(cfg: DeltaConfig, chunks, h, logp, adv, mask, group, dtype=F64) -> tuple[torch.Tensor, dict]:
    engine = DeltaEngine(cfg, h.shape[1], group)
    for p in engine.data_passes():
        for key, idx in enumerate(chunks):
            engine.observe(p, key, h=h[idx].to(dtype), logp=logp[idx].to(dtype), adv=adv[idx].to(dtype),
                           mask=mask[idx])
        engine.end_pass(p)
    return torch.cat([engine.values(k) for k in range(len(chunks))]), engine.metrics


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.dtype == torch.bool:
        return float((got != ref).sum())
    return float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    world_group = dist.group.WORLD
    h, logp, adv, mask, starts = global_batch()
    v = (-torch.expm1(logp))[:, None] * h
    result: dict[str, float] = {}
    cases = {f"{m}": DeltaConfig(mode=m) for m in ("cache", "moments", "recompute")}
    cases.update({
        "recompute_K3": DeltaConfig(mode="recompute", K=3),
        "moments_K0": DeltaConfig(mode="moments", K=0),
        "cache_within": DeltaConfig(within_side_only=True, K=2),
        "cache_hard": DeltaConfig(hard_assignment=True),
        "moments_top50": DeltaConfig(mode="moments", selection="top50"),
        "recompute_bottom50": DeltaConfig(mode="recompute", selection="bottom50"),
    })
    for layout in ("dp", "cp", "tp_seq"):
        chunks = shard(layout, starts, rank, world)
        idx = torch.cat(chunks)
        by_mode = {}
        for name, cfg in cases.items():
            ref = delta_reference(v, adv, mask, cfg)
            got, metrics = run(cfg, chunks, h, logp, adv, mask, world_group)
            result[f"{layout}/{name}"] = err(got, ref[idx])
            by_mode[name] = got
            if name == "cache":
                result[f"{layout}/n_pos"] = metrics["delta/n_pos"]
        for name in ("moments", "recompute"):  # the three modes agree with each other directly
            result[f"{layout}/cache_vs_{name}"] = err(by_mode["cache"], by_mode[name])
        got32, _ = run(DeltaConfig(), chunks, h, logp, adv, mask, world_group, torch.float32)
        result[f"{layout}/fp32"] = err(got32, delta_reference(v, adv, mask, DeltaConfig())[idx])
        # dp_shard scope ([C]): this rank's tokens alone (group None) equal the reference on them
        local, _ = run(DeltaConfig(scope="dp_shard"), chunks, h, logp, adv, mask, None)
        result[f"{layout}/local_scope"] = err(local, delta_reference(v[idx], adv[idx], mask[idx],
                                                                     DeltaConfig()))
        result[f"{layout}/local_vs_global"] = err(local, by_mode["cache"])  # must differ
    result["n_pos_ref"] = float(((adv > 0) & mask).sum())
    if world == 4:
        result.update(megatron_scope_groups(h, logp, adv, mask, starts, v))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


def megatron_scope_groups(h, logp, adv, mask, starts, v) -> dict[str, float]:
    """scope_group() on megatron's parallel_state with TP=2, DP=2 (CP=1)."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    out: dict[str, float] = {}
    cfg = DeltaConfig()
    ref = delta_reference(v, adv, mask, cfg)
    responses = shard("dp", starts, dp_rank, dp)  # this DP rank's responses (3 micro-batches)
    # SP-sharded h: each TP rank holds half of every micro-batch's tokens -> reduce over DP×TP
    sp_chunks = [torch.tensor_split(c, tp)[tp_rank] for c in responses]
    idx = torch.cat(sp_chunks)
    got, m = run(cfg, sp_chunks, h, logp, adv, mask, scope_group("global", h_sequence_sharded=True))
    out["mcore/global_sp"] = err(got, ref[idx])
    out["mcore/global_sp_n_pos"] = m["delta/n_pos"]
    # gathered h: both TP ranks see the same tokens -> reduce over DP only (no double counting)
    idx = torch.cat(responses)
    got, m = run(cfg, responses, h, logp, adv, mask, scope_group("global", h_sequence_sharded=False))
    out["mcore/global_gathered"] = err(got, ref[idx])
    out["mcore/global_gathered_n_pos"] = m["delta/n_pos"]
    # dp_shard scope ([C]): statistics over this DP rank's responses only
    shard_cfg = DeltaConfig(scope="dp_shard")
    shard_ref = delta_reference(v[idx], adv[idx], mask[idx], shard_cfg)
    sp_idx = torch.cat(sp_chunks)
    group = DeltaCredit(shard_cfg).process_group(h_sequence_sharded=True)  # = scope_group("dp_shard", ..)
    got, _ = run(shard_cfg, sp_chunks, h, logp, adv, mask, group)
    pos = {int(t): i for i, t in enumerate(idx)}
    out["mcore/dp_shard_sp"] = err(got, shard_ref[[pos[int(t)] for t in sp_idx]])
    out["mcore/group_sizes"] = float(dist.get_world_size(scope_group("global", h_sequence_sharded=True))
                                     * 10 + dist.get_world_size(scope_group("global", h_sequence_sharded=False)))
    ps.destroy_model_parallel()
    return out


if __name__ == "__main__":
    main(sys.argv[1])
