"""The embedded CPU default (``make demo``): a tiny Qwen3-style model learns 3-digit addition.

1. SFT warm-up on the synthetic task (operands of 1..3 digits) so RL starts with a non-zero but
   improvable reward (DEMO-SIZING.md: pass@1 ≈ 0.15–0.2 after ~300 steps);
2. the warm-started weights are exported to HF safetensors (the same converter the weight sync uses);
3. two RL runs from that checkpoint, identical except for token credit: DelTA and plain DAPO;
4. pictures: curves of both runs, the λ̄ distribution, an HTML heat-map of λ̄ over sample responses and
   token clouds (the tokens with the highest / lowest mean λ̄ over the DelTA run).

At this scale DelTA and DAPO are not distinguishable (DEMO-SIZING.md); the demo shows that DelTA runs,
matches DAPO, and what it weights — not a win.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from delta_megatron.config import Config, load_config

MODEL = ["model.arch=qwen3", "model.vocab_size=17", "model.hidden_size=128", "model.intermediate_size=384",
         "model.num_layers=4", "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "model.max_position_embeddings=64", "model.tie_word_embeddings=true",
         # prompt + response must fit the 64-token context ("999+999=" is 9 tokens with BOS)
         "rollout.max_prompt_len=16", "rollout.max_new_tokens=6", "eval.max_new_tokens=6"]


def config(out: str = "runs/demo", method: str = "delta", steps: int = 40, seed: int = 1) -> Config:
    """The RL run of the demo (``delta`` or ``dapo``); used by ``delta-megatron train --recipe``."""
    return load_config(overrides=MODEL + [
        "data.train=synthetic:arith", "data.synthetic_digits=3", f"data.shuffle_seed={seed}",
        "rollout.n_samples=8", "rollout.temperature=1.0",
        f"train.steps={steps}", "train.prompts_per_step=64", "train.mini_batches=2", "train.lr=5e-4",
        f"train.warmup_steps={min(5, steps)}", "train.grad_clip=1.0", f"train.seed={seed}",
        "train.max_tokens_per_gpu_logprob=1024", "train.max_tokens_per_gpu_train=1024",
        "algo.loss.name=ppo", "algo.loss.clip_low=0.2", "algo.loss.clip_high=0.28",
        f"credit.methods=[{method}]" if method != "dapo" else "credit.methods=[]",
        "reward.kind=exact_match", "eval.every=10", "eval.k=4", "eval.top_p=1.0",
        "eval.max_prompts=128", f"logging.dir={out}/{method}", "logging.log_every=5",
        "parallel.distributed_optimizer=false"])


def smoke_config(out: str = "runs/smoke", method: str = "delta", steps: int = 2, seed: int = 1) -> Config:
    """A seconds-per-step run for tests and launcher checks: 2 layers × 32 wide, 8 prompts × 4 samples."""
    return load_config(base=config(out, method, steps, seed), overrides=[
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
        "rollout.n_samples=4", "train.prompts_per_step=8", "train.warmup_steps=0", "eval.every=0",
        "logging.log_every=1", "logging.tensorboard=false", "data.synthetic_size=256"])


def sft_config(out: str, seed: int = 1) -> Config:
    return load_config(overrides=MODEL + [
        "data.train=synthetic:arith", "train.lr=2e-3", "train.warmup_steps=1", "train.steps=1",
        "train.mini_batches=1", "train.prompts_per_step=128", f"train.seed={seed}",
        "train.max_tokens_per_gpu_train=1024", f"logging.dir={out}/sft", "parallel.distributed_optimizer=false"])


def run_sft(out: Path, steps: int, seed: int, cfg: Config | None = None) -> Path:
    """Train from scratch with token-mean NLL on 1..3-digit sums, export HF weights + tokenizer
    (``cfg``: another task/model's SFT config, e.g. the scaffolded scratchpad's)."""
    from delta_megatron.builders import arithmetic_task, build_actor, build_tokenizer
    from delta_megatron.cli_export import export_hf
    from delta_megatron.parallel import destroy, init_distributed
    from delta_megatron.trainer import sft_warmup

    cfg = cfg or sft_config(str(out), seed)
    groups = init_distributed(cfg.parallel, seed=seed)
    try:
        tokenizer, tok_dir = build_tokenizer(cfg, out)
        task = arithmetic_task(cfg)
        pairs = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id]) for p, c in task.sft_pairs(20000, seed=seed)]
        actor = build_actor(cfg, groups, total_optimizer_steps=steps)
        losses = sft_warmup(actor, pairs, steps, batch_size=128, seed=seed)
        model_dir = export_hf(actor.model, cfg, out / "sft_model", tokenizer_dir=tok_dir)
        (out / "sft").mkdir(parents=True, exist_ok=True)
        (out / "sft" / "loss.json").write_text(json.dumps(losses))
        return model_dir
    finally:
        destroy()


def main(argv: list[str] | None = None) -> int:
    from delta_megatron.tracking import quiet_third_party_warnings
    from delta_megatron.trainer import run
    from delta_megatron.viz import (
        lambda_heatmap_html,
        plot_curves,
        plot_lambda_distribution,
        write_token_clouds,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default="delta,dapo")
    args = parser.parse_args(argv)
    quiet_third_party_warnings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    model_dir = run_sft(out, args.sft_steps, args.seed)
    timings["sft_s"] = time.perf_counter() - t0
    runs = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        cfg = config(str(out), method, args.rl_steps, args.seed)
        cfg = load_config(base=cfg, overrides=[f"model.hf_path={model_dir}", f"data.tokenizer={model_dir}"])
        run(cfg)
        timings[f"rl_{method}_s"] = time.perf_counter() - t0
        runs[method.upper() if method == "dapo" else "DelTA"] = out / method
    plot_curves(runs, out / "curves.png")
    if "delta" in args.methods:
        plot_lambda_distribution(out / "delta", out / "lambda_distribution.png")
        lambda_heatmap_html(out / "delta", out / "lambda_heatmap.html")
        write_token_clouds(out / "delta", out)  # token_clouds.png / .md: mean λ̄ per token over the run
    summary = summarize(runs, timings)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    return 0


def summarize(runs: dict[str, Path], timings: dict[str, float]) -> str:
    from delta_megatron.tracking import read_metrics

    lines = ["# CPU demo summary", "", "| run | first reward | last reward | final held-out avg@4 | s/step |",
             "|---|---|---|---|---|"]
    for label, path in runs.items():
        rows = read_metrics(path / "metrics.jsonl")
        evals = [r["eval/avg/avg@4"] for r in rows if "eval/avg/avg@4" in r]
        first = sum(r["rollout/reward_mean"] for r in rows[:3]) / max(len(rows[:3]), 1)
        last = sum(r["rollout/reward_mean"] for r in rows[-3:]) / max(len(rows[-3:]), 1)
        step_s = sum(r["time/step_s"] for r in rows) / max(len(rows), 1)
        lines.append(f"| {label} | {first:.3f} | {last:.3f} | {evals[-1] if evals else float('nan'):.3f} "
                     f"| {step_s:.2f} |")
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
              "", "Pictures: curves.png, lambda_distribution.png, lambda_heatmap.html, token_clouds.png "
              "(table: token_clouds.md)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
