"""``delta-megatron eval``: sample an HF checkpoint on a run config's eval sets (avg@k / pass@k)."""

from __future__ import annotations

import sys
from pathlib import Path

from delta_megatron.config import load_run_config
from delta_megatron.utils.commands import command_parser


def main(argv: list[str] | None = None) -> int:
    """``delta-megatron eval``: sample an HF checkpoint on the run config's eval sets with the embedded
    engine, print the markdown table and write ``eval.md`` / ``eval.csv``."""
    parser = command_parser(
        "delta-megatron eval",
        "Sample an HF checkpoint k times per question on the run config's eval sets (embedded engine)\n"
        "and score the answers with the run's verifier: avg@k and pass@k per benchmark and overall.",
        """\
        an HF model directory (--model, or model.hf_path), a YAML config (--config) or a recipe
        (--recipe) for data.eval, the template and eval.* settings; dotted overrides""",
        """\
        the markdown table on stdout; eval.md and eval.csv in --out (default <logging.dir>/eval)""",
        ["delta-megatron eval --config run.yaml --model runs/x/hf data.eval=[aime24,math500] eval.k=16"])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML run config")
    src.add_argument("--recipe", help="module:function returning a Config (see pipelines/)")
    parser.add_argument("--model", help="HF checkpoint directory (sets model.hf_path)")
    parser.add_argument("--out", help="report directory (default: <logging.dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=4")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides) + ([f"model.hf_path={args.model}"] if args.model else [])
    cfg = load_run_config(args.config, args.recipe, overrides)
    if cfg.model.hf_path is None:
        parser.error("no weights to evaluate: pass --model <HF dir> or set model.hf_path")
    out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval"

    import torch  # heavy imports only once the command line is known to be usable
    from transformers import AutoModelForCausalLM

    from delta_megatron import builders
    from delta_megatron.eval.evaluate import evaluate
    from delta_megatron.eval.report import write_report
    from delta_megatron.rollout import make_engine
    from delta_megatron.rollout.requests import step_seed, text_generator

    tokenizer, _ = builders.build_tokenizer(cfg, out)
    encode = builders.prompt_encoder(cfg, tokenizer)
    eval_sets = [builders.limit_prompts(cfg, ds, encode) for ds in builders.build_datasets(cfg)[1]]
    if not eval_sets:
        parser.error("no eval sets: set data.eval (e.g. data.eval=[aime24,math500])")
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, dtype=torch.float32)
    engine = make_engine(cfg.rollout, model=model, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, seed=cfg.train.seed)
    # distinct per-call seeds, reproducible across runs
    generate = text_generator(engine, tokenizer, encode,
                              lambda call: step_seed(cfg.train.seed, 20_000_000 + call + 1, "round0"))
    reward = builders.build_reward(cfg)
    try:
        results = evaluate(generate, eval_sets, reward, cfg.eval.settings(), prompt_fn=lambda ex: ex)
    finally:
        reward.close()
    print(results.to_markdown(), end="")
    md, _ = write_report(results, out)
    print(f"wrote {md} and {md.with_suffix('.csv')}")
    return 0
