"""Unsharded reference for the actor tests, written against transformers only (no megatron).

Everything the Megatron actor computes for a RolloutBatch, redone per sequence with the HF model:
per-token ``log p``, entropy and the LM-head input ``h`` (``last_hidden_state``: after the final
norm), DelTA λ̄ by the literal ``delta_reference`` on ``v = (1 − p) h``, and the PPO train step
(DAPO-style clip-higher + dual clip, token-mean over each mini-batch, λ̄ as loss weight, grad-norm
clipping, Adam) with ``torch.optim.Adam``.

Alignment follows RolloutBatch: the value at flat index ``t`` describes ``tokens[t]`` given the
tokens before it; the first token of each sequence has no prediction (0 there).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from delta_megatron.algo.fipo import fipo_loss
from delta_megatron.algo.kl import kl_penalty
from delta_megatron.batch import RolloutBatch
from delta_megatron.credit.delta import DeltaConfig
from tests.oracles.delta_reference import delta_reference


def capture_for(*credits, entropy: bool = False):
    """The old-log-prob capture a credit pipeline would build for ``credits`` (fresh observers)."""
    from delta_megatron.credit_contract import Capture

    return Capture.union([c.needs for c in credits], [c.observer() for c in credits if c.needs.hidden],
                         entropy=entropy)


@dataclass
class TokenRef:
    logp: torch.Tensor  # [T] log p(tokens[t] | tokens[<t]) at temperature T
    entropy: torch.Tensor  # [T] entropy of the distribution that predicts tokens[t]
    hidden: torch.Tensor  # [T, d] LM-head input at the position that predicts tokens[t]
    has_target: torch.Tensor  # [T] bool: not the first token of its sequence


def _sequences(batch: RolloutBatch) -> list[tuple[int, int]]:
    return list(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()))


def token_stats(model, batch: RolloutBatch, temperature: float = 1.0, grad: bool = False) -> TokenRef:
    """Per-token log p / entropy / h of ``batch`` under the HF ``model`` (each sequence alone)."""
    d = model.config.hidden_size
    logp = torch.zeros(batch.num_tokens)
    entropy = torch.zeros(batch.num_tokens)
    hidden = torch.zeros(batch.num_tokens, d)
    has_target = torch.zeros(batch.num_tokens, dtype=torch.bool)
    logp_parts = []
    with torch.set_grad_enabled(grad):
        for s, e in _sequences(batch):
            ids = batch.tokens[s:e].unsqueeze(0)
            h = model.model(input_ids=ids).last_hidden_state[0]  # [n, d], post final norm
            logits = model.lm_head(h) / temperature  # [n, V]
            lsm = torch.log_softmax(logits.float(), dim=-1)
            lp = lsm[:-1].gather(1, ids[0, 1:, None])[:, 0]  # [n-1]
            logp_parts.append((s, lp))
            entropy[s + 1:e] = -(lsm[:-1].exp() * lsm[:-1]).sum(-1).detach()
            hidden[s + 1:e] = h[:-1].detach()
            has_target[s + 1:e] = True
    if grad:  # differentiable flat log p
        pieces, last = [], 0
        for s, lp in logp_parts:
            pieces.append(torch.zeros(s + 1 - last))
            pieces.append(lp)
            last = s + 1 + lp.numel()
        pieces.append(torch.zeros(batch.num_tokens - last))
        logp = torch.cat(pieces)
    else:
        for s, lp in logp_parts:
            logp[s + 1:s + 1 + lp.numel()] = lp
    return TokenRef(logp=logp, entropy=entropy, hidden=hidden, has_target=has_target)


def delta_lambda(ref: TokenRef, batch: RolloutBatch, cfg: DeltaConfig) -> torch.Tensor:
    """λ̄ [T] of the literal single-process DelTA on v = (1 − p(y)) h over all loss tokens."""
    v = (-torch.expm1(ref.logp.double())).unsqueeze(-1) * ref.hidden.double()  # [T, d]
    lam = delta_reference(v.float(), batch["advantage_tokens"], batch.loss_mask, cfg)
    return lam.float()


def delta_lambda_topk(model, ref: TokenRef, batch: RolloutBatch, cfg: DeltaConfig,
                      temperature: float = 1.0) -> torch.Tensor:
    """λ̄ [T] of the literal DelTA on the top-K hidden-gradient proxy v̂ (§2.2): global top-K of
    ``lm_head(h) / T`` per token, v̂ = W_y − Σ_K softmax(top-K) W_j, from HF's own LM head."""
    weight = model.lm_head.weight.detach().double()  # [V, d]
    logits = ref.hidden.double() @ weight.T / temperature  # [T, V]
    top = logits.topk(cfg.topk_k, dim=-1)
    probs = torch.softmax(top.values, dim=-1)  # [T, K]
    v = weight[batch.tokens] - torch.einsum("tk,tkd->td", probs, weight[top.indices])  # y_t = tokens[t]
    lam = delta_reference(v.float(), batch["advantage_tokens"], batch.loss_mask, cfg)
    return lam.float()


def reference_run(hf_dir, *, topk: int | None = None) -> SimpleNamespace:
    """What the actor tests compare against, from the HF checkpoint alone: the test batch, its token
    statistics, DelTA λ̄ (and, with ``topk``, λ̄ on the top-K proxy) and one PPO step weighted by λ̄."""
    from tests.dist.actor_worker import load_hf, make_batch, make_config

    cfg = make_config(hf_dir)
    model = load_hf(hf_dir)
    batch = make_batch()
    tokens = token_stats(model, batch)
    lam = delta_lambda(tokens, batch, cfg.credit.delta)
    lam_topk = None if topk is None else delta_lambda_topk(
        model, tokens, batch, DeltaConfig(proxy="topk_hidden", topk_k=topk))
    return SimpleNamespace(model=model, batch=batch, tokens=tokens, lam=lam, lam_topk=lam_topk,
                           train=train_step(model, batch, tokens.logp, lam, cfg))


def minibatch_plan(batch: RolloutBatch, mini_batches: int) -> list[list[int]]:
    """Mini-batches as contiguous runs of prompt groups (groups are contiguous in the test batch)."""
    groups = batch["group_id"].tolist()
    order = sorted(set(groups), key=groups.index)
    bounds = [round(len(order) * k / mini_batches) for k in range(mini_batches + 1)]
    return [[i for i, g in enumerate(groups) if g in order[bounds[k]:bounds[k + 1]]]
            for k in range(mini_batches)]


@dataclass
class TrainRef:
    state_dict: dict[str, torch.Tensor]  # HF weights after the step
    grad_norms: list[float]  # pre-clip global grad norm per mini-batch
    ppo_kl: list[float]  # token-mean (logp_old − logp) per mini-batch
    model: object  # the updated HF model
    kl_loss: list[float] = field(default_factory=list)  # token-mean KL penalty per mini-batch


def ppo_token_loss(logp, logp_old, adv, clip_low, clip_high, dual_c):
    """−A·r clipped (DAPO clip-higher) with the dual clip bound for A < 0, per token."""
    ratio = torch.exp(torch.clamp(logp - logp_old, -20.0, 20.0))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_c), loss)
    return loss


def train_step(model, batch: RolloutBatch, logp_old: torch.Tensor, weight: torch.Tensor | None,
               cfg, ref_logp: torch.Tensor | None = None, loss_fn=None) -> TrainRef:
    """One rollout batch of PPO (one epoch, ``cfg.train.mini_batches`` Adam steps) on a copy of
    ``model``. ``cfg`` is the actor's Config (lr, betas, eps, clip, loss and KL settings); with
    ``ref_logp`` the token-mean KL penalty ``cfg.algo.kl`` is added. ``loss_fn(cur, mask)`` replaces
    the DAPO loss: the mini-batch loss from the differentiable log p ``cur`` [T] and its tokens ``mask``."""
    model = copy.deepcopy(model).train()
    tr, loss_cfg = cfg.train, cfg.algo.loss
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    opt = torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.adam_betas), eps=tr.adam_eps,
                           weight_decay=tr.weight_decay)
    adv = batch["advantage_tokens"]
    norms, kls, kl_losses = [], [], []
    for mini in minibatch_plan(batch, tr.mini_batches):
        sel = torch.zeros(batch.num_tokens, dtype=torch.bool)
        sel[batch.token_indices(mini)] = True
        mask = sel & batch.loss_mask
        n = float(mask.sum())
        opt.zero_grad()
        cur = token_stats(model, batch, cfg.rollout.temperature, grad=True).logp
        if loss_fn is not None:
            loss = loss_fn(cur, mask)
        else:
            tok = ppo_token_loss(cur[mask], logp_old[mask], adv[mask], loss_cfg.clip_low,
                                 loss_cfg.clip_high, loss_cfg.dual_clip_c)
            if weight is not None:
                tok = tok * weight[mask]
            loss = tok.sum() / n
        if ref_logp is not None:
            kl = kl_penalty(cur[mask], ref_logp[mask], cfg.algo.kl.estimator)
            kl_losses.append(float(kl.detach().sum() / n))
            loss = loss + cfg.algo.kl.coef * kl.sum() / n
        loss.backward()
        kls.append(float((logp_old[mask] - cur[mask].detach()).sum() / n))
        if tr.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)))
        else:
            norms.append(float(torch.norm(torch.stack([p.grad.norm() for p in params]))))
        opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainRef(state_dict=sd, grad_norms=norms, ppo_kl=kls, model=model.eval(), kl_loss=kl_losses)


def score_sums(model, seqs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Σ log p(y_t | y_<t) over the marked positions of each sequence (float64)."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    with torch.no_grad():
        for i, (s, m) in enumerate(zip(seqs, masks)):
            lsm = torch.log_softmax(model(s.unsqueeze(0)).logits[0].float(), dim=-1)
            lp = torch.zeros(len(s))
            lp[1:] = lsm[:-1].gather(1, s[1:, None])[:, 0]
            out[i] = lp[m.bool()].double().sum()
    return out


def fidelity_loss(batch, logp_old: torch.Tensor, logp_rollout: torch.Tensor, cfg):
    """The whole-mini-batch reference of fidelity.md §1 + §5: FIPO token losses and sequence filter,
    TIS weight min(ρ, 2) and the geometric-mean mask [0.5, 2], token-mean over the kept tokens."""
    adv, loss_cfg = batch["advantage_tokens"], cfg.algo.loss

    def loss_fn(cur: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seq = torch.unique(batch.seq_index[mask], return_inverse=True)[1]
        n = int(seq.max()) + 1
        out, keep = fipo_loss(cur[mask], logp_old[mask], adv[mask], torch.ones(len(seq), dtype=torch.bool), seq, n,
                              loss_cfg.fipo, loss_cfg.clip_low, loss_cfg.clip_high, loss_cfg.dual_clip_c)
        log_rho = (logp_old - logp_rollout)[mask].double()
        mean = torch.zeros(n, dtype=torch.float64).index_add(0, seq, log_rho) / torch.bincount(seq, minlength=n)
        keep = keep & (mean >= math.log(0.5))[seq] & (mean <= math.log(2.0))[seq]
        return (out.loss * log_rho.exp().clamp(max=2.0).float() * keep).sum() / keep.sum()

    return loss_fn


def fidelity_step(model, batch: RolloutBatch, logp: torch.Tensor) -> TrainRef:
    """The HF step of the actor tests' FIPO + seq-mask-tis run (``actor_worker.fidelity_fields`` on the
    old-policy log-probs ``logp``), with :func:`fidelity_loss` per mini-batch."""
    from tests.dist.actor_worker import FIDELITY, fidelity_fields, make_config

    cfg = make_config(None, FIDELITY)
    old, rollout = fidelity_fields(batch, logp)
    return train_step(model, batch, old, None, cfg, loss_fn=fidelity_loss(batch, old, rollout, cfg))
