"""The Megatron actor: old-log-prob pass with capture and PPO training, generic in the credit method.

Data layout. Either every rank holds the whole RolloutBatch, cut into PPO mini-batches by prompt
group, each mini-batch split over DP ranks by length (:func:`balanced_partition`); or
(``data_sharded``, the trainer's :mod:`~delta_megatron.dataflow`) a rank holds its replica's prompt
groups only, each tagged with its mini-batch, and global counts (loss normalisers) are summed over DP.
Each DP shard is cut into token-budget micro-batches. The old-log-prob
pass covers a rank's train shards, packed shard by shard like the train pass, so the per-token
fields it writes (``logp_old``, ``entropy``, observer fields) are exactly the ones that rank's train
pass reads; ``owned`` marks them, entries of other ranks' tokens stay 0. Splits depend only on the
batch and the layout, so every TP/PP peer builds the same micro-batches.

Credit methods (``credit_contract``). The actor imports no credit method: it records what the
``Capture`` asks for, shows each ``HeadObserver`` a ``HeadView`` per micro-batch on the last pipeline
stage (``h``, log-probs, top-K, the LM-head weight shard, process groups) from the same chunked
vocab-parallel kernel that produces ``logp_old``, repeats forward-only passes while an observer asks
for them, and in training reads the ``LossPlan``'s fields and selector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist

from delta_megatron.actor.config import ActorConfig
from delta_megatron.actor.microbatch import MicroBatch, build_microbatch, padded_row_length
from delta_megatron.actor.offload import ActorOffload
from delta_megatron.actor.optimizer import build_optimizer, wrap_ddp
from delta_megatron.algo import PolicyLossInputs, policy_loss
from delta_megatron.algo.aggregation import LossNormalizer, kept_scale
from delta_megatron.algo.policy_loss import metric_names
from delta_megatron.algo.rollout_correction import mismatch_metrics
from delta_megatron.batch import RolloutBatch, balanced_partition
from delta_megatron.credit_contract import Capture, HeadView, LossPlan
from delta_megatron.models.gpt import (
    build_model_chunks,
    output_weight,
    resolve_layer_spec,
    return_hidden,
    unwrap,
    use_deterministic_kernels,
)
from delta_megatron.ops.logprob import chunked_logprob_from_hidden
from delta_megatron.parallel import Groups, get_groups


class MegatronActor:
    def __init__(self, cfg: ActorConfig, groups: Groups | None = None, total_optimizer_steps: int | None = None,
                 data_sharded: bool = False):
        from megatron.core.distributed import finalize_model_grads

        self.cfg = cfg
        self.data_sharded = data_sharded
        self.groups = groups or get_groups()
        self.backend = resolve_layer_spec(cfg.parallel)
        self.sp = cfg.parallel.sequence_parallel and cfg.parallel.tp > 1
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if cfg.train.deterministic:
            use_deterministic_kernels()
        chunks = build_model_chunks(cfg.model, cfg.parallel, config_overrides={
            "calculate_per_token_loss": True, "deterministic_mode": cfg.train.deterministic,
            **cfg.train.recompute_overrides()})
        self.model = wrap_ddp(chunks, cfg.parallel)
        steps = total_optimizer_steps or cfg.train.steps * cfg.train.mini_batches * cfg.train.ppo_epochs
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.model, cfg.parallel, cfg.train, steps)
        config = unwrap(self.model[0]).config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.pad_multiple = cfg.parallel.tp if self.sp else 1
        self.optimizer_steps = 0
        # KL reference = the policy as built (HF weights or the seeded init). Taken before any
        # checkpoint load, so a resumed run keeps the original reference (checkpoints hold the policy).
        self._reference = self._snapshot() if cfg.algo.kl.estimator != "none" else None
        self._offload = ActorOffload(self.model, self.optimizer)

    # ------------------------------------------------------------------ colocation (lifecycle.py)
    def offload(self, parts=("optimizer", "grads")) -> None:
        """Move ``parts`` (weights, grads, optimizer) off the device for a colocated rollout engine;
        pinned host copies, bit-exact on the way back (actor/offload.py)."""
        self._offload.offload(parts)

    def onload(self, parts=None) -> None:
        """Bring offloaded parts (all by default) back to the device."""
        self._offload.onload(parts)

    def resident_bytes(self) -> dict[str, int]:
        """Device bytes of weights / grads / optimizer now, measured from the tensors."""
        return self._offload.resident_bytes()

    @property
    def offloaded(self) -> set[str]:
        return set(self._offload.offloaded)

    def _require(self, what: str, *parts: str) -> None:
        away = sorted(set(parts) & self._offload.offloaded)
        if away:
            raise RuntimeError(f"MegatronActor.{what}: {', '.join(away)} offloaded; onload first "
                               "(the lifecycle does so on entering the train phase)")

    # ------------------------------------------------------------------ KL reference
    def _params(self) -> list[torch.Tensor]:
        return [p for chunk in self.model for p in chunk.parameters()]

    @torch.no_grad()
    def _snapshot(self) -> list[torch.Tensor]:
        offload = self.cfg.algo.kl.reference_offload
        return [p.detach().to("cpu" if offload else p.device, copy=True) for p in self._params()]

    @contextmanager
    def _reference_weights(self):
        """Swap the reference weights into the model's parameters (in place: megatron's DDP buffers
        and the optimizer keep their views) and restore the policy afterwards, even on error."""
        params, policy = self._params(), self._snapshot()
        try:
            with torch.no_grad():
                for p, r in zip(params, self._reference):
                    p.copy_(r)
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, policy):
                    p.copy_(c)

    @torch.no_grad()
    def ref_logprobs(self, batch: RolloutBatch) -> None:
        """Adds ``logp_ref``: log p(y_t) under the frozen reference (the initial policy), for the KL
        loss. One forward-only pass over this rank's tokens, like ``old_logprobs``."""
        if self._reference is None:
            raise RuntimeError("ref_logprobs: the actor keeps reference weights only when "
                               "algo.kl.estimator is not 'none'")
        with self._reference_weights():
            self.old_logprobs(batch, field="logp_ref")

    # ------------------------------------------------------------------ planning
    def minibatch_plan(self, batch: RolloutBatch) -> list[list[int]]:
        """PPO mini-batches (sample lists) cut along prompt groups, in batch order; with sharded data
        the ``minibatch`` field of this replica's samples says where each belongs."""
        if self.data_sharded:
            part = batch["minibatch"]
            return [(part == k).nonzero().flatten().tolist() for k in range(int(part.max()) + 1 if len(part) else 0)]
        groups = batch["group_id"] if "group_id" in batch else torch.arange(batch.num_seqs)
        _, first = torch.unique(groups, return_inverse=True)
        order = sorted(range(batch.num_seqs), key=lambda i: (int(first[i]), i))
        num_groups = int(first.max()) + 1 if batch.num_seqs else 0
        parts = min(self.cfg.train.mini_batches, max(num_groups, 1))
        bounds = [round(num_groups * k / parts) for k in range(parts + 1)]
        return [[i for i in order if bounds[k] <= int(first[i]) < bounds[k + 1]] for k in range(parts)]

    def local_shards(self, batch: RolloutBatch) -> list[list[int]]:
        """This rank's DP shard of each mini-batch."""
        if self.data_sharded:  # the batch is the shard
            return self.minibatch_plan(batch)
        lens = batch.seq_lens.tolist()
        shards = []
        for mini in self.minibatch_plan(batch):
            parts = balanced_partition([lens[i] for i in mini], self.groups.dp_size)
            shards.append([mini[j] for j in parts[self.groups.dp_rank]])
        return shards

    def _microbatches(self, batch: RolloutBatch, samples: list[int], budget: int) -> list[MicroBatch]:
        plan = batch.micro_batches(budget, samples)
        length = 1
        if self.cfg.parallel.vpp:  # interleaved 1F1B: a multiple of PP micro-batches (empty ones add
            plan += [[]] * (-len(plan) % self.cfg.parallel.pp)  # no token and no loss), all one length
            length = max(padded_row_length(batch.seq_lens[mb].tolist(), self.groups.cp_size, self.pad_multiple)
                         for mb in plan)  # (its p2p shapes are fixed)
        return [build_microbatch(batch, mb, self.pad_multiple, backend=self.backend, min_length=length,
                                 cp_size=self.groups.cp_size, cp_rank=self.groups.cp_rank) for mb in plan]

    # ------------------------------------------------------------------ running the schedule
    def _run(self, mbs: list[MicroBatch], loss_fn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not mbs:
            return []
        device = self.device

        def forward_step(data_iterator: Iterator[MicroBatch], model):
            mb = next(data_iterator)
            mask = None if mb.attention_mask is None else mb.attention_mask.to(device)
            with return_hidden(model):
                out = model(mb.input_ids.to(device), mb.position_ids.to(device), mask,
                            packed_seq_params=mb.packed_seq_params)
            return out, partial(loss_fn, mb)

        iters = [iter(mbs) for _ in self.model]
        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
                  model=self.model if len(self.model) > 1 else self.model[0],
                  num_microbatches=len(mbs), seq_length=max(mb.seq_len for mb in mbs),
                  micro_batch_size=1, forward_only=forward_only)

    def _lm_head(self, mb: MicroBatch, hidden: torch.Tensor, with_entropy: bool, top_k: int = 0):
        """Chunked vocab-parallel log p(y_t) (and H_t, the global top-K) of the row's targets."""
        last = unwrap(self.model[-1])
        return chunked_logprob_from_hidden(
            hidden.transpose(0, 1), output_weight(last), mb.targets.view(-1, 1).to(self.device),
            self.groups.tp, self.cfg.train.logprob_chunk_tokens,
            temperature=self.cfg.logprob_temperature, vocab_size=self.cfg.model.vocab_size,
            sequence_parallel=self.sp, with_entropy=with_entropy, top_k=top_k)

    def _logprobs(self, mb: MicroBatch, hidden: torch.Tensor, with_entropy: bool):
        """log p(y_t) and H_t (or None): ``[S]`` each."""
        out = self._lm_head(mb, hidden, with_entropy)
        ent = out.entropy.view(-1) if out.entropy is not None else None
        return out.logp.view(-1), ent

    def _local_rows(self, mb: MicroBatch) -> slice:
        """Rows of ``h`` this rank holds: its sequence-parallel shard, or all of them."""
        if not self.sp:
            return slice(0, mb.seq_len)
        size = mb.seq_len // self.groups.tp_size
        return slice(self.groups.tp_rank * size, (self.groups.tp_rank + 1) * size)

    # ------------------------------------------------------------------ old-log-prob pass
    @torch.no_grad()
    def old_logprobs(self, batch: RolloutBatch, capture: Capture | None = None,
                     field: str = "logp_old") -> dict[str, float]:
        """Adds ``logp_old`` (or ``field``), ``owned`` (the tokens this rank computed: its train
        shards' tokens), ``entropy`` when captured, and each observer's field. Observers see every
        micro-batch on the last pipeline stage and may ask for further forward-only passes (DelTA's
        moments / recompute modes). Returns the observers' metrics."""
        capture = capture or Capture()
        self._require("old_logprobs", "weights")
        for chunk in self.model:
            chunk.eval()
        # packed per train shard: with equal logprob/train budgets the micro-batches are the train
        # pass's, so the first mini-batch's ratio is exactly 1 (not 1 ± packing round-off)
        mbs = [mb for shard in self.local_shards(batch)
               for mb in self._microbatches(batch, shard, self.cfg.train.max_tokens_per_gpu_logprob)]
        mb_ids = {id(mb): i for i, mb in enumerate(mbs)}
        logp = torch.zeros(batch.num_tokens)
        owned = torch.zeros(batch.num_tokens, dtype=torch.bool)
        entropy = torch.zeros(batch.num_tokens) if capture.entropy else None
        observers = list(capture.observers) if self.groups.is_last_stage else []
        top_k = capture.topk if observers else 0
        head_weight = output_weight(unwrap(self.model[-1])) if observers else None
        for obs in observers:
            obs.begin(batch, hidden_size=self.cfg.model.hidden_size, groups=self.groups,
                      sequence_sharded=self.sp, device=self.device)

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor, p: int = 0):
            out = self._lm_head(mb, hidden, capture.entropy and p == 0, top_k=top_k)
            if p == 0:
                valid = mb.target_index >= 0
                logp[mb.target_index[valid]] = out.logp.view(-1).cpu()[valid]
                owned[mb.target_index[valid]] = True
                if entropy is not None:
                    entropy[mb.target_index[valid]] = out.entropy.view(-1).cpu()[valid]
            if observers:
                view = self._head_view(p, mb_ids[id(mb)], mb, hidden, out, head_weight)
                for obs in observers:
                    obs.observe(view)
            return torch.zeros((), device=self.device), torch.tensor(0, dtype=torch.int), {}

        p = 0
        while True:  # pass 0 is the log-prob pass itself; observers may ask for more
            self._run(mbs, partial(_call_with_pass, loss_fn, p), forward_only=True)
            more = torch.tensor([int(any([obs.end_pass(p) for obs in observers]))], dtype=torch.long)
            if not int(self._from_last_stage(more)[0]):  # the last stage decides for the pipeline
                break
            p += 1
        values = {obs.field: torch.zeros(batch.num_tokens) for obs in capture.observers}
        metrics: dict[str, float] = {}
        for obs in observers:
            for i, mb in enumerate(mbs):
                local = self._gather_tp_rows(mb, obs.values(i).float())
                valid = mb.target_index >= 0
                values[obs.field][mb.target_index[valid]] = local.cpu()[valid]
            metrics.update(obs.metrics())
        if self.groups.pp_size > 1:  # every stage holds the fields: credit stages run on every rank
            logp, entropy = (None if t is None else self._from_last_stage(t) for t in (logp, entropy))
            owned = self._from_last_stage(owned.to(torch.uint8)).bool()
            values = {k: self._from_last_stage(v) for k, v in values.items()}
            box = [metrics]
            dist.broadcast_object_list(box, src=self._last_stage_rank(), group=self.groups.pp)
            metrics = box[0]
        batch.add_token_field(field, logp, overwrite=True)
        batch.add_token_field("owned", owned, overwrite=True)
        if entropy is not None:
            batch.add_token_field("entropy", entropy, overwrite=True)
        for name, v in values.items():
            batch.add_token_field(name, v, overwrite=True)
        return metrics

    def _head_view(self, p: int, key: int, mb: MicroBatch, hidden: torch.Tensor, out,
                   head_weight: torch.Tensor) -> HeadView:
        """What an observer sees of one micro-batch (``hidden``: [1, S(/TP), d], this rank's rows)."""
        k = out.topk_ids.shape[-1] if out.topk_ids is not None else 0
        return HeadView(
            pass_index=p, key=key, rows=self._local_rows(mb), hidden=hidden[0], logp=out.logp.view(-1),
            entropy=None if out.entropy is None else out.entropy.view(-1),
            topk_ids=out.topk_ids.reshape(-1, k) if k else None,
            topk_logits=out.topk_logits.reshape(-1, k) if k else None,
            targets=mb.targets.view(-1).to(self.device), token_index=mb.target_index,
            response=mb.response.to(self.device), lm_head_weight=head_weight,
            vocab_start=self.groups.tp_rank * head_weight.shape[0], groups=self.groups)

    @torch.no_grad()
    def score_sequences(self, seqs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """The credit library's ``ScoreFn``: per sequence, Σ log p(y_t | y_<t) over the positions t
        marked in its mask (no-grad forwards). Every rank passes the same inputs and gets every sum:
        each DP replica scores its length-balanced share of the sequences, CP ranks their chunks, and
        the sums are combined over DP×CP (and taken from the last pipeline stage)."""
        sums = torch.zeros(len(seqs), dtype=torch.float64)
        dp_split = not self.data_sharded  # sharded: each replica scores its own sequences
        mine = (balanced_partition([len(s) for s in seqs], self.groups.dp_size)[self.groups.dp_rank]
                if dp_split else list(range(len(seqs)))) if seqs else []
        if mine:
            scored = RolloutBatch.from_samples([seqs[i][:1].tolist() for i in mine],
                                               [seqs[i][1:].tolist() for i in mine])
            logp = torch.zeros(scored.num_tokens)

            def loss_fn(mb: MicroBatch, hidden: torch.Tensor):
                lp, _ = self._logprobs(mb, hidden, with_entropy=False)
                valid = mb.target_index >= 0
                logp[mb.target_index[valid]] = lp.cpu()[valid]
                return torch.zeros((), device=self.device), torch.tensor(0, dtype=torch.int), {}

            mbs = self._microbatches(scored, list(range(scored.num_seqs)),
                                     self.cfg.train.max_tokens_per_gpu_logprob)
            self._run(mbs, loss_fn, forward_only=True)
            flat = torch.cat([masks[i].bool() for i in mine])
            local = torch.zeros(len(mine), dtype=torch.float64)
            local.index_add_(0, scored.seq_index[flat], logp[flat].double())
            sums[mine] = local
        sums = self._from_last_stage(sums)
        group, size = ((self.groups.dp_cp, self.groups.dp_cp_size) if dp_split
                       else (self.groups.cp, self.groups.cp_size))
        if size > 1:  # disjoint sequences (DP) and disjoint tokens (CP)
            buf = sums.to(self.device)  # NCCL takes no CPU tensors
            dist.all_reduce(buf, group=group)
            sums = buf.cpu()
        return sums

    def _last_stage_rank(self) -> int:
        return dist.get_process_group_ranks(self.groups.pp)[-1]

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the last pipeline stage holds it (a no-op without PP). Collectives run on the
        actor's device (NCCL takes no CPU tensors); the result is on ``t``'s device."""
        if self.groups.pp_size == 1:
            return t
        buf = t.to(self.device)
        dist.broadcast(buf, src=self._last_stage_rank(), group=self.groups.pp)
        return buf.to(t.device)

    def _gather_tp_rows(self, mb: MicroBatch, local: torch.Tensor) -> torch.Tensor:
        """λ̄ of the sequence-parallel shard → the whole row (every TP rank computes the loss)."""
        if not self.sp:
            return local
        parts = [torch.empty_like(local) for _ in range(self.groups.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=self.groups.tp)
        return torch.cat(parts)

    # ------------------------------------------------------------------ train pass
    def train(self, batch: RolloutBatch, plan: LossPlan | None = None, *, start: int = 0,
              totals: dict[str, float] | None = None,
              after_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """PPO epochs over the mini-batches of ``batch``; one optimizer step per mini-batch. Returns
        the mean of the mini-batches' stats.

        ``after_step(done, totals)`` runs after each optimizer step (a preemption boundary: it may
        save and raise); a run resumed from there passes ``start=done`` and those ``totals`` (stat
        sums of the steps already taken), so the rest of the batch and the mean come out as in an
        uninterrupted run."""
        plan = plan or LossPlan()
        self._require("train", "weights", "grads", "optimizer")
        for chunk in self.model:
            chunk.train()
        response = batch.loss_mask  # [T] response tokens (the normaliser's token count)
        loss_mask = response & batch[plan.mask_field].bool() if plan.mask_field else response
        resp_lens = torch.zeros(batch.num_seqs).index_add_(0, batch.seq_index, loss_mask.float())  # [B]
        mismatch = self._mismatch_metrics(batch, loss_mask) if plan.objective != "sft" else {}
        totals = dict(totals or {})
        schedule = [pair for _ in range(self.cfg.train.ppo_epochs)
                    for pair in zip(self.minibatch_plan(batch), self.local_shards(batch))]
        for done, (mini, local) in enumerate(schedule[start:], start=start + 1):
            stats = self._train_minibatch(batch, mini, local, plan, response, loss_mask, resp_lens)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            if after_step is not None:
                after_step(done, totals)
        return {**{k: v / max(len(schedule), 1) for k, v in totals.items()}, **mismatch}

    def _mismatch_metrics(self, batch: RolloutBatch, loss_mask: torch.Tensor) -> dict[str, float]:
        """Engine vs actor log-probs of the rollout batch (``train/mismatch/…``): every rank's owned
        loss tokens, reduced over DP×CP. Needs ``logp_rollout`` when a correction is configured."""
        algo = self.cfg.algo
        if "logp_rollout" not in batch:
            if algo.rollout_correction != "none":
                raise ValueError(f"algo.rollout_correction={algo.rollout_correction!r} needs the rollout "
                                 "engine's log-probs (batch field 'logp_rollout'); the engine returned none")
            return {}
        dev = self.device
        metrics = mismatch_metrics(algo.rollout_correction, algo.mismatch, batch["logp_old"].to(dev),
                                   batch["logp_rollout"].to(dev), (loss_mask & batch["owned"]).to(dev),
                                   batch.seq_index.to(dev), batch.num_seqs, self.groups.dp_cp)
        return {f"train/{k}": v for k, v in metrics.items()}

    def _train_minibatch(self, batch: RolloutBatch, mini: list[int], local: list[int], plan: LossPlan,
                         response: torch.Tensor, loss_mask: torch.Tensor,
                         resp_lens: torch.Tensor) -> dict[str, float]:
        mbs = self._microbatches(batch, local, self.cfg.train.max_tokens_per_gpu_train)
        normalizer = self._normalizer(batch, mini, mbs, loss_mask, plan)
        total_resp = self._dp_total(float(response[batch.token_indices(mini)].sum()))
        if plan.objective == "sft":  # no old policy: zeros keep the shared code path simple
            fields = {"logp_old": torch.zeros(batch.num_tokens), plan.advantage_field: torch.zeros(batch.num_tokens)}
        else:
            fields = {name: batch[name] for name in ("logp_old", plan.advantage_field)}
        weight = batch[plan.weight_field] if plan.weight_field else None
        logp_rollout = batch["logp_rollout"] if "logp_rollout" in batch and plan.objective != "sft" else None
        ref_logp = batch["logp_ref"] if self._reference is not None and plan.objective != "sft" else None
        selector = plan.selector
        need_entropy = selector is not None and selector.needs.current_entropy
        collected: list[dict] = []

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor):
            lp, ent = self._logprobs(mb, hidden, need_entropy)
            rows = (mb.response & (mb.target_index >= 0)).nonzero().flatten()
            idx = mb.target_index[rows]
            mask = response_mask = loss_mask[idx].to(self.device)
            if selector is not None:
                cp = self.groups.cp if self.groups.cp_size > 1 else None  # CP shards select together
                current = ent[rows.to(self.device)].detach() if need_entropy else None
                mask = selector.select(current, mask, cp) & mask
            # sequences numbered by their place in the micro-batch: the same on every CP rank, even
            # for a sequence a rank holds no token of (GSPO all-reduces per-sequence sums over CP)
            seqs = torch.tensor(mb.samples, dtype=torch.long)
            seq_local = torch.searchsorted(seqs, batch.seq_index[idx])
            inp = PolicyLossInputs(
                logp=lp[rows.to(self.device)], logp_old=fields["logp_old"][idx].to(self.device),
                advantages=fields[plan.advantage_field][idx].to(self.device), mask=mask,
                seq_index=seq_local.to(self.device), seq_lengths=resp_lens[seqs].to(self.device),
                num_seqs=len(mb.samples), normalizer=normalizer,
                token_weight=None if weight is None else weight[idx].to(self.device),
                ref_logp=None if ref_logp is None else ref_logp[idx].to(self.device),
                cp_group=self.groups.cp if self.groups.cp_size > 1 else None, token_index=idx,
                response_mask=response_mask if selector is not None else None,
                logp_rollout=None if logp_rollout is None else logp_rollout[idx].to(self.device))
            if plan.objective == "sft":
                share = -(lp[rows.to(self.device)] * mask).sum() / max(normalizer.num_tokens, 1.0)
                metrics = {"pg_loss": share.detach()}
            else:
                share, metrics = policy_loss(self.cfg.algo, inp)
            collected.append({k: float(v) for k, v in metrics.items()})
            n_local = torch.tensor(int(rows.numel()), dtype=torch.int)
            return share * total_resp, n_local, {}

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run(mbs, loss_fn, forward_only=False)
        stats = self._reduce_metrics(collected, metric_names(selected=selector is not None))
        scale = kept_scale(stats["train/norm_dropped"])  # tokens a filter dropped from the normaliser
        if scale != 1.0:  # in the forward (FIPO kept, seq-mask-tis): one exact rescale before clipping
            for chunk in self.model:
                chunk.scale_gradients(scale)
            for name in ("train/pg_loss", "train/kl_loss"):
                stats[name] *= scale
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            self.optimizer_steps += 1
        stats["train/grad_norm"] = float(grad_norm or 0.0)
        stats["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        stats["train/update_skipped"] = float(not ok)
        return stats

    def _normalizer(self, batch: RolloutBatch, mini: list[int], mbs: list[MicroBatch],
                    loss_mask: torch.Tensor, plan: LossPlan) -> LossNormalizer:
        """Mini-batch totals over all DP ranks (forking: Σ of selected counts per micro-batch; metrics
        then average over all response tokens)."""
        idx = batch.token_indices(mini)
        if plan.mask_field is not None and "owned" in batch:
            # a credit mask read from the LM head (DelTA's selection) exists only on the tokens this rank
            # owns — its observer writes nothing elsewhere — so count those, over DP×CP
            owned = float((loss_mask[idx] & batch["owned"][idx].bool()).sum())
            num_resp = self._all_sum(owned, self.groups.dp_cp, self.groups.dp_cp_size)
        else:
            num_resp = self._dp_total(float(loss_mask[idx].sum()))
        if plan.selector is not None:
            valid = torch.tensor([float(loss_mask[mb.target_index[mb.response]].sum()) for mb in mbs],
                                 dtype=torch.float64, device=self.device)
            if self.groups.cp_size > 1 and mbs:  # a micro-batch's tokens are spread over its CP ranks
                dist.all_reduce(valid, group=self.groups.cp)
            local = sum(plan.selector.count(int(n)) for n in valid.tolist())
            count = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            dist.all_reduce(count, group=self.groups.dp)
            num_tokens = float(count[0])
        else:
            num_tokens = num_resp
        return LossNormalizer(num_tokens, self._dp_total(float(len(mini))), self.cfg.loss_const,
                              self.cfg.algo.const_times_seqs, num_response_tokens=num_resp)

    def _dp_total(self, value: float) -> float:
        """A mini-batch count over the whole step: summed over DP replicas when each holds its own
        samples (``data_sharded``); already whole otherwise."""
        return self._all_sum(value, self.groups.dp, self.groups.dp_size) if self.data_sharded else value

    def _all_sum(self, value: float, group, size: int) -> float:
        if size == 1:
            return value
        buf = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=group)
        return float(buf[0])

    def _reduce_metrics(self, collected: list[dict], names: tuple[str, ...]) -> dict[str, float]:
        """Metric shares summed over micro-batches and DP×CP ranks; sent from the last stage."""
        buf = torch.zeros(len(names), dtype=torch.float64)
        for metrics in collected:
            for i, n in enumerate(names):
                buf[i] += metrics.get(n, 0.0)
        buf = buf.to(self.device)  # NCCL takes no CPU tensors
        if self.groups.is_last_stage:
            dist.all_reduce(buf, group=self.groups.dp_cp)
        buf = self._from_last_stage(buf)
        return {f"train/{n}": float(v) for n, v in zip(names, buf.tolist())}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path) -> None:
        """Model and optimizer as a megatron dist-ckpt (resharding-capable), plus the LR schedule.
        Collective: every rank writes its shards into ``path``."""
        from megatron.core import dist_checkpointing

        self._require("save_checkpoint", "weights", "optimizer")
        path.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(_sharded_state(self), str(path), async_sharded_save=False)
        if self.groups.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "optimizer_steps": self.optimizer_steps},
                       path / "schedule.pt")

    def load_checkpoint(self, path) -> None:
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(_sharded_state(self, is_loading=True), str(path))
        for i, m in enumerate(self.model):
            unwrap(m).load_state_dict(state[f"model{i}"])
        self.optimizer.load_state_dict(state["optimizer"])
        extra = torch.load(path / "schedule.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.optimizer_steps = int(extra["optimizer_steps"])

    # ------------------------------------------------------------------ weights
    def named_hf_weights(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full tensors in buckets, yielded on the weight-sender rank of each pipeline stage
        (TP rank 0 of the first DP×CP replica). Collective over TP: every rank must iterate it."""
        from delta_megatron.models.converter import megatron_to_hf

        self._require("named_hf_weights", "weights")
        if self.groups.dp_cp_rank != 0:  # other replicas hold the same weights
            return
        yield from megatron_to_hf([unwrap(m) for m in self.model], self.cfg.model, bucket_bytes=bucket_bytes,
                                  tp_group=self.groups.tp)


def _call_with_pass(fn, p, mb, hidden):
    return fn(mb, hidden, p)


def _sharded_state(actor: MegatronActor, is_loading: bool = False) -> dict:
    """``is_loading`` makes megatron create the optimizer state first (a fresh process has none yet,
    and dist-ckpt loads in place into the tensors of this dict)."""
    model_sd = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(actor.model)}
    return {**model_sd, "optimizer": actor.optimizer.sharded_state_dict(
        model_sd if len(actor.model) > 1 else model_sd["model0"], is_loading=is_loading)}
