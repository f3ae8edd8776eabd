"""torchrun worker for tests/actor/test_recompute.py: the actor's gradients with each activation-
recompute setting (train.recompute_*), on one parallel layout.

For every variant the worker builds the actor from the same tiny HF checkpoint, runs the old-log-prob
pass and the first optimizer step of ``train`` on the shared test batch, and records (a) this rank's
main gradients just before that step and (b) the bytes autograd saved for backward during the
forward passes (counted by a ``saved_tensors_hooks`` pack hook outside backward), which shows that
recompute really dropped activations. Each rank writes ``rank{r}.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

VARIANTS = {
    "none": [],
    "full_uniform": ["train.recompute_granularity=full", "train.recompute_method=uniform",
                     "train.recompute_num_layers=1"],
    "full_block": ["train.recompute_granularity=full", "train.recompute_method=block",
                   "train.recompute_num_layers=1"],
    "selective": ["train.recompute_granularity=selective", "train.recompute_modules=[core_attn,mlp]"],
}


def first_step(actor, batch, plan) -> tuple[list[torch.Tensor], int]:
    """Main grads before the first optimizer step, and forward-saved bytes of that step's pass."""
    grads: list[torch.Tensor] = []
    saved = [0]
    inner_step, inner_run = actor.optimizer.step, actor._run

    def step():
        if not grads:
            grads.extend(p.main_grad.detach().clone() for p in actor._params())
        return inner_step()

    def pack(t):
        if torch._C._current_graph_task_id() == -1:  # forward, not a recomputation in backward
            saved[0] += t.numel() * t.element_size()
        return t

    def run(mbs, loss_fn, forward_only):
        if forward_only or grads:
            return inner_run(mbs, loss_fn, forward_only)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner_run(mbs, loss_fn, forward_only)

    actor.optimizer.step, actor._run = step, run
    actor.train(batch, plan)
    return grads, saved[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    from delta_megatron.actor.megatron_actor import MegatronActor
    from delta_megatron.credit_contract import LossPlan
    from delta_megatron.parallel import destroy, init_distributed
    from tests.dist.actor_worker import make_batch, make_config

    layout = [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"]
    groups = init_distributed(make_config(args.hf, layout).parallel, seed=3)
    out: dict = {}
    try:
        for name in args.variants.split(","):
            extra = VARIANTS[name]
            actor = MegatronActor(make_config(args.hf, layout + extra).actor_config(), groups)
            batch = make_batch()
            actor.old_logprobs(batch)
            grads, saved = first_step(actor, batch, LossPlan())
            out[name] = {"grads": grads, "saved_bytes": saved}
        torch.save(out, Path(args.out) / f"rank{groups.rank}.pt")
    finally:
        destroy()


if __name__ == "__main__":
    main()
