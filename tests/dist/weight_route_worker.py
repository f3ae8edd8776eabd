"""torchrun worker for tests/rollout/test_weight_routes.py: one weight sync along each of ``--routes``.

Every rank builds the tiny actor from ``--hf``, adds 0.125 to every parameter (layout-invariant, so
each HF tensor becomes checkpoint + 0.125); then per route it builds the rollout runtime of the
config (fake SGLang servers started by the placement on this "node"'s address, or the embedded
engine on rank 0), syncs once and closes it. With ``check_weights`` every receiving client compares the servers' copies with what it
streamed; rank 0 then reads every weight back (``/get_weights_by_name``, or the embedded model) and
writes the largest difference from checkpoint + 0.125 to ``--out/result.json`` (per route).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
from pathlib import Path

import torch

from tests.dist.actor_worker import make_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--routes", default="auto", help="comma list: embedded, auto, ipc, distributed, disk")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(360, exit=True)  # a hang shows its stacks before the test's timeout

    from delta_megatron.actor.megatron_actor import MegatronActor
    from delta_megatron.parallel import destroy, init_distributed

    cfg = make_config(args.hf, [*args.overrides, f"logging.dir={args.out}"])
    groups = init_distributed(cfg.parallel, seed=0)
    actor = MegatronActor(cfg.actor_config(), groups)
    with torch.no_grad():
        for chunk in actor.model:
            for p in chunk.parameters():
                p.add_(0.125)
    results = {}
    for route in args.routes.split(","):
        extra = ["rollout.engine=embedded"] if route == "embedded" else [f"rollout.sglang.weight_sync={route}"]
        results[route] = _sync_once(make_config(args.hf, [*args.overrides, *extra, f"logging.dir={args.out / route}"]),
                                    groups, actor, args.hf)
    if groups.rank == 0:
        (args.out / "result.json").write_text(json.dumps(results))
    destroy()


def _sync_once(cfg, groups, actor, hf: Path) -> dict:
    from delta_megatron.rollout.placement import build_rollout_runtime

    def embedded():
        from delta_megatron.rollout import make_engine
        from tests.dist.actor_worker import load_hf

        return make_engine(cfg.rollout, model=load_hf(hf), pad_token_id=0, eos_token_id=1)

    runtime = build_rollout_runtime(cfg.rollout, cfg.parallel, groups, model_path=str(hf),
                                    log_dir=cfg.logging.dir, embedded=embedded)
    result = {}
    try:
        consumed = runtime.sync_weights(actor)
        if groups.rank == 0:
            from safetensors.torch import load_file

            expected = {n: t + 0.125 for f in hf.glob("*.safetensors") for n, t in load_file(f).items()}
            got = _read_back(runtime, expected)
            result = {"max_diff": max(float((got[n] - t).abs().max()) for n, t in expected.items()),
                      "names": sorted(got), "expected": sorted(expected), "consumed": consumed,
                      "workers": runtime.placement.worker_urls if runtime.placement else []}
        torch.distributed.barrier()  # other nodes keep their servers up until rank 0 has read them
    finally:
        runtime.close()
    return result


def _read_back(runtime, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if runtime.placement is None:  # the embedded engine's own model
        return {n: t for n, t in runtime.engine.model.state_dict().items() if n in expected}
    out = {}
    for url in runtime.placement.worker_urls:  # every server holds the whole model
        for name, t in expected.items():
            rows = runtime.engine.http.post(f"{url}/get_weights_by_name", {"name": name, "truncate_size": 10**6})
            got = torch.tensor(rows)
            if name in out and not torch.equal(out[name], got):
                raise AssertionError(f"{name}: servers disagree")
            out[name] = got.reshape(t.shape)
    return out


if __name__ == "__main__":
    main()
