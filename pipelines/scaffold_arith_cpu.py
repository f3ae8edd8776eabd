"""The scaffolded scratchpad on CPU: a task where token credit can matter (docs/study.md).

The demo's task (``a+b=`` → ~5 answer tokens) has no boilerplate, so every credit method weights the
same few tokens. Here each digit step is a sentence, ``digit 2: 3 plus 9 is 12, write 2 carry 1;``,
whose scaffold (words, punctuation, spaces, the step index) is shared by right and wrong answers and
makes up ``share`` of the response, while a few tokens (the intermediate sums) decide the exact-match
reward on the final answer (``>1112``). Same recipe shape as the demo: an SFT warm-up on operands of
1..``digits`` digits from scratch (so RL starts partly solved), then RL on exactly ``digits`` digits.

    python -m pipelines.scaffold_arith_cpu --out runs/scaffold            # SFT + DelTA and DAPO + plots
    delta-megatron study --recipe pipelines.scaffold_arith_cpu:config \\
        --warm-start pipelines.scaffold_arith_cpu:warm_start --methods dapo,delta --seeds 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from delta_megatron.config import Config, load_config
from delta_megatron.data.synthetic import SCAFFOLD_VOCAB, ArithmeticConfig, ArithmeticTask

# The CPU study's task and model (docs/study.md): 2-digit operands, ~60 % scaffold (responses of ~35
# tokens, ~15 of them operand-dependent); 2 layers × 64 wide learns it to ~0.2-0.3 held-out accuracy in a
# 300-step SFT, so RL starts partly solved.
DIGITS, SHARE, HIDDEN, LAYERS = 2, 0.6, 64, 2


def model(hidden: int = HIDDEN, layers: int = LAYERS) -> list[str]:
    """A Qwen3-shaped model over the scaffold vocabulary (25 tokens, tied embeddings)."""
    return ["model.arch=qwen3", f"model.vocab_size={len(SCAFFOLD_VOCAB)}", f"model.hidden_size={hidden}",
            f"model.intermediate_size={3 * hidden}", f"model.num_layers={layers}",
            "model.num_attention_heads=4", "model.num_key_value_heads=2",
            "model.max_position_embeddings=256", "model.tie_word_embeddings=true"]


def response_budget(digits: int, share: float) -> int:
    """Tokens of the longest target (every digit step sums to 18: two-digit sums, carry out) + EOS."""
    task = ArithmeticTask(ArithmeticConfig(digits=digits, variant="scratchpad", scaffold_share=share))
    top = 10**digits - 1
    return len(task.completion_tokens(top, top)) + 1


def task_overrides(digits: int, share: float) -> list[str]:
    return ["data.train=synthetic:arith-scratchpad", f"data.synthetic_digits={digits}",
            f"data.synthetic_scaffold_share={share}"]


def config(out: str = "runs/scaffold", method: str = "delta", steps: int = 40, seed: int = 1,
           digits: int = DIGITS, share: float = SHARE, hidden: int = HIDDEN, layers: int = LAYERS,
           prompts: int = 64, samples: int = 8) -> Config:
    """One RL run (``delta`` or ``dapo``; ``delta-megatron study`` swaps the method by preset)."""
    budget = response_budget(digits, share)
    return load_config(overrides=model(hidden, layers) + task_overrides(digits, share) + [
        f"data.shuffle_seed={seed}", f"rollout.n_samples={samples}", f"rollout.max_new_tokens={budget}",
        "rollout.temperature=1.0", f"train.steps={steps}", f"train.prompts_per_step={prompts}",
        "train.mini_batches=2", "train.lr=5e-4", f"train.warmup_steps={min(5, steps)}", "train.grad_clip=1.0",
        f"train.seed={seed}", "train.max_tokens_per_gpu_logprob=512", "train.max_tokens_per_gpu_train=512",
        "algo.loss.name=ppo", "algo.loss.clip_low=0.2", "algo.loss.clip_high=0.28",
        f"credit.methods=[{method}]" if method != "dapo" else "credit.methods=[]",
        "reward.kind=exact_match", "eval.every=10", "eval.k=4", "eval.top_p=1.0",
        f"eval.max_new_tokens={budget}", "eval.max_prompts=64", "checkpoint.every=10", "checkpoint.keep=1",
        f"logging.dir={out}/{method}",
        "logging.log_every=2", "logging.tensorboard=false", "parallel.distributed_optimizer=false"])


def smoke_config(out: str = "runs/scaffold-smoke", method: str = "delta", steps: int = 2,
                 seed: int = 1) -> Config:
    """Seconds per step (tests, launcher checks): 2 digits, 2 layers × 32 wide, 8 prompts × 4 samples."""
    return load_config(base=config(out, method, steps, seed, digits=2, hidden=32, layers=2, prompts=8,
                                   samples=4),
                       overrides=["train.warmup_steps=0", "eval.every=0", "logging.log_every=1",
                                  "data.synthetic_size=256"])


def sft_config(cfg: Config, out: str | Path, seed: int = 1) -> Config:
    """Supervised warm-up of ``cfg``'s model on ``cfg``'s task (token-mean NLL, one epoch-free stream)."""
    return load_config(base=Config(model=cfg.model, data=cfg.data), overrides=[
        "train.lr=2e-3", "train.warmup_steps=1", "train.steps=1", "train.mini_batches=1",
        "train.prompts_per_step=128", f"train.seed={seed}", "train.max_tokens_per_gpu_train=512",
        f"logging.dir={out}/sft", "parallel.distributed_optimizer=false"])


def warm_start(cfg: Config, out: Path, steps: int = 300, seed: int = 1) -> list[str]:
    """SFT from scratch on ``cfg``'s model and task, exported to ``out/sft_model``; returns the
    overrides that start every RL run from it (``delta-megatron study --warm-start``)."""
    from pipelines.tiny_arith_cpu import run_sft

    model_dir = run_sft(out, steps, seed, cfg=sft_config(cfg, out, seed))
    return [f"model.hf_path={model_dir}", f"data.tokenizer={model_dir}"]


def smoke_warm_start(cfg: Config, out: Path) -> list[str]:
    """Two SFT steps: the warm-start plumbing of a study test, not a useful model."""
    return warm_start(cfg, out, steps=2)


def main(argv: list[str] | None = None) -> int:
    """SFT warm-up, then one RL run per method from it, curves, λ̄ pictures and token clouds."""
    from delta_megatron.tracking import quiet_third_party_warnings
    from delta_megatron.trainer import run
    from delta_megatron.viz import (
        lambda_heatmap_html,
        plot_curves,
        plot_lambda_distribution,
        write_token_clouds,
    )
    from pipelines.tiny_arith_cpu import summarize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/scaffold")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--digits", type=int, default=DIGITS)
    parser.add_argument("--share", type=float, default=SHARE, help="scaffold share of the response")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--methods", default="delta,dapo")
    args = parser.parse_args(argv)
    quiet_third_party_warnings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(digits=args.digits, share=args.share, hidden=args.hidden, layers=args.layers)
    base = config(str(out), "dapo", args.rl_steps, args.seed, **shape)
    t0 = time.perf_counter()
    warm = warm_start(base, out, args.sft_steps, args.seed)
    timings, runs = {"sft_s": time.perf_counter() - t0}, {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        cfg = config(str(out), method, args.rl_steps, args.seed, **shape)
        run(load_config(base=cfg, overrides=warm))
        timings[f"rl_{method}_s"] = time.perf_counter() - t0
        runs[method] = out / method
    plot_curves(runs, out / "curves.png")
    if (out / "delta").is_dir():
        plot_lambda_distribution(out / "delta", out / "lambda_distribution.png")
        lambda_heatmap_html(out / "delta", out / "lambda_heatmap.html")
        write_token_clouds(out / "delta", out)
    summary = summarize(runs, timings)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
