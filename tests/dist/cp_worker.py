"""CP token-sharding worker: the log-prob stage, DelTA and the loss on CP chunks (chunk r and 2CP−1−r
of every sequence) with statistics and losses reduced over the CP group. Attention itself is not
sharded (megatron's CP attention needs TE): every rank runs the same tiny LM over whole sequences and
keeps only its chunks, which is exactly what the per-token stages see under real CP. The same launch runs the fidelity.md
worked examples under CP and DP splits (``tests/dist/fidelity_cases.py``)."""

import sys

import torch
import torch.distributed as dist

from delta_megatron.algo import AlgoConfig, LossNormalizer, PolicyLossInputs, policy_loss
from delta_megatron.batch import RolloutBatch, cp_split
from delta_megatron.credit.delta import DeltaConfig, DeltaEngine
from delta_megatron.ops.logprob import chunked_logprob_from_hidden
from delta_megatron.utils.configs import apply_overrides
from tests.dist.fidelity_cases import fidelity_errors

D, V = 16, 40


def make_problem():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
               for _ in range(10)]
    resps = [torch.randint(3, V, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
             for _ in range(10)]
    batch = RolloutBatch.from_samples(prompts, resps, group_id=torch.arange(10) // 5)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, -0.4, 0.9, -0.2, 1.1, -0.8])
    embed = torch.randn(V, D, generator=g, dtype=torch.float64)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    head = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    return batch, adv, embed, mix, head


def hidden_states(batch, embed, mix):
    """A causal toy LM: h_t = tanh(mean of embeddings up to t @ mix), per sequence. [T, D]"""
    out = torch.zeros(batch.num_tokens, D, dtype=torch.float64)
    for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        x = embed[batch.tokens[s:e]]
        out[s:e] = torch.tanh((x.cumsum(0) / torch.arange(1, e - s + 1)[:, None]) @ mix)
    return out


def run(batch, adv, embed, mix, head, token_index, group, loss_name):
    """Per-token stages over the tokens ``token_index`` (−1 = padding) of the batch."""
    h_all = hidden_states(batch, embed, mix)
    valid = token_index >= 0
    idx = token_index[valid]
    # target of token j is the next token of its sequence; responses only
    nxt = idx + 1
    same = (nxt < batch.num_tokens) & (batch.seq_index[nxt.clamp(max=batch.num_tokens - 1)] == batch.seq_index[idx])
    nxt = torch.where(same, nxt, torch.full_like(nxt, -1))
    resp = torch.zeros_like(same)
    resp[same] = batch.response_mask[nxt[same]]
    rows = resp.nonzero().flatten()
    tgt = nxt[rows]
    w = head.clone().requires_grad_(True)
    lp = chunked_logprob_from_hidden(h_all[idx[rows]], w, batch.tokens[tgt], None, 7).logp
    adv_tok = adv[batch.seq_index[tgt]]
    engine = DeltaEngine(DeltaConfig(mode="cache"), D, group)
    for p in engine.data_passes():
        engine.observe(p, 0, h=h_all[idx[rows]], logp=lp.detach(), adv=adv_tok,
                       mask=torch.ones(len(rows), dtype=torch.bool))
        engine.end_pass(p)
    lam = engine.values(0)
    cfg = apply_overrides(AlgoConfig(), [f"loss.name={loss_name}"])
    # one sequence numbering shared by the CP group (a rank may hold no token of a short sequence)
    lens = torch.bincount(batch.seq_index[batch.response_mask], minlength=batch.num_seqs)
    norm = LossNormalizer(float(batch.response_mask.sum()), float(batch.num_seqs))
    shifted = lp.detach() + 0.05 * torch.sin(tgt.double())  # an "old policy" a little off
    loss, _ = policy_loss(cfg, PolicyLossInputs(
        logp=lp, logp_old=shifted, advantages=adv_tok, mask=torch.ones(len(rows), dtype=torch.bool),
        seq_index=batch.seq_index[tgt], seq_lengths=lens, num_seqs=batch.num_seqs, normalizer=norm,
        token_weight=lam, cp_group=group, token_index=tgt))
    loss.backward()
    full_lp = torch.zeros(batch.num_tokens, dtype=torch.float64)
    full_lam = torch.zeros(batch.num_tokens, dtype=torch.float64)
    full_lp[tgt] = lp.detach()
    full_lam[tgt] = lam
    grad = w.grad.clone()
    loss = loss.detach().clone()
    if group is not None:
        for t in (full_lp, full_lam, grad, loss):
            dist.all_reduce(t, group=group)
    return full_lp, full_lam, grad, loss


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch, adv, embed, mix, head = make_problem()
    results = {}
    for loss_name in ("ppo", "gspo", "fipo"):
        ref = run(batch, adv, embed, mix, head, torch.arange(batch.num_tokens), None, loss_name)
        shard = cp_split(batch, world, rank)
        got = run(batch, adv, embed, mix, head, shard.token_index, dist.group.WORLD, loss_name)
        results[loss_name] = [float((a - b).abs().max()) for a, b in zip(ref, got)]
    results = {"cp": results, "fidelity": fidelity_errors(rank, world, dist.group.WORLD)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
