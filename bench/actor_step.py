"""Megatron actor step: log-prob pass and train step throughput, MFU, and the DelTA / DAPO step ratio.

One RL step of the actor on a random rollout batch, two variants measured round-robin:

- DAPO:  ``old_logprobs(batch)`` + ``train(batch, LossPlan())``
- DelTA: ``old_logprobs(batch, Capture(observers=[DeltaCredit(mode=cache).observer()]))`` + ``train(batch,
  LossPlan(weight_field="credit_delta"))`` — cache mode: no extra transformer forward.

Per phase: median time over ``--repeats`` (after ``--warmup`` rounds), tokens/s, achieved TFLOP/s
and MFU. FLOPs: ``2·N·tokens`` for the forward-only log-prob pass, ``6·N·tokens`` for the train
step, with N the parameters that take part in matmuls (decoder layers + LM head; attention's
sequence-quadratic term is left out, small at these lengths). The peak is ``--peak-tflops``; on CPU
its default (0) measures a large fp32 GEMM on this machine and uses that attainable rate.

Models: ``tiny`` — the CPU demo model (pipelines/tiny_arith_cpu.py MODEL) on a demo-shaped batch
(64 prompts × 8 samples, short sequences); ``1b`` — a Qwen3-1.7B-shaped model (28 layers, d 2048,
vocab 151936) with random weights in BF16, run only when CUDA exists (``--models`` picks).

Run: ``PYTHONPATH=. python bench/actor_step.py`` (docs/benchmarks.md, "Actor step").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipelines.tiny_arith_cpu import MODEL as TINY_MODEL

QWEN3_1B7 = ["model.arch=qwen3", "model.vocab_size=151936", "model.hidden_size=2048",
             "model.intermediate_size=6144", "model.num_layers=28", "model.num_attention_heads=16",
             "model.num_key_value_heads=8", "model.head_dim=128", "model.max_position_embeddings=4096",
             "model.tie_word_embeddings=true", "model.params_dtype=bfloat16"]
# name -> (model overrides, prompts, samples per prompt, prompt len range, response len range, budget)
MODELS = {
    "tiny": (TINY_MODEL, 64, 8, (6, 11), (2, 7), 1024),
    "1b": (QWEN3_1B7, 32, 8, (128, 513), (256, 1537), 16384),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(cfg, prompts: int, samples: int, prompt_len: tuple[int, int],
               resp_len: tuple[int, int], seed: int = 0):
    """Random prompt groups, binary rewards (mixed groups: DelTA is not degenerate), GRPO advantages."""
    from delta_megatron.algo import compute_advantages
    from delta_megatron.batch import RolloutBatch

    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.model.vocab_size
    ps, rs = [], []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(*prompt_len, (1,), generator=gen)),),
                               generator=gen).tolist()
        for _ in range(samples):
            n = int(torch.randint(*resp_len, (1,), generator=gen))
            ps.append(prompt)
            rs.append(torch.randint(3, vocab, (n,), generator=gen).tolist() + [2])
    rewards = (torch.rand(len(rs), generator=gen) < 0.4).float()
    group_id = torch.arange(len(rs)) // samples
    batch = RolloutBatch.from_samples(ps, rs, reward=rewards, group_id=group_id)
    batch.add_sample_field("advantage", compute_advantages(cfg.algo, rewards, group_id))
    batch.add_token_field("advantage_tokens", batch.per_token("advantage"))
    return batch


def matmul_params(actor) -> int:
    """Parameters used in matmuls: decoder layers + the LM head (the embedding lookup is free)."""
    from delta_megatron.models.gpt import output_weight, unwrap

    gpt = unwrap(actor.model[-1])
    layers = sum(p.numel() for n, p in gpt.named_parameters() if n.startswith("decoder."))
    return layers + output_weight(gpt).numel()


def gemm_tflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Attainable GEMM rate on this device: median of ``repeats`` n×n×n matmuls (n = 8192 on GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


class EngineTimer:
    """Wall time spent inside the DelTA engine (observe, end_pass, values): DelTA's own cost,
    attributed directly instead of read off the difference of two noisy step times."""

    METHODS = ("observe", "end_pass", "values")

    def __init__(self):
        from delta_megatron.credit.delta import DeltaEngine

        self.seconds = 0.0
        self._cls, self._orig = DeltaEngine, {m: getattr(DeltaEngine, m) for m in self.METHODS}
        for m, fn in self._orig.items():
            setattr(DeltaEngine, m, self._timed(fn))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds += time.perf_counter() - t0
        return wrapper

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def step(actor, batch, delta: bool) -> tuple[float, float, float, float]:
    """One actor RL step; (wall, CPU) seconds of the log-prob pass and of the train step."""
    from delta_megatron.credit.delta import DeltaConfig, DeltaCredit
    from delta_megatron.credit_contract import Capture, LossPlan

    capture = Capture(observers=[DeltaCredit(DeltaConfig(mode="cache")).observer()]) if delta else None
    plan = LossPlan(weight_field="credit_delta" if delta else None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    actor.old_logprobs(batch, capture)
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    actor.train(batch, plan)
    sync()
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, t2 - t1, c2 - c1


def bench_model(name: str, args) -> dict:
    from delta_megatron.actor.megatron_actor import MegatronActor
    from delta_megatron.config import load_config
    from delta_megatron.parallel import destroy, init_distributed

    overrides, prompts, samples, plen, rlen, budget = MODELS[name]
    cfg = load_config(overrides=overrides + [
        f"train.prompts_per_step={prompts}", "train.mini_batches=2", "train.lr=1e-5",
        "train.warmup_steps=0", f"train.max_tokens_per_gpu_logprob={budget}",
        f"train.max_tokens_per_gpu_train={budget}", "parallel.distributed_optimizer=false"])
    groups = init_distributed(cfg.parallel, seed=1)
    try:
        actor = MegatronActor(cfg.actor_config(), groups)
        batch = make_batch(cfg, prompts, samples, plen, rlen)
        n_params = matmul_params(actor)
        times = {v: [] for v in ("dapo", "delta")}
        engine_s, paired = [], []
        timer = EngineTimer()
        for r in range(args.warmup + args.repeats):
            for variant in ("dapo", "delta"):  # round-robin: machine drift hits both alike
                t = step(actor, batch, variant == "delta")
                if r >= args.warmup:
                    times[variant].append(t)
            if r >= args.warmup:
                engine_s.append(timer.take())
                dapo, delta = times["dapo"][-1], times["delta"][-1]
                paired.append((delta[0] + delta[2]) / (dapo[0] + dapo[2]))
            timer.take()
    finally:
        destroy()
    med = {v: [statistics.median(x[i] for x in ts) for i in range(4)] for v, ts in times.items()}
    return dict(name=name, tokens=batch.num_tokens, seqs=batch.num_seqs, params=n_params,
                dtype=cfg.model.params_dtype, med=med, engine_s=statistics.median(engine_s),
                paired=statistics.median(paired))


def report(res: dict, peak: float, peak_note: str) -> None:
    n, tok = res["params"], res["tokens"]
    print(f"\n## {res['name']}: {n / 1e6:.2f}M matmul params ({res['dtype']}), {res['seqs']} sequences, "
          f"{tok} tokens/step; peak {peak:.3f} TFLOP/s ({peak_note})\n")
    print("| phase | median wall s | median CPU s | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    rows = []
    for v, label in (("dapo", "DAPO"), ("delta", "DelTA (cache)")):
        lw, lc, tw, tc = res["med"][v]
        rows += [(f"{label}: log-prob pass", lw, lc, 2), (f"{label}: train step", tw, tc, 6),
                 (f"{label}: RL step (both)", lw + tw, lc + tc, 8)]
    for label, wall, cpu, k in rows:  # k·N·tokens FLOPs: 2 forward, 6 forward + backward
        tf = k * n * tok / wall / 1e12
        print(f"| {label} | {wall:.3f} | {cpu:.3f} | {tok / wall:,.0f} | {tf:.4f} | {tf / peak:.1%} |")
    dapo, delta = res["med"]["dapo"], res["med"]["delta"]
    ratio_wall = (delta[0] + delta[2]) / (dapo[0] + dapo[2])
    ratio_cpu = (delta[1] + delta[3]) / (dapo[1] + dapo[3])
    print(f"\nDelTA step / DAPO step: {ratio_wall:.3f} (wall), {ratio_cpu:.3f} (CPU); "
          f"log-prob pass alone: {delta[0] / dapo[0]:.3f} (wall), {delta[1] / dapo[1]:.3f} (CPU); "
          f"median of per-repeat paired ratios: {res['paired']:.3f}")
    dapo_step = dapo[0] + dapo[2]
    print(f"DelTA engine (observe + end_pass + values), timed directly: {res['engine_s'] * 1e3:.1f} ms "
          f"per step = {res['engine_s'] / dapo_step:.2%} of the DAPO RL step -> attributed ratio "
          f"{1 + res['engine_s'] / dapo_step:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="tiny and/or 1b (default: tiny, plus 1b when CUDA exists)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak for MFU; 0 = measured dense GEMM rate (fp32 on CPU, bf16 on GPU)")
    args = ap.parse_args()
    models = args.models or (["tiny", "1b"] if torch.cuda.is_available() else ["tiny"])
    if "1b" in models and not torch.cuda.is_available():
        raise SystemExit("the 1b model needs CUDA (BF16, ~1.7B parameters)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"{args.warmup} warm-up + {args.repeats} repeats, DAPO/DelTA round-robin")
    for name in models:
        res = bench_model(name, args)
        if args.peak_tflops > 0:
            peak, note = args.peak_tflops, "given"
        else:
            dtype = torch.bfloat16 if res["dtype"] == "bfloat16" else torch.float32
            peak, note = gemm_tflops(dtype), f"measured {str(dtype).removeprefix('torch.')} GEMM"
        report(res, peak, note)


if __name__ == "__main__":
    main()
