"""The RLVR loop: rollout → reward → advantages → old-log-prob pass (capture) → token credit →
PPO updates → weight sync → log / eval / save. ``Trainer.fit`` reads like the algorithm; every verb is
one call down (this file, ``components.py``, the actor, the credit pipeline).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron import components as C
from delta_megatron.actor.megatron_actor import LossPlan, MegatronActor
from delta_megatron.algo import compute_advantages
from delta_megatron.algo.dynamic_sampling import keep_groups
from delta_megatron.algo.overlong import overlong_penalty
from delta_megatron.batch import RolloutBatch
from delta_megatron.checkpoint import CheckpointManager, resolve_resume, rng_state, set_rng_state
from delta_megatron.config import Config, dump_yaml, to_dict
from delta_megatron.credit.counterfactual import tokenizer_decoder
from delta_megatron.credit.pipeline import CreditPipeline
from delta_megatron.data.sampler import PromptStream
from delta_megatron.logging import MetricsLogger, progress
from delta_megatron.parallel import get_groups
from delta_megatron.utils.preemption import Preemption


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.groups = get_groups()
        self.rank0 = self.groups.rank == 0
        self.out = Path(cfg.logging.dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank0:
            dump_yaml(cfg, self.out / "config.yaml")
        self.tokenizer, self.tokenizer_dir = C.build_tokenizer(cfg, self.out)
        self.train_set, self.eval_sets = C.build_datasets(cfg)
        self.prompts = PromptStream(self.train_set, cfg.train.prompts_per_step, seed=cfg.data.shuffle_seed)
        self.reward = C.build_reward(cfg) if self.rank0 else None  # scoring happens on rank 0
        self.engine = C.build_engine(cfg, self.tokenizer) if self.rank0 else None
        self.actor = MegatronActor(cfg, self.groups)
        self.decode_tokens = tokenizer_decoder(self.tokenizer)  # per-token strings
        self.credit = CreditPipeline(cfg.credit, decode=self.decode_tokens)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or self.out / "checkpoints", cfg.checkpoint.keep)
        self.start_step = self._maybe_resume()
        self.log = MetricsLogger(self.out, cfg.logging.jsonl, cfg.logging.tensorboard,
                                 cfg.logging.wandb_project, config=to_dict(cfg), resume_step=self.start_step)
        self.preemption = Preemption().install()
        self.preempted = False
        self.rollout_stats: dict[str, float] = {}  # dynamic-sampling counters of the last rollout
        C.sync_weights(self.actor, self.engine)  # the engine starts from the actor's weights

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        history = []
        with progress(f"RL {self.out.name}", self.cfg.train.steps - self.start_step,
                      self.cfg.logging.progress) as bar:
            for step in range(self.start_step, self.cfg.train.steps):
                history.append(self.step(step))
                bar.advance(summary=_summary(step, history[-1]))
                if self.preemption.should_stop():  # collective: every rank stops at the same step
                    self.save(step)
                    self.preempted = True
                    break
        self.close()
        return history

    def step(self, step: int) -> dict[str, float]:
        """One RLVR step; returns the logged metrics."""
        t0 = time.perf_counter()
        batch = self.rollout(step)
        batch = self.score(batch)
        batch = self.advantages(batch)
        delta_metrics = self.actor.old_logprobs(batch, capture=self.credit.capture())
        if self.cfg.algo.kl.estimator != "none":
            self.actor.ref_logprobs(batch)  # logp_ref for the KL loss
        plan, credit_metrics = self.credit.assign(batch, score_fn=self.actor.score_sequences)
        train_metrics = self.actor.train(batch, plan)
        C.sync_weights(self.actor, self.engine)
        metrics = {**self.batch_metrics(batch), **self.rollout_stats, **delta_metrics, **credit_metrics, **train_metrics,
                   "time/step_s": time.perf_counter() - t0}
        metrics.update(self.maybe_eval(step))
        logged = self.log.log(step, metrics)
        self.record_samples(step, batch)
        self.maybe_save(step)
        return logged

    # ------------------------------------------------------------------ stages
    def rollout(self, step: int) -> RolloutBatch:
        """Sample ``n`` responses per prompt on rank 0, then give every rank the same batch. Dynamic
        sampling (DAPO): each round draws ``gen_batch_multiplier × prompts_per_step`` prompts and keeps
        the groups whose correctness varies, until ``prompts_per_step`` of them are collected; the
        surplus of the last round is dropped (the data cursor has moved past it, as in DAPO)."""
        batch, stats = None, {}
        if self.rank0:
            ds, want = self.cfg.algo.dynamic_sampling, self.cfg.train.prompts_per_step
            per_round = want * ds.gen_batch_multiplier if ds.enabled else want
            kept: list[RolloutBatch] = []
            groups_kept, generated, round_ = 0, 0, 0
            while groups_kept < want:
                examples = self.prompts.next(per_round)
                first = round_ * per_round
                requests = C.requests_for(self.cfg, self.tokenizer, examples, step, first)
                samples = self.engine.generate(requests)
                part = C.samples_to_batch(samples, {first + i: ex for i, ex in enumerate(examples)},
                                          self.tokenizer)
                generated += len(examples)
                round_ += 1
                if not ds.enabled:
                    kept.append(part)
                    break
                part = self._correctness(part)
                keep = keep_groups(part["acc"], part["group_id"])
                kept.append(part.select(keep.nonzero().flatten().tolist()))
                groups_kept += int(torch.unique(part["group_id"][keep]).numel())
                if 0 < ds.max_gen_batches <= round_ and groups_kept < want:
                    raise RuntimeError(
                        f"dynamic sampling: only {groups_kept} of {want} prompt groups had varying "
                        f"correctness after {round_} rounds of {per_round} prompts; raise "
                        "algo.dynamic_sampling.max_gen_batches or gen_batch_multiplier, or use easier data")
            batch = RolloutBatch.concat(kept)
            if ds.enabled:  # exactly prompts_per_step groups, in generation order
                ids = torch.unique(batch["group_id"])[:want]
                batch = batch.select(torch.isin(batch["group_id"], ids).nonzero().flatten().tolist())
                stats = {"rollout/gen_rounds": float(round_), "rollout/prompts_generated": float(generated),
                         "rollout/informative_group_frac": groups_kept / generated}
        batch, stats = C.broadcast_object((batch, stats))
        self.rollout_stats = stats
        return batch

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """Verifier reward (+ DAPO overlong shaping)."""
        batch = self._correctness(batch)
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

    def _correctness(self, batch: RolloutBatch) -> RolloutBatch:
        """``acc`` (0/1 correctness, what dynamic sampling filters on) and the variant's reward value."""
        if "acc" in batch:
            return batch
        if self.rank0 or not dist.is_initialized():
            rewards, stats = self.reward.score(list(zip(batch.sample_meta["response_text"],
                                                        batch.sample_meta["answer"])))
            payload = (rewards, stats.as_metrics("reward/"))
        else:
            payload = None
        rewards, stats = C.broadcast_object(payload)
        value = torch.tensor(rewards, dtype=torch.float32)
        batch.add_sample_field("acc_reward", value)
        batch.add_sample_field("acc", (value > 0).float())
        batch.sample_meta["verifier_stats"] = [stats] * batch.num_seqs
        return batch

    # ------------------------------------------------------------------ metrics, eval, checkpoints
    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        resp = batch.response_mask
        owned = resp & (batch["logp_old"] != 0) if "logp_old" in batch else resp  # this rank's tokens
        stats = batch.sample_meta.get("verifier_stats", [{}])[0]
        out = {
            "rollout/reward_mean": float(batch["reward"].mean()),
            "rollout/acc_mean": float(batch["acc"].mean()),
            "rollout/response_len_mean": float(batch.response_lens.float().mean()),
            "rollout/truncated_frac": float(batch["truncated"].float().mean()),
            "rollout/entropy_mean": float(batch["entropy"][owned].mean()) if "entropy" in batch else 0.0,
            "rollout/num_samples": float(batch.num_seqs),
        }
        out.update(stats)  # verifier counters and rates, already "reward/…"
        if "logp_rollout" in batch and "logp_old" in batch:  # engine vs actor log-prob mismatch
            diff = (batch["logp_rollout"][owned] - batch["logp_old"][owned]).abs()
            out["rollout/logp_abs_diff"] = float(diff.mean()) if diff.numel() else 0.0
        return out

    def record_samples(self, step: int, batch: RolloutBatch, count: int = 8) -> None:
        """Per-token credit of a few responses (``samples.jsonl``) for heat-maps and inspection; also
        the λ̄ histogram of the whole batch. Rank 0 only; every ``logging.log_every`` steps."""
        import json

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
            rows.append({"step": step, "sample": i, "advantage": float(batch["advantage"][i]),
                         "reward": float(batch["reward"][i]),
                         "tokens": self.decode_tokens(batch.tokens[tok].tolist()),
                         "credit": None if weights is None else weights[tok].tolist()})
        record = {"step": step, "samples": rows}
        if weights is not None:
            hist = torch.histc(weights[resp & (batch["advantage_tokens"] != 0)].float(), bins=40,
                               min=0.5, max=1.5)
            record["credit_hist"] = hist.tolist()
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def maybe_eval(self, step: int) -> dict[str, float]:
        every = self.cfg.eval.every
        if not every or (step + 1) % every and step + 1 != self.cfg.train.steps:
            return {}
        return self.evaluate(step)

    def evaluate(self, step: int) -> dict[str, float]:
        from delta_megatron.eval.evaluate import EvalSettings, evaluate

        results = None
        if self.rank0:
            settings = EvalSettings.from_config(self.cfg.eval)
            results = evaluate(self._generate_texts(step), self.eval_sets, self.reward, settings,
                               prompt_fn=lambda ex: ex)
        metrics = C.broadcast_object(results.as_metrics() if results is not None else None)
        if self.rank0:
            (self.out / "eval").mkdir(exist_ok=True)
            (self.out / "eval" / f"step_{step + 1:06d}.md").write_text(results.to_markdown())
        return metrics

    def _generate_texts(self, step: int):
        from delta_megatron.rollout.engine import SamplingParams

        def generate(prompts, n, temperature, top_p, max_new_tokens):
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n)
            reqs = C.requests_for(self.cfg, self.tokenizer, prompts, 10_000_000 + step, 0, params)
            samples = self.engine.generate(reqs)
            out: list[list[str]] = [[] for _ in prompts]
            for s in sorted(samples, key=lambda s: (int(s.group_id), s.index)):
                out[int(s.group_id)].append(self.tokenizer.decode(s.response_ids, skip_special_tokens=True))
            return out

        return generate

    def maybe_save(self, step: int) -> None:
        every = self.cfg.checkpoint.every
        if every and (step + 1) % every == 0 or step + 1 == self.cfg.train.steps:
            self.save(step)

    def save(self, step: int) -> Path:
        def write(path: Path) -> None:
            self.actor.save_checkpoint(path / "actor")
            if self.rank0:
                torch.save({"step": step + 1, "prompts": self.prompts.state_dict(), "rng": rng_state(),
                            "credit": self.credit.state_dict()}, path / "trainer.pt")

        return self.ckpt.save(step + 1, write)

    def _maybe_resume(self) -> int:
        path = resolve_resume(self.cfg.checkpoint.resume, self.ckpt.root)
        if path is None:
            return 0
        self.actor.load_checkpoint(path / "actor")
        state = torch.load(path / "trainer.pt", weights_only=False)
        self.prompts.load_state_dict(state["prompts"])
        self.credit.load_state_dict(state["credit"])
        set_rng_state(state["rng"])
        return int(state["step"])

    def close(self) -> None:
        self.preemption.uninstall()
        self.log.close()
        for closeable in (self.reward, self.engine):
            if closeable is not None and hasattr(closeable, "close"):
                closeable.close()


def sft_warmup(actor: MegatronActor, pairs: list[tuple[list[int], list[int]]], steps: int,
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

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        return trainer.fit(), trainer.preempted
    finally:
        destroy()
