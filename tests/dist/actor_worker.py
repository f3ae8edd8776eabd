"""torchrun worker for the Megatron actor tests (tests/actor/test_actor_dist.py).

One launch = one parallel layout. Every rank builds the actor from the tiny HF checkpoint ``--hf``
(identical initial weights for every layout), then on the shared test batch:

1. ``old_logprobs`` with DelTA in ``moments``, ``recompute`` and ``cache`` mode (the last one's
   λ̄ is the loss weight), recording ``logp_old``, entropy, λ̄, the DelTA metrics and how many
   schedule runs (transformer forwards over the batch) each mode took;
2. ``score_sequences`` on a few sequences;
3. ``train`` (two PPO mini-batches → two optimizer steps), with the stats of each mini-batch;
4. the HF-named weights after the step (``named_hf_weights`` on the sender; other DP replicas
   export their own copy with ``megatron_to_hf`` to check the replicas agree);
5. ``old_logprobs`` again with the updated weights.

Each rank writes ``rank{r}.pt``; the parent merges the ranks (tokens a rank owns, last-stage
values, each stage's weights) and compares with the references. The helpers (config, batch, HF
checkpoint) are imported by the single-process tests too.

``--sp-torch-norm``: megatron-core's local spec falls back to ``WrappedTorchNorm`` without apex,
which asserts ``not config.sequence_parallel``. This flag swaps in a torch RMSNorm whose weight is
marked ``sequence_parallel`` (so ``finalize_model_grads`` all-reduces its gradient over TP, as
megatron does for apex/TE norms) — the norm itself is per token, so it is exact on a sequence
shard. It lets the actor's sequence-parallel paths (SP padding, λ̄ row gather, DelTA over
DP×TP) run on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

MODEL = ["model.arch=qwen3", "model.vocab_size=64", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_layers=4", "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "model.max_position_embeddings=128", "model.init_std=0.1", "model.tie_word_embeddings=true",
         "model.rope_theta=1000.0"]
# lr / Adam eps chosen so one step moves weights by ~1e-3..1e-2 and the update stays close to
# linear in the gradient (eps ~ typical |g|): a wrong gradient scale shows in the weights.
TRAIN = ["train.prompts_per_step=4", "train.mini_batches=2", "train.ppo_epochs=1", "train.lr=1e-2",
         "train.warmup_steps=0", "train.lr_schedule=constant", "train.adam_eps=1e-3",
         "train.weight_decay=0.0", "train.grad_clip=3.0", "train.logprob_chunk_tokens=7",
         "train.max_tokens_per_gpu_logprob=24", "train.max_tokens_per_gpu_train=24",
         "rollout.temperature=1.0", "parallel.distributed_optimizer=false"]
DELTA_MODES = ("moments", "recompute", "cache")  # cache last: its λ̄ is the train loss weight
TOPK = 8  # K of the top-K hidden-gradient proxy run (≤ the vocab shard at TP = 2: 64 / 2)


def make_config(hf_dir: str | Path | None, extra: list[str] = ()):
    from delta_megatron.config import load_config

    hf = [f"model.hf_path={hf_dir}"] if hf_dir else []
    return load_config(overrides=MODEL + TRAIN + hf + list(extra))


def write_hf_checkpoint(out: Path, seed: int = 0) -> Path:
    """The tiny Qwen3 of ``MODEL`` from ``build_hf_model(seed)``, norms perturbed (all-ones norms
    would hide swapped q/k norms), saved as safetensors."""
    from delta_megatron.models.hf_config import build_hf_model

    cfg = make_config(None)
    model = build_hf_model(cfg.model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out))
    return out


def load_hf(hf_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def make_batch(vocab: int = 64, seed: int = 0):
    """12 variable-length samples in 4 prompt groups of 3. Rewards give mixed groups (non-zero
    advantages of both signs) and one all-equal group (advantage 0: DelTA's Z0 tokens)."""
    from delta_megatron.algo import compute_advantages
    from delta_megatron.algo.config import AlgoConfig
    from delta_megatron.batch import RolloutBatch

    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for g in range(4):
        prompt = [1] + torch.randint(3, vocab, (2 + g % 3,), generator=gen).tolist()
        for _ in range(3):
            n = int(torch.randint(2, 11, (1,), generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (n,), generator=gen).tolist() + [2])
    rewards = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1., 1., 0., 1., 0.])  # group 2: all equal
    group_id = torch.arange(12) // 3
    batch = RolloutBatch.from_samples(prompts, responses, reward=rewards, group_id=group_id)
    batch.add_sample_field("advantage", compute_advantages(AlgoConfig(), rewards, group_id))
    batch.add_token_field("advantage_tokens", batch.per_token("advantage"))
    return batch


# fidelity.md §1/§5 in the actor: FIPO (kept-token normaliser) with the seq-mask-tis rollout correction
FIDELITY = ["algo.loss.name=fipo", "algo.rollout_correction=seq-mask-tis"]


def fidelity_fields(batch, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_old, logp_rollout) built from the old-policy log-probs ``logp`` so that responses leave
    the normaliser in both mini-batches: two of sample 1's tokens (A < 0) at ratio e³ ≈ 20 > c
    (dual-clipped twice: FIPO drops it), one of sample 10's (A < 0, dual-clipped once: kept); the engine
    log-probs a little off everywhere (log ρ = −0.1 sin t) and by −1 on samples 3 and 9 (geometric-
    mean ratio ≈ e > 2: seq-mask-tis drops them)."""
    old = logp.clone()

    def response(i: int) -> torch.Tensor:
        t = batch.token_indices([i])
        return t[batch.loss_mask[t]]

    old[response(1)[:2]] -= 3.0
    old[response(10)[:1]] -= 3.0
    rollout = old + 0.1 * torch.sin(torch.arange(batch.num_tokens, dtype=old.dtype))
    for i in (3, 9):
        rollout[response(i)] -= 1.0
    return old, rollout


def score_inputs(batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sequences and masks for ``score_sequences``: first five samples, responses only."""
    seqs, masks = [], []
    for i in range(5):
        s, e = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        seqs.append(batch.tokens[s:e].clone())
        m = torch.zeros(e - s, dtype=torch.bool)
        m[int(batch.prompt_lens[i]):] = True
        masks.append(m)
    return seqs, masks


def install_sp_torch_norm() -> None:
    """See the module docstring (``--sp-torch-norm``): megatron's ``WrappedTorchNorm`` builds the
    same torch RMSNorm, with the sequence-parallel mark instead of the assertion."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from delta_megatron.models import gpt

    def new(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        assert config.normalization == "RMSNorm"
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = new
    gpt._apex_norm_available = lambda: True


def record_minibatches(actor) -> list[dict]:
    """Spy: the stats of every mini-batch ``train`` runs (``train`` returns their mean)."""
    stats: list[dict] = []
    inner = actor._train_minibatch

    def spy(*args, **kwargs):
        out = inner(*args, **kwargs)
        stats.append(dict(out))
        return out

    actor._train_minibatch = spy
    return stats


def count_runs(actor) -> list[int]:
    """Spy: number of pipeline-schedule runs (each is one forward over the rank's micro-batches)."""
    calls = [0]
    inner = actor._run

    def spy(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    actor._run = spy
    return calls


def export_weights(actor) -> dict[str, torch.Tensor]:
    """HF weights of this rank's stage: the sender's ``named_hf_weights``; on other DP replicas the
    replica's own weights via ``megatron_to_hf`` (collective over TP, like the sender's)."""
    from delta_megatron.models.converter import megatron_to_hf
    from delta_megatron.models.gpt import unwrap

    out = {n: t.clone() for bucket in actor.named_hf_weights(bucket_bytes=1 << 14) for n, t in bucket}
    if actor.groups.dp_cp_rank != 0:
        out = {n: t for bucket in megatron_to_hf([unwrap(m) for m in actor.model], actor.cfg.model,
                                                 tp_group=actor.groups.tp) for n, t in bucket}
    return out


def fidelity_run(actor) -> dict:
    """old_logprobs → ``fidelity_fields`` → train (two mini-batches); the stats and HF weights."""
    from delta_megatron.credit_contract import LossPlan

    batch = make_batch()
    actor.old_logprobs(batch)
    old, rollout = fidelity_fields(batch, batch["logp_old"])
    batch.add_token_field("logp_old", old, overwrite=True)
    batch.add_token_field("logp_rollout", rollout)
    minis = record_minibatches(actor)
    mean = actor.train(batch, LossPlan())
    return {"minis": minis, "mean": mean, "weights": export_weights(actor)}


def selection_run(actor) -> dict:
    """DelTA's top-50 % selection (a ``loss_mask`` target, known only on the tokens a rank owns) as
    the loss mask of one train call (two mini-batches): the stats and HF weights."""
    from delta_megatron.credit.delta import DeltaConfig, DeltaCredit
    from delta_megatron.credit_contract import LossPlan
    from tests.actor.hf_reference import capture_for

    batch = make_batch()
    actor.old_logprobs(batch, capture_for(DeltaCredit(DeltaConfig(mode="cache", selection="top50"))))
    mask = batch["credit_delta"].bool()
    batch.add_token_field("credit_mask", mask)
    minis = record_minibatches(actor)
    mean = actor.train(batch, LossPlan(mask_field="credit_mask"))
    return {"minis": minis, "mean": mean, "weights": export_weights(actor),
            "selected": int((mask & batch["owned"].bool()).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--sp-torch-norm", action="store_true")
    ap.add_argument("--dist-opt", action="store_true")
    ap.add_argument("--fidelity", action="store_true", help="only the FIPO + seq-mask-tis train step")
    ap.add_argument("--selection", action="store_true", help="only the DelTA top50-selection train step")
    args = ap.parse_args()

    from delta_megatron.actor.megatron_actor import MegatronActor
    from delta_megatron.credit.delta import DeltaConfig, DeltaCredit
    from delta_megatron.credit_contract import LossPlan
    from delta_megatron.parallel import destroy, init_distributed
    from tests.actor.hf_reference import capture_for

    if args.sp_torch_norm:
        install_sp_torch_norm()
    cfg = make_config(args.hf, [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
                                f"parallel.vpp={args.vpp if args.vpp else 'null'}",
                                f"parallel.sequence_parallel={str(args.sp).lower()}",
                                f"parallel.distributed_optimizer={str(args.dist_opt).lower()}"]
                      + (FIDELITY if args.fidelity else []))
    groups = init_distributed(cfg.parallel, seed=3)
    try:
        if args.fidelity:
            torch.save(fidelity_run(MegatronActor(cfg.actor_config(), groups)) | {"dp_rank": groups.dp_cp_rank},
                       Path(args.out) / f"rank{groups.rank}.pt")
            return
        if args.selection:
            torch.save(selection_run(MegatronActor(cfg.actor_config(), groups)) | {"dp_rank": groups.dp_cp_rank},
                       Path(args.out) / f"rank{groups.rank}.pt")
            return
        actor = MegatronActor(cfg.actor_config(), groups)
        runs = count_runs(actor)
        batch = make_batch()
        owned = torch.zeros(batch.num_tokens, dtype=torch.bool)
        owned[batch.token_indices(sorted(i for s in actor.local_shards(batch) for i in s))] = True
        res: dict = {"rank": groups.rank, "is_last": groups.is_last_stage, "owned": owned,
                     "dp_rank": groups.dp_cp_rank, "modes": {}}
        topk = DeltaCredit(DeltaConfig(mode="cache", proxy="topk_hidden", topk_k=TOPK))  # §9.5 ablation
        res["topk"] = {"metrics": actor.old_logprobs(batch, capture_for(topk)),
                       "credit": batch["credit_delta"].clone()}
        for mode in DELTA_MODES:
            before = runs[0]
            metrics = actor.old_logprobs(batch, capture_for(DeltaCredit(DeltaConfig(mode=mode)), entropy=True))
            res["modes"][mode] = {"credit": batch["credit_delta"].clone(), "metrics": metrics,
                                  "runs": runs[0] - before}
        res["logp_old"] = batch["logp_old"].clone()
        res["entropy"] = batch["entropy"].clone()
        res["score"] = actor.score_sequences(*score_inputs(batch))
        mini_stats = record_minibatches(actor)
        res["train_mean"] = actor.train(batch, LossPlan(weight_field="credit_delta"))
        res["train_minibatches"] = mini_stats
        res["weights"] = export_weights(actor)
        after = make_batch()
        actor.old_logprobs(after)
        res["logp_after"] = after["logp_old"].clone()
        torch.save(res, Path(args.out) / f"rank{groups.rank}.pt")
    finally:
        destroy()


if __name__ == "__main__":
    main()
