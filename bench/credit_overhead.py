"""DelTA overhead: the finish work per token vs the log-prob step it rides on (docs/benchmarks.md).

Times, per token and for each hidden size d:

- ``logprob``: LM-head GEMM (h Wᵀ) + log-softmax + gather of the sampled token's log-prob, over the
  vocabulary in chunks (online log-sum-exp) sized to a memory budget — what the old-log-prob pass adds
  on top of the transformer;
- ``lsm``: the log-softmax + gather alone, given the logits;
- DelTA ``cache`` / ``moments`` / ``recompute``: everything ``DeltaEngine`` does for a rollout batch
  given h and log p (proxy, all statistics passes, margins, γ, refinement, λ̄), single process.

It cannot see the transformer forwards that moments / recompute need (K+1 / K+2 extra no-grad
forwards, 0 for cache), which dominate in practice. Run: ``python bench/credit_overhead.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from delta_megatron.credit.delta import DeltaConfig, DeltaEngine


def chunked_logprob(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(h Wᵀ)[y] with the vocabulary processed in chunks (online log-sum-exp)."""
    n = h.shape[0]
    run_max = torch.full((n,), float("-inf"))
    run_sum = torch.zeros(n)
    target = torch.zeros(n)
    for start in range(0, weight.shape[0], chunk):
        logits = h @ weight[start:start + chunk].T  # [n, c]
        new_max = torch.maximum(run_max, logits.max(-1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        run_max = new_max
        hit = (y >= start) & (y < start + logits.shape[1])
        target[hit] = logits[hit, y[hit] - start]
    return target - run_max - run_sum.log()


def log_softmax_gather(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)


def delta_batch(cfg: DeltaConfig, h: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, micro: int) -> torch.Tensor:
    engine = DeltaEngine(cfg, h.shape[1])
    keys = range(0, h.shape[0], micro)
    for p in engine.data_passes():
        for k in keys:
            engine.observe(p, k, h=h[k:k + micro], logp=logp[k:k + micro], adv=adv[k:k + micro],
                           mask=mask[k:k + micro])
        engine.end_pass(p)
    return engine.lambda_bar(0)


def timed(repeats: int, fn, *args) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``fn(*args)`` over ``repeats`` calls. CPU time (all threads of
    this process) is the robust measure on a shared machine; wall time is printed too."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*args)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def per_token(t: tuple[float, float], n: int) -> tuple[float, float]:
    return t[0] / n, t[1] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096, 5120])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=256, help="tokens for the log-prob baselines")
    ap.add_argument("--delta-tokens", type=int, default=2048, help="tokens per DelTA rollout batch")
    ap.add_argument("--micro", type=int, default=512, help="tokens per micro-batch (engine chunk)")
    ap.add_argument("--K", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=20.0, help="memory for one vocab chunk of logits")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for d in args.dims:
        n, nd = args.tokens, args.delta_tokens
        weight = torch.randn(args.vocab, d) * d**-0.5
        h = torch.randn(n, d)
        y = torch.randint(0, args.vocab, (n,))
        chunk = max(1, min(args.vocab, int(args.budget_gb * 2**30 / (3 * 4 * n))))  # logits + 2 temps
        check = chunked_logprob(h[:8], weight, y[:8], chunk)  # warm-up and correctness check
        torch.testing.assert_close(check, log_softmax_gather(h[:8] @ weight.T, y[:8]), atol=1e-4, rtol=0)
        t_lp = per_token(timed(1, chunked_logprob, h, weight, y, chunk), n)
        logits = h @ weight.T
        t_lsm = per_token(timed(args.repeats, log_softmax_gather, logits, y), n)
        del logits, weight
        hd = torch.randn(nd, d)
        logp = -torch.rand(nd) * 3
        adv = torch.randn(nd // 16).repeat_interleave(16)[:nd]
        mask = torch.rand(nd) > 0.05
        row = {"d": d, "logprob": t_lp, "lsm": t_lsm}
        for mode in ("cache", "moments", "recompute"):
            cfg = DeltaConfig(K=args.K, mode=mode)
            delta_batch(cfg, hd[:64], logp[:64], adv[:64], mask[:64], args.micro)  # warm-up
            row[mode] = per_token(timed(args.repeats, delta_batch, cfg, hd, logp, adv, mask, args.micro), nd)
        rows.append(row)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, V={args.vocab}, K={args.K}, "
          f"log-prob over {args.tokens} tokens, DelTA over {args.delta_tokens} tokens "
          f"(micro-batches of {args.micro}); µs/token; ratio = DelTA / logprob (DelTA / lsm)")
    extra = {"cache": 0, "moments": args.K + 1, "recompute": args.K + 2}
    for which, col in (("CPU time", 1), ("wall time", 0)):
        print(f"\n{which}\n\n| d | logprob (GEMM+lsm+gather) | lsm+gather | " + " | ".join(
            f"{m} ({extra[m]} extra fwd)" for m in extra) + " |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            lp, lsm = r["logprob"][col], r["lsm"][col]
            cells = [f"{r[m][col] * 1e6:.2f} ({r[m][col] / lp:.1e} / {r[m][col] / lsm:.2f})" for m in extra]
            print(f"| {r['d']} | {lp * 1e6:.0f} | {lsm * 1e6:.1f} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
