"""How rollout data moves across the trainer's ranks — without a funnel through rank 0.

* **Generation where the engines are.** The ranks holding an engine (every data-parallel leader with
  SGLang, each fetching from the router; rank 0 alone with the in-process engine) generate
  contiguous blocks of each round's prompt groups and verify them where they land. Every rank draws
  the round's prompts (the data cursor stays identical everywhere).
* **Each replica receives only its shard.** Whole prompt groups go to one data-parallel replica:
  mini-batch ``k`` is the ``k``-th contiguous range of the step's groups (as the actor cuts them), and
  within it replica ``r`` owns the ``r``-th contiguous block. Only metadata (group ids, sample and
  token counts) is gathered everywhere; a group's tokens travel point to point from the rank that
  generated it to its replica's leader (nothing moves when they coincide — SGLang without dynamic
  sampling), then the leader broadcasts the shard inside its replica (TP/PP/CP peers).
* **Batch-wide statistics by collectives.** Group statistics (GRPO) are local because groups are whole;
  dynamic-sampling counts come from the gathered metadata; loss normalisers are summed over DP by the
  actor; rollout metrics are sums and counts all-reduced over DP; DelTA already reduces its own.
* **Eval** is split the same way: each generating rank evaluates a contiguous slice of every benchmark,
  and only per-question counts travel to rank 0.

With one rank this is today's single-process path exactly (one shard, no transfers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron.algo.dynamic_sampling import METRIC_FIELDS, keep_groups
from delta_megatron.batch import RolloutBatch
from delta_megatron.reward.verifier_pool import VerifyStats

__all__ = ["GroupMeta", "DataFlow"]

# (name, kind): per-token ("t") / per-sample ("s") fields a shard carries, packed into one float64
# buffer (token ids and counts < 2**53 are exact in float64).
_PACKED = (("logp_rollout", "t"), ("group_id", "s"), ("truncated", "s"), ("acc_reward", "s"), ("acc", "s"))


@dataclass(frozen=True)
class GroupMeta:
    group: int
    holder: int  # the rank that generated (and verified) it
    samples: int
    tokens: int


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: Any) -> list[Any]:
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)`` (the actor's ``round`` bounds)."""
    bounds = [round(n * k / parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class DataFlow:
    """This rank's part in moving rollout data. Collective construction (creates one process group
    per data-parallel replica)."""

    def __init__(self, groups, *, producer: bool, mini_batches: int, device: torch.device):
        self.groups, self.mini_batches, self.device = groups, mini_batches, device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        coords = _gather((groups.dp_rank, groups.tp_rank, groups.pp_rank, groups.cp_rank, producer))
        self.dp = groups.dp_size
        self.leaders = [next(r for r, c in enumerate(coords) if c[:4] == (d, 0, 0, 0)) for d in range(self.dp)]
        self.producers = [r for r, c in enumerate(coords) if c[4]]
        if not self.producers:
            raise RuntimeError("no rank holds a rollout engine")
        self.replica = [[r for r, c in enumerate(coords) if c[0] == d] for d in range(self.dp)]
        self.replica_group = None
        for d, members in enumerate(self.replica):  # every rank creates every group, in order
            group = dist.new_group(members) if _world() > 1 and len(members) > 1 else None
            if d == groups.dp_rank:
                self.replica_group = group
        self.producer = producer

    # ------------------------------------------------------------------ generation
    def share(self, first: int, count: int) -> tuple[int, int]:
        """Group ids ``[lo, hi)`` of ``[first, first + count)`` that this rank generates."""
        if self.rank not in self.producers:
            return first, first
        lo, hi = _blocks(count, len(self.producers))[self.producers.index(self.rank)]
        return first + lo, first + hi

    def collect(self, draw: Callable[[int], list], produce: Callable[[list, int], RolloutBatch], want: int,
                dynamic) -> tuple[RolloutBatch, dict[str, float]]:
        """One step's rollout batch, this replica's shard of it. ``draw(n)`` takes the next ``n``
        prompts (every rank calls it); ``produce(examples, first_group, round_first_group)`` generates
        and verifies them (generating ranks only). ``dynamic``: the DAPO dynamic-sampling section — rounds of
        ``multiplier × want`` prompts until ``want`` groups carry signal."""
        per_round = want * dynamic.gen_batch_multiplier if dynamic.enabled else want
        parts: list[RolloutBatch] = []
        kept: list[GroupMeta] = []
        stats, rounds = VerifyStats(), 0
        while True:
            examples = draw(per_round)
            first = rounds * per_round
            lo, hi = self.share(first, per_round)
            part = produce(examples[lo - first:hi - first], lo, first) if hi > lo else None
            if part is not None:
                stats = stats + part.sample_meta.get("verifier_stats", [VerifyStats()])[0]
                if dynamic.enabled:
                    field = METRIC_FIELDS[dynamic.metric]
                    part = part.select(keep_groups(part[field], part["group_id"]).nonzero().flatten().tolist())
                parts.append(part)
            kept += [m for metas in _gather(self._metas(part)) for m in metas]
            rounds += 1
            if not dynamic.enabled or len(kept) >= want:
                break
            if 0 < dynamic.max_gen_batches <= rounds:
                raise RuntimeError(
                    f"dynamic sampling: only {len(kept)} of {want} prompt groups had varying "
                    f"correctness after {rounds} rounds of {per_round} prompts; raise "
                    "algo.dynamic_sampling.max_gen_batches or gen_batch_multiplier, or use easier data")
        chosen = sorted(kept, key=lambda m: m.group)[:want]
        batch = self._distribute(chosen, parts)
        out = {}
        if dynamic.enabled:
            out = {"rollout/gen_rounds": float(rounds), "rollout/prompts_generated": float(rounds * per_round),
                   "rollout/informative_group_frac": len(kept) / (rounds * per_round)}
        total = VerifyStats()
        for s in _gather(stats if self.producer else None):
            total = total + s if s is not None else total
        return batch, {**out, **total.as_metrics("reward/")}

    def _metas(self, part: RolloutBatch | None) -> list[GroupMeta]:
        if part is None:
            return []
        ids, lens = part["group_id"].tolist(), part.seq_lens.tolist()
        out: dict[int, list[int]] = {}
        for g, n in zip(ids, lens):
            out.setdefault(int(g), [0, 0])
            out[int(g)][0] += 1
            out[int(g)][1] += int(n)
        return [GroupMeta(g, self.rank, s, t) for g, (s, t) in sorted(out.items())]

    # ------------------------------------------------------------------ sharding
    def assignment(self, chosen: Sequence[GroupMeta]) -> dict[int, tuple[int, int]]:
        """group id → (data-parallel rank, mini-batch): mini-batches as the actor cuts the step's
        groups, each split into one contiguous block per replica."""
        parts = min(self.mini_batches, max(len(chosen), 1))
        out = {}
        for k, (lo, hi) in enumerate(_blocks(len(chosen), parts)):
            if hi - lo < self.dp:
                raise RuntimeError(f"mini-batch {k} has {hi - lo} prompt group(s) for {self.dp} data-parallel "
                                   "replicas: every replica needs whole groups in every mini-batch (raise "
                                   "train.prompts_per_step or lower train.mini_batches)")
            for d, (a, b) in enumerate(_blocks(hi - lo, self.dp)):
                for m in chosen[lo + a:lo + b]:
                    out[m.group] = (d, k)
        return out

    def _distribute(self, chosen: list[GroupMeta], parts: list[RolloutBatch]) -> RolloutBatch:
        owner = self.assignment(chosen)
        mine = {m.group for m in chosen if owner[m.group][0] == self.groups.dp_rank}
        local = RolloutBatch.concat(parts) if parts else None
        leader = self.leaders[self.groups.dp_rank]
        pieces: dict[int, RolloutBatch] = {}  # holder rank → its groups of this replica
        sends, recvs = [], []
        for d, dst in enumerate(self.leaders):  # producer → replica leader, point to point
            for holder in sorted({m.holder for m in chosen if owner[m.group][0] == d}):
                groups_ = [m for m in chosen if owner[m.group][0] == d and m.holder == holder]
                if holder == self.rank:
                    packed = _pack(_select_groups(local, [m.group for m in groups_]))
                    if dst == self.rank:  # stays here: the same fields as a received piece
                        pieces[holder] = _unpack(packed, groups_)
                    else:
                        sends.append(dist.isend(packed.to(self.device), dst))
                elif dst == self.rank:
                    buf = torch.empty(_packed_size(groups_), dtype=torch.float64, device=self.device)
                    recvs.append((holder, groups_, buf, dist.irecv(buf, holder)))
        for holder, groups_, buf, work in recvs:
            work.wait()
            pieces[holder] = _unpack(buf.cpu(), groups_)
        for work in sends:
            work.wait()
        members = [m for m in chosen if m.group in mine]
        if self.rank == leader:
            shard = RolloutBatch.concat([pieces[h] for h in sorted(pieces)])
            shard = _select_groups(shard, [m.group for m in members])  # group order
        else:
            shard = None
        if self.replica_group is not None:  # leader → its TP/PP/CP peers
            buf = _pack(shard).to(self.device) if shard is not None else \
                torch.empty(_packed_size(members), dtype=torch.float64, device=self.device)
            dist.broadcast(buf, src=leader, group=self.replica_group)
            if shard is None:
                shard = _unpack(buf.cpu(), members)
        shard.add_sample_field("minibatch", torch.tensor([owner[int(g)][1] for g in shard["group_id"].tolist()]))
        shard.add_token_field("global_token_index", self._global_index(shard, chosen))
        return shard

    @staticmethod
    def _global_index(shard: RolloutBatch, chosen: list[GroupMeta]) -> torch.Tensor:
        """Each token's index in the whole step batch (groups in id order), which layout-invariant
        per-token randomness (DelTA's random controls) keys on."""
        offset, start = {}, 0
        for m in chosen:
            offset[m.group] = start
            start += m.tokens
        first = torch.zeros(shard.num_tokens, dtype=torch.long)
        seen: dict[int, int] = {}
        for g, s, e in zip(shard["group_id"].tolist(), shard.cu_seqlens[:-1].tolist(),
                           shard.cu_seqlens[1:].tolist()):
            base = offset[int(g)] + seen.get(int(g), 0)
            first[s:e] = torch.arange(base, base + e - s)
            seen[int(g)] = seen.get(int(g), 0) + e - s
        return first

    # ------------------------------------------------------------------ statistics
    def dp_sum(self, values: list[float], *, tokens: bool = False) -> list[float]:
        """Sums over data-parallel replicas (``tokens``: over DP×CP, for per-token sums of the tokens
        each rank owns)."""
        group = self.groups.dp_cp if tokens else self.groups.dp
        if dist.get_world_size(group) == 1 if dist.is_initialized() else True:
            return list(values)
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=group)
        return buf.cpu().tolist()

    def credit_metrics(self, metrics: dict[str, float], batch: RolloutBatch) -> dict[str, float]:
        """Credit methods report on their shard: counts (``cf/…``) are summed over DP, the rest are
        per-token means, weighted by each replica's response tokens."""
        if self.dp == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        weight = float(batch.response_mask.sum())
        values = self.dp_sum([weight] + [metrics[k] * (1.0 if k.startswith("cf/") else weight) for k in names])
        return {k: v if k.startswith("cf/") else v / max(values[0], 1.0) for k, v in zip(names, values[1:])}

    # ------------------------------------------------------------------ eval
    def evaluate(self, generate: Callable[[], Any] | None, datasets: Sequence[Any], reward: Any, settings):
        """Every generating rank evaluates a contiguous slice of each benchmark; rank 0 merges the
        per-question counts (in question order) into the full results. None on other ranks."""
        from delta_megatron.eval.evaluate import EvalResults, evaluate

        mine = []
        if self.producer:
            index, count = self.producers.index(self.rank), len(self.producers)
            fn = generate()
            for ds in datasets:
                examples = list(ds)[:settings.max_prompts]
                lo, hi = _blocks(len(examples), count)[index]
                if hi > lo:
                    mine.append(evaluate(fn, {ds.name: examples[lo:hi]}, reward, settings,
                                         prompt_fn=lambda ex: ex).benchmarks[0])
        gathered = _gather(mine)
        if self.rank != 0:
            return None
        return EvalResults(settings, [_merge([b for part in gathered for b in part if b.name == ds.name],
                                             settings) for ds in datasets])


def _merge(parts: list, settings):
    from delta_megatron.eval.evaluate import BenchmarkResult
    from delta_megatron.eval.metrics import avg_at_k, mean_pass_at_k

    questions = [q for p in parts for q in p.questions]
    counts = [(q.n, q.c) for q in questions]
    stats = VerifyStats()
    for p in parts:
        stats = stats + p.reward_stats
    return BenchmarkResult(name=parts[0].name, k=settings.k,
                           avg_at_k=sum(avg_at_k([x > 0 for x in q.rewards]) for q in questions) / len(questions),
                           pass_at_k={kk: mean_pass_at_k(counts, kk) for kk in settings.ks},
                           questions=questions, reward_stats=stats)


def _select_groups(batch: RolloutBatch, group_ids: list[int]) -> RolloutBatch:
    """The samples of ``group_ids`` in that order (each group's samples in batch order)."""
    ids = batch["group_id"].tolist()
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        by_group.setdefault(int(g), []).append(i)
    return batch.select([i for g in group_ids for i in by_group[g]])


def _packed_size(metas: Sequence[GroupMeta]) -> int:
    """Length of :func:`_pack`'s buffer: tokens, lengths, prompt lengths, then each field."""
    tokens, samples = sum(m.tokens for m in metas), sum(m.samples for m in metas)
    return tokens + 2 * samples + sum(tokens if kind == "t" else samples for _, kind in _PACKED)


def _pack(batch: RolloutBatch) -> torch.Tensor:
    parts = [batch.tokens, batch.seq_lens, batch.prompt_lens]
    parts += [batch[name] for name, _ in _PACKED]
    return torch.cat([p.reshape(-1).to(torch.float64) for p in parts])


def _unpack(buf: torch.Tensor, metas: Sequence[GroupMeta]) -> RolloutBatch:
    tokens, samples = sum(m.tokens for m in metas), sum(m.samples for m in metas)
    sizes = [tokens, samples, samples] + [tokens if kind == "t" else samples for _, kind in _PACKED]
    chunks = torch.split(buf, sizes)
    lens = chunks[1].long()
    batch = RolloutBatch(tokens=chunks[0].long(), cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long),
                                                                        lens.cumsum(0)]),
                         prompt_lens=chunks[2].long())
    for (name, kind), value in zip(_PACKED, chunks[3:]):
        if name == "group_id":
            value = value.long()
        elif name == "truncated":
            value = value.bool()
        else:
            value = value.float()
        (batch.add_token_field if kind == "t" else batch.add_sample_field)(name, value)
    return batch
