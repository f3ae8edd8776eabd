"""The RLVR loop: rollout → reward → advantages → old-log-prob pass (capture) → token credit →
PPO updates → weight sync → log / eval / save. ``Trainer.fit`` reads like the algorithm; every verb is
one call down (this file, ``builders.py``, the actor, the credit pipeline). Between the rollout, the
training and the weight sync the lifecycle (``lifecycle.py``) moves memory between a colocated engine
and the actor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from delta_megatron import builders
from delta_megatron.algo import compute_advantages
from delta_megatron.algo.overlong import overlong_penalty
from delta_megatron.batch import RolloutBatch
from delta_megatron.checkpoint import CheckpointManager, resolve_resume, rng_state, set_rng_state
from delta_megatron.checkpoint.schedule import SaveSchedule
from delta_megatron.config import Config, dump_yaml, to_dict
from delta_megatron.credit.base import CreditContext
from delta_megatron.credit.counterfactual import tokenizer_decoder
from delta_megatron.credit.pipeline import CreditPipeline
from delta_megatron.credit.token_stats import token_credit_sums
from delta_megatron.credit_contract import LossPlan
from delta_megatron.data.sampler import PromptStream
from delta_megatron.dataflow import DataFlow
from delta_megatron.lifecycle import Lifecycle
from delta_megatron.memory_ledger import LIFECYCLE_PHASE
from delta_megatron.parallel import broadcast_object, get_groups
from delta_megatron.rollout.engine import SamplingParams
from delta_megatron.rollout.requests import requests_for, samples_to_batch, step_seed, text_generator
from delta_megatron.tracking import MetricsLogger, progress
from delta_megatron.utils.job_clock import job_end_time
from delta_megatron.utils.preemption import Preemption


class RunStopped(Exception):
    """A stage boundary saved a checkpoint and the run stops (exit 75: requeue and resume)."""


@dataclass
class Work:
    """A step's prepared batch on its way through the PPO updates: what a stop inside the train
    phase saves (``done`` optimizer steps taken, ``totals`` their summed stats)."""

    batch: RolloutBatch
    plan: LossPlan
    metrics: dict[str, float]
    t0: float
    done: int = 0
    totals: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        p = self.plan
        plan = {"advantage_field": p.advantage_field, "weight_field": p.weight_field,
                "mask_field": p.mask_field, "objective": p.objective}  # the selector is rebuilt
        return {"batch": self.batch, "plan": plan, "metrics": self.metrics, "done": self.done,
                "totals": self.totals}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], credit: CreditPipeline) -> Work:
        selector = credit.selectors[0] if credit.selectors else None
        return cls(sd["batch"], LossPlan(**sd["plan"], selector=selector), sd["metrics"],
                   time.perf_counter(), sd["done"], sd["totals"])


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.groups = get_groups()
        self.rank0 = self.groups.rank == 0
        self.out = Path(cfg.logging.dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank0:
            dump_yaml(cfg, self.out / "config.yaml")
        self.tokenizer, self.tokenizer_dir = builders.build_tokenizer(cfg, self.out)
        self.encode = builders.prompt_encoder(cfg, self.tokenizer)
        self.train_set, self.eval_sets = builders.build_datasets(cfg, self.encode)  # long prompts dropped
        self.prompts = PromptStream(self.train_set, cfg.train.prompts_per_step, seed=cfg.data.shuffle_seed)
        self.rollout_runtime = builders.build_rollout(cfg, self.tokenizer, self.groups, self.out)
        self.engine = self.rollout_runtime.engine  # on the ranks that generate (see dataflow.py)
        self.reward = builders.build_reward(cfg) if self.engine is not None else None  # scored where generated
        self.actor = builders.build_actor(cfg, self.groups, data_sharded=True)
        self.flow = DataFlow(self.groups, producer=self.engine is not None, mini_batches=cfg.train.mini_batches,
                             device=self.actor.device)
        self.decode_tokens = tokenizer_decoder(self.tokenizer)  # per-token strings
        self.credit = CreditPipeline(cfg.credit, CreditContext(decode=self.decode_tokens,
                                                               token_group=self.groups.dp_cp))
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.out / "checkpoints", cfg.checkpoint.keep)
        self.start_step = self._maybe_resume()
        self.log = MetricsLogger(self.out, cfg.logging.jsonl, cfg.logging.tensorboard,
                                 cfg.logging.wandb_project, config=to_dict(cfg), resume_step=self.start_step,
                                 companions=("samples.jsonl", "credit_tokens.jsonl"))
        self.preemption = Preemption().install()
        self.preempted = False
        self.schedule = SaveSchedule(cfg.checkpoint, job_end_time() if self.rank0 else None, cfg.train.steps)
        self.closed = False
        self.rollout_stats: dict[str, float] = {}  # dynamic-sampling counters of the last rollout
        self.ledger = builders.build_ledger(cfg, self.groups.world_size)  # the planner's memory model
        self.memory_peaks: dict[str, float] = {}  # CUDA peak of each phase, the last time through
        self._phase_left = "start"
        # rank 0 alone moves the engine's memory (its client reaches every server); the others only the actor
        self.lifecycle = Lifecycle(cfg.memory, self.actor, self.engine if self.rank0 else None,
                                   on_enter=self.log_memory)
        self.sync_weights()  # the engine starts from the actor's weights
        self.lifecycle.enter("rollout")
        if self.resumed_rng is not None:  # last: nothing in the set-up draws from the restored generators
            set_rng_state(self.resumed_rng)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        history = []
        self.schedule.mark("start")
        with progress(f"RL {self.out.name}", self.cfg.train.steps - self.start_step,
                      self.cfg.logging.progress) as bar:
            for step in range(self.start_step, self.cfg.train.steps):
                try:
                    history.append(self.step(step))
                except RunStopped:  # a stage boundary inside the step saved: requeue
                    self.preempted = True
                    break
                bar.advance(summary=_summary(step, history[-1]))
                stop, due = self.boundary("step", save_after=step)
                if stop or due:
                    self.save(step)
                if stop:
                    self.preempted = True
                    break
        self.close()
        return history

    def step(self, step: int) -> dict[str, float]:
        """One RLVR step; returns the logged metrics. A run resumed from a checkpoint taken inside the
        train phase finishes that step's updates instead of preparing a new batch."""
        work = self.resumed_work.pop(step, None) or self.prepare(step)
        return self.update(step, work)

    def prepare(self, step: int) -> Work:
        """Rollout; then, in the train phase, rewards, advantages, old log-probs and token credit."""
        t0 = time.perf_counter()
        redo = self.trainer_state(step)  # a stop right after the rollout redoes this step
        batch = self.rollout(step)
        self.stop_point("rollout", step, lambda: redo)
        self.lifecycle.enter("train")  # the engine frees its weights and KV cache, the actor's state returns
        batch = self.score(batch)
        batch = self.advantages(batch)
        delta_metrics = self.actor.old_logprobs(batch, capture=self.credit.capture(self.cfg.logging.entropy))
        if self.cfg.algo.kl.estimator != "none":
            self.actor.ref_logprobs(batch)  # logp_ref for the KL loss
        plan, credit_metrics = self.credit.assign(batch, score_fn=self.actor.score_sequences)
        credit_metrics = self.flow.credit_metrics(credit_metrics, batch)  # over the whole step batch
        return Work(batch, plan, {**self.rollout_stats, **delta_metrics, **credit_metrics}, t0)

    def update(self, step: int, work: Work) -> dict[str, float]:
        """PPO updates, weight sync, metrics and evaluation."""
        if self.lifecycle.phase != "train":  # resumed inside the train phase
            self.lifecycle.enter("train")
        train_metrics = self.actor.train(work.batch, work.plan, start=work.done, totals=work.totals,
                                         after_step=partial(self.after_optimizer_step, step, work))
        self.lifecycle.enter("sync")  # the actor's optimizer state leaves, the engine's weights return
        self.sync_weights()
        self.lifecycle.enter("rollout")  # then the engine's KV cache
        stop, _ = self.boundary("sync")
        metrics = {**self.batch_metrics(work.batch), **work.metrics, **train_metrics, **self.memory_peaks,
                   "time/step_s": time.perf_counter() - work.t0}
        if not stop:  # a stop here skips this step's evaluation
            metrics.update(self.maybe_eval(step))
        logged = self.log.log(step, metrics)
        self.record_samples(step, work.batch)
        if stop:
            self.stop(step, "sync", self.trainer_state(step + 1))
        return logged

    def after_optimizer_step(self, step: int, work: Work, done: int, totals: dict[str, float]) -> None:
        """Boundary after each optimizer step: a stop saves the batch and the updates done so far."""
        work.done, work.totals = done, dict(totals)
        self.stop_point("optimizer step", step, lambda: self.trainer_state(step, work))

    # ------------------------------------------------------------------ stage boundaries
    def boundary(self, stage: str, save_after: int | None = None) -> tuple[bool, bool]:
        """``stage`` just ended. (stop, periodic save due), agreed by every rank: stop on a signal
        (any rank) or when rank 0 sees the job's end too near for another stage and a save."""
        seconds = self.schedule.mark(stage)
        near = self.rank0 and self.schedule.deadline_near()
        due = self.rank0 and save_after is not None and self.schedule.periodic_due(save_after)
        stop, near, due = self.preemption.decide(near, due)
        if near and not self.preemption.requested:
            self.preemption.request("deadline")
        self.note("boundary", stage=stage, seconds=seconds, time_left=self.schedule.time_left(), stop=stop)
        return stop or near, due

    def stop_point(self, stage: str, step: int, state: Callable[[], dict]) -> None:
        """A boundary inside a step: on a stop, save ``state()`` (where to resume) and leave the step."""
        if self.boundary(stage)[0]:
            self.stop(step, stage, state())

    def stop(self, step: int, stage: str, state: dict) -> None:
        path = self.save(step, state)
        self.note("stop", step=step, stage=stage, reason=self.preemption.received,
                  signal_at=self.preemption.received_at, saved=path.name, resume_step=state["step"])
        raise RunStopped(stage)

    # ------------------------------------------------------------------ stages
    def rollout(self, step: int) -> RolloutBatch:
        """Sample ``n`` responses per prompt where the engines are and verify them there; this rank
        gets its data-parallel replica's prompt groups only. With dynamic sampling (DAPO) rounds of new
        prompts run until enough groups carry signal."""
        batch, self.rollout_stats = self.flow.collect(self.prompts.next, partial(self._generate, step),
                                                      self.cfg.train.prompts_per_step, self.cfg.algo.dynamic_sampling)
        return batch

    def _generate(self, step: int, examples: list, first: int, round_first: int) -> RolloutBatch:
        """Prompt groups ``first, first+1, …`` for ``examples``, sampled (one seed per step and round:
        a group's samples do not depend on which rank asks) and verified."""
        params = SamplingParams.from_config(self.cfg.rollout).replace(
            seed=step_seed(self.cfg.train.seed, step, f"round{round_first}"))
        samples = self.engine.generate(requests_for(examples, self.encode, params, step, first))
        batch = samples_to_batch(samples, {first + i: ex for i, ex in enumerate(examples)}, self.tokenizer)
        return self._verify(batch)

    def _verify(self, batch: RolloutBatch) -> RolloutBatch:
        """``acc`` (0/1 correctness, what dynamic sampling filters on), the verifier's reward value
        ``acc_reward`` and its counters, from the verifier pool (rank 0)."""
        rewards, stats = self.reward.score(list(zip(batch.sample_meta["response_text"],
                                                    batch.sample_meta["answer"])))
        value = torch.tensor(rewards, dtype=torch.float32)
        batch.add_sample_field("acc_reward", value)
        batch.add_sample_field("acc", (value > 0).float())
        batch.sample_meta["verifier_stats"] = [stats] * batch.num_seqs
        return batch

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """Verifier reward (+ DAPO overlong shaping)."""
        reward = batch["acc_reward"].to(torch.float64)
        overlong = self.cfg.algo.overlong
        if overlong.enabled:
            max_len = overlong.max_len or self.cfg.rollout.max_new_tokens
            reward = reward + overlong_penalty(batch.response_lens, max_len, overlong.buffer_len,
                                               overlong.penalty_factor)
        batch.add_sample_field("reward", reward.float())
        return batch

    def advantages(self, batch: RolloutBatch) -> RolloutBatch:
        adv = compute_advantages(self.cfg.algo, batch["reward"], batch["group_id"])
        batch.add_sample_field("advantage", adv)
        batch.add_token_field("advantage_tokens", batch.per_token("advantage"))
        return batch

    def sync_weights(self) -> int:
        """Every pipeline stage streams its layers to the engine along the placement's route."""
        return self.rollout_runtime.sync_weights(self.actor)

    # ------------------------------------------------------------------ metrics, eval, checkpoints
    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Means over the whole step batch: sums and counts of this replica's shard, summed over DP."""
        resp = batch.response_mask
        owned = resp & batch["owned"] if "owned" in batch else resp  # this rank's tokens
        n, reward, acc, length, truncated = self.flow.dp_sum([
            batch.num_seqs, float(batch["reward"].sum()), float(batch["acc"].sum()),
            float(batch.response_lens.sum()), float(batch["truncated"].sum())])
        diff = (batch["logp_rollout"][owned] - batch["logp_old"][owned]).abs() \
            if "logp_rollout" in batch and "logp_old" in batch else None  # engine vs actor log-probs
        ent_sum, ent_n, diff_sum, diff_n = self.flow.dp_sum([
            float(batch["entropy"][owned].sum()) if "entropy" in batch else 0.0, float(owned.sum()),
            float(diff.sum()) if diff is not None else 0.0, float(diff.numel()) if diff is not None else 0.0],
            tokens=True)
        out = {"rollout/reward_mean": reward / n, "rollout/acc_mean": acc / n,
               "rollout/response_len_mean": length / n, "rollout/truncated_frac": truncated / n,
               "rollout/entropy_mean": ent_sum / ent_n if "entropy" in batch and ent_n else 0.0,
               "rollout/num_samples": n,
               "data/prompts_dropped": float(self.train_set.dropped)}  # over rollout.max_prompt_len
        if diff is not None:
            out["rollout/logp_abs_diff"] = diff_sum / diff_n if diff_n else 0.0
        return out

    def record_samples(self, step: int, batch: RolloutBatch, count: int = 8) -> None:
        """Per-token credit of a few responses (``samples.jsonl``) for heat-maps and inspection; also
        the λ̄ histogram of the whole batch and its per-token-id sums (``credit_tokens.jsonl``, token
        clouds). Rank 0 only; every ``logging.log_every`` steps."""
        if not self.rank0 or step % self.cfg.logging.log_every:
            return
        weights = batch["credit_weight"] if "credit_weight" in batch else None
        resp = batch.response_mask
        rows = []
        adv = batch["advantage"]
        pos, neg = (adv > 0).nonzero().flatten().tolist(), (adv < 0).nonzero().flatten().tolist()
        chosen = (pos[: count // 2] + neg[: count // 2]) or list(range(min(count, batch.num_seqs)))
        for i in chosen:  # responses with A ≠ 0 show what credit assignment does
            tok = batch.token_indices([i])[resp[batch.token_indices([i])]]
            start = int(batch.cu_seqlens[i])
            prompt = torch.arange(start, start + int(batch.prompt_lens[i]))
            rows.append({"step": step, "sample": i, "advantage": float(batch["advantage"][i]),
                         "reward": float(batch["reward"][i]),
                         "prompt_ids": batch.tokens[prompt].tolist(),  # to re-score (analyze dlogp)
                         "response_ids": batch.tokens[tok].tolist(),
                         "tokens": self.decode_tokens(batch.tokens[tok].tolist()),
                         "credit": None if weights is None else weights[tok].tolist()})
        record = {"step": step, "samples": rows}
        if weights is not None:
            hist = torch.histc(weights[resp & (batch["advantage_tokens"] != 0)].float(), bins=40,
                               min=0.5, max=1.5)
            record["credit_hist"] = hist.tolist()
            with open(self.out / "credit_tokens.jsonl", "a", encoding="utf-8") as fh:  # token clouds
                sums = token_credit_sums(batch.tokens[resp], weights[resp], batch["advantage_tokens"][resp],
                                         self.decode_tokens)
                fh.write(json.dumps({"step": step, **sums}) + "\n")
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def maybe_eval(self, step: int) -> dict[str, float]:
        every = self.cfg.eval.every
        if not every or (step + 1) % every and step + 1 != self.cfg.train.steps:
            return {}
        return self.evaluate(step)

    def evaluate(self, step: int) -> dict[str, float]:
        seed = step_seed(self.cfg.train.seed, 10_000_000 + step, "round0")  # reproducible across resumes
        results = self.flow.evaluate(  # each generating rank takes a slice of every benchmark
            lambda: text_generator(self.engine, self.tokenizer, self.encode, lambda _call: seed),
            self.eval_sets, self.reward, self.cfg.eval.settings())
        metrics = broadcast_object(results.as_metrics() if results is not None else None)
        if self.rank0:
            (self.out / "eval").mkdir(exist_ok=True)
            (self.out / "eval" / f"step_{step + 1:06d}.md").write_text(results.to_markdown())
        return metrics

    def save(self, step: int, state: dict | None = None) -> Path:
        """Checkpoint the actor and ``state`` (default: resume at ``step + 1``); collective. Saving
        consumes no randomness: the generators are put back as they were, so a run continues exactly
        as a run resumed from this checkpoint does."""
        generators = rng_state()
        state = state or self.trainer_state(step + 1)

        def write(path: Path) -> None:
            self.actor.save_checkpoint(path / "actor")
            torch.save(state["rng"], path / f"rng_rank{self.groups.rank:05d}.pt")  # every rank's own
            if self.rank0:
                torch.save(state, path / "trainer.pt")

        t0 = time.perf_counter()
        with self.lifecycle.checkpoint():  # the actor's weights and optimizer state on the device
            path = self.ckpt.save(state["step"], write, model=self.cfg.model)
        set_rng_state(generators)
        self.schedule.saved(time.perf_counter() - t0)
        self.note("save", step=step, resume_step=state["step"], seconds=time.perf_counter() - t0)
        return path

    def trainer_state(self, resume_step: int, work: Work | None = None) -> dict[str, Any]:
        """What a checkpoint holds besides the actor: where to resume, the data cursor, RNG, credit
        state — and, for a stop inside the train phase, the step's batch and progress."""
        return {"step": resume_step, "prompts": self.prompts.state_dict(), "rng": rng_state(),
                "credit": self.credit.state_dict(), "work": work.state_dict() if work else None}

    def _maybe_resume(self) -> int:
        """Restore the newest checkpoint that verifies (``auto``) or the one named; a checkpoint of
        another model shape or with changed bytes is refused naming the field or file. A checkpoint
        taken inside the train phase also brings back that step's work (``resumed_work``)."""
        self.resumed_work: dict[int, Work] = {}
        self.resumed_rng: dict[str, Any] | None = None
        path = resolve_resume(self.cfg.checkpoint.resume, self.ckpt.root, model=self.cfg.model)
        if path is None:
            return 0
        self.actor.load_checkpoint(path / "actor")
        state = torch.load(path / "trainer.pt", weights_only=False)
        self.prompts.load_state_dict(state["prompts"])
        self.credit.load_state_dict(state["credit"])
        mine = path / f"rng_rank{self.groups.rank:05d}.pt"  # applied when set-up is done (__init__)
        self.resumed_rng = torch.load(mine, weights_only=False) if mine.exists() else state["rng"]
        if state.get("work") is not None:
            self.resumed_work[int(state["step"])] = Work.from_state_dict(state["work"], self.credit)
        return int(state["step"])

    def log_memory(self, phase: str) -> None:
        """On entering a lifecycle phase: the ledger's entries for it (what the planner modelled) next
        to what is measured — the actor's and engine's resident bytes, and on CUDA the peak of the
        phase just left (also a metric, ``memory/<phase>_peak_gib``)."""
        measured = {k: float(v) for k, v in self.actor.resident_bytes().items()}
        if self.engine is not None and hasattr(self.engine, "resident_bytes"):
            measured |= {f"engine {k}": float(v) for k, v in self.engine.resident_bytes().items()}
        if torch.cuda.is_available():
            self.memory_peaks[f"memory/{self._phase_left}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            measured["cuda allocated"] = float(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self._phase_left = phase
        entries = {p: parts for p, parts in self.ledger.phases.items() if LIFECYCLE_PHASE[p] == phase}
        self.note("phase", phase=phase, ledger=entries, measured=measured,
                  released=sorted(getattr(self.engine, "released", ())), offloaded=sorted(self.actor.offloaded))

    def note(self, event: str, **fields: Any) -> None:
        """One line of ``timeline.jsonl`` (rank 0): stage boundaries, phases, saves, stops."""
        if self.rank0:
            with open(self.out / "timeline.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.preemption.uninstall()
        self.log.close()
        for closeable in (self.reward, self.rollout_runtime):
            if closeable is not None and hasattr(closeable, "close"):
                closeable.close()


def sft_warmup(actor: Any, pairs: list[tuple[list[int], list[int]]], steps: int,
               batch_size: int, seed: int = 0) -> list[float]:
    """Supervised warm-up on (prompt ids, target ids) pairs: token-mean NLL of the targets, one optimizer
    step per batch. Used by the CPU demo so RL starts with a non-zero but improvable reward."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with progress("SFT warm-up", steps) as bar:
        for step in range(steps):
            idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
            batch = RolloutBatch.from_samples([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
            stats = actor.train(batch, LossPlan(objective="sft"))
            losses.append(stats["train/pg_loss"])
            bar.advance(summary=f"step {step} nll {losses[-1]:.3f}" if step % 50 == 0 else None)
    return losses


def _summary(step: int, m: dict[str, float]) -> str:
    parts = [f"step {step}", f"reward {m.get('rollout/reward_mean', float('nan')):.3f}",
             f"len {m.get('rollout/response_len_mean', float('nan')):.1f}"]
    if "credit/delta/lambda_bar_std" in m:
        parts.append(f"λ̄ std {m['credit/delta/lambda_bar_std']:.3f}")
    if any(k.startswith("eval/avg/") for k in m):
        parts += [f"{k[9:]} {v:.3f}" for k, v in m.items() if k.startswith("eval/avg/")]
    return f"{' | '.join(parts)} | {m.get('time/step_s', 0):.1f}s"


def run(cfg: Config) -> tuple[list[dict[str, Any]], bool]:
    """Initialise distributed state, train, tear down. Returns (history, preempted)."""
    from delta_megatron.parallel import destroy, init_distributed

    groups = init_distributed(cfg.parallel, seed=cfg.train.seed)
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.fit(), trainer.preempted
    except Exception as err:
        if trainer is not None:
            trainer.close()  # stop the servers this rank started: a requeued job needs their ports
        if hasattr(err, "add_note") and groups.world_size > 1:  # which rank; a lost peer reads like this
            err.add_note(f"delta-megatron: rank {groups.rank} of {groups.world_size} failed. A process of "
                         "another node that died shows up here as a connection error in a collective or an "
                         "HTTP request: look at the other nodes' logs for the first failure.")
        raise
    finally:
        destroy()
