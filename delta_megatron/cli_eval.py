"""``delta-megatron eval``: sample a model on a run config's eval sets (avg@k / pass@k); with ``--rl``,
also the RL model alone and §9.3 selective replace / extrapolation between the two."""

from __future__ import annotations

import sys
from pathlib import Path

from delta_megatron.config import load_run_config
from delta_megatron.utils.commands import command_parser


def main(argv: list[str] | None = None) -> int:
    """``delta-megatron eval``: sample a model (HF dir or our checkpoint) on the run config's eval sets
    with the embedded engine, print the markdown table and write ``eval.md`` / ``eval.csv``; with
    ``--rl``, compare base, RL, selective replace and selective extrapolation (baselines.md §9.3)."""
    parser = command_parser(
        "delta-megatron eval",
        "Sample a model k times per question on the run config's eval sets (embedded engine) and score\n"
        "the answers with the run's verifier: avg@k and pass@k per benchmark and overall.\n"
        "With --rl, --model is the base model and four decodings run on the same prompts and seeds:\n"
        "base, RL, selective replace (gamma = 0) and selective extrapolation (baselines.md 9.3: where\n"
        "the base sample's dlogp <= tau, resample from (1+gamma) log pi_RL - gamma log pi_Base), with\n"
        "the share of resampled tokens.",
        """\
        a model (--model, or model.hf_path): an HF directory, or a run / checkpoint directory (its latest
        checkpoint is exported to <out>/models/); optionally an RL model (--rl, same forms); a YAML
        config (--config) or a recipe (--recipe) for data.eval, the template and eval.* settings;
        dotted overrides""",
        """\
        the markdown table on stdout; eval.md and eval.csv in --out (default <logging.dir>/eval);
        with --rl one table of all four decodings (eval.md) and eval_<decoding>.csv""",
        ["delta-megatron eval --config run.yaml --model runs/x/hf data.eval=[aime24,math500] eval.k=16",
         "delta-megatron eval --config run.yaml --model base_hf --rl runs/x --tau -0.3 --gamma 0.05"])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML run config")
    src.add_argument("--recipe", help="module:function returning a Config (see pipelines/)")
    parser.add_argument("--model", help="HF directory or run / checkpoint directory (sets model.hf_path); "
                        "the base model with --rl")
    parser.add_argument("--rl", help="RL model (HF directory or run / checkpoint directory): compare "
                        "base, RL, selective replace and selective extrapolation")
    parser.add_argument("--tau", type=float, default=-0.3, help="resample where Δlog p <= tau (§9.3)")
    parser.add_argument("--gamma", type=float, default=0.05, help="extrapolation strength γ (§9.3)")
    parser.add_argument("--candidates", type=int, default=50, help="top-k log-probs per model and step")
    parser.add_argument("--temperature", type=float, help="sampling temperature (sets eval.temperature)")
    parser.add_argument("--top-p", type=float, help="top-p (sets eval.top_p)")
    parser.add_argument("--out", help="report directory (default: <logging.dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=4")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    overrides += [f"eval.temperature={args.temperature}"] if args.temperature is not None else []
    overrides += [f"eval.top_p={args.top_p}"] if args.top_p is not None else []
    cfg = load_run_config(args.config, args.recipe, overrides)
    model_src = args.model or cfg.model.hf_path
    if model_src is None:
        parser.error("no weights to evaluate: pass --model <HF dir> or set model.hf_path (a run or checkpoint "
                     "directory works too)")
    out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval"
    extrapolation = None
    if args.rl:
        from delta_megatron.rollout.extrapolation import ExtrapolationConfig
        from delta_megatron.utils.configs import ConfigError, validate

        extrapolation = ExtrapolationConfig(tau=args.tau, gamma=args.gamma, temperature=cfg.eval.temperature,
                                            top_p=cfg.eval.top_p, num_logprobs=args.candidates)
        try:
            validate(extrapolation)
        except ConfigError as err:
            parser.error(f"selective extrapolation: {err} (temperature / top_p come from eval.*)")

    from delta_megatron.tracking import quiet_third_party_warnings

    quiet_third_party_warnings()
    import torch  # heavy imports only once the command line is known to be usable

    from delta_megatron import builders
    from delta_megatron.cli_export import hf_model_dir
    from delta_megatron.eval.evaluate import evaluate
    from delta_megatron.eval.report import compare_markdown, write_report
    from delta_megatron.rollout import make_engine
    from delta_megatron.rollout.requests import step_seed, text_generator

    with torch.no_grad():  # inference only, scoped: an in-process caller keeps its grad mode
        # the base model as an HF dir (a run / checkpoint is exported first): model.hf_path, which also
        # supplies the tokenizer of real datasets
        cfg.model.hf_path = str(hf_model_dir(model_src, out / "models" / "base", "--model"))
        tokenizer, _ = builders.build_tokenizer(cfg, out)
        encode = builders.prompt_encoder(cfg, tokenizer)
        eval_sets = [builders.limit_prompts(cfg, ds, encode) for ds in builders.build_datasets(cfg)[1]]
        if not eval_sets:
            parser.error("no eval sets: set data.eval (e.g. data.eval=[aime24,math500])")
        reward = builders.build_reward(cfg)

        def run(engine):  # the same per-call seeds for every decoding: paired comparisons
            generate = text_generator(engine, tokenizer, encode,
                                      lambda call: step_seed(cfg.train.seed, 20_000_000 + call + 1, "round0"))
            return evaluate(generate, eval_sets, reward, cfg.eval.settings(), prompt_fn=lambda ex: ex)

        try:
            base = load_model(cfg.model.hf_path, out / "models" / "base", "--model")
            engine_of = {}  # decoding label -> engine
            if extrapolation is None:
                engine_of["model"] = make_engine(cfg.rollout, model=base, pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, seed=cfg.train.seed)
            else:
                from delta_megatron.rollout.extrapolating import check_same_vocab

                rl = load_model(args.rl, out / "models" / "rl", "--rl", tokenizer=tokenizer)
                check_same_vocab(base, rl, f"--model {model_src}", f"--rl {args.rl}")
                engine_of.update(two_model_engines(base, rl, extrapolation, tokenizer, cfg.rollout.batch_size,
                                                   cfg.train.seed))
                engine_of["rl"] = make_engine(cfg.rollout, model=rl, pad_token_id=tokenizer.pad_token_id,
                                              eos_token_id=tokenizer.eos_token_id, seed=cfg.train.seed)
            results, extra = {}, {}
            for label, engine in engine_of.items():
                results[label] = run(engine)
                stats = getattr(engine, "stats", None)
                if stats is not None:
                    extra[label] = {"resampled %": stats.selected_frac, "changed %": stats.changed_frac}
        finally:
            reward.close()
        if extrapolation is None:
            print(results["model"].to_markdown(), end="")
            md, _ = write_report(results["model"], out)
            print(f"wrote {md} and {md.with_suffix('.csv')}")
            return 0
        table = compare_markdown(results, extra)
        out.mkdir(parents=True, exist_ok=True)
        header = (f"Selective extrapolation (baselines.md §9.3): tau={extrapolation.tau}, gamma={extrapolation.gamma}, "
                  f"candidates={extrapolation.num_logprobs}, temperature={extrapolation.temperature}, "
                  f"top_p={extrapolation.top_p}, k={cfg.eval.k}\n\n")
        (out / "eval.md").write_text(header + table, encoding="utf-8")
        for label, res in results.items():
            (out / f"eval_{label.split()[0]}.csv").write_text(res.to_csv(), encoding="utf-8")
        print(header + table, end="")
        print(f"wrote {out / 'eval.md'} and eval_<decoding>.csv")
        return 0


def load_model(path: str | Path, work_dir: Path, flag: str, tokenizer=None):
    """An HF causal LM (float32, eval mode) from an HF dir or our run / checkpoint (exported to
    ``work_dir``). With ``tokenizer``, a tokenizer shipped with the model must have the same vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from delta_megatron.cli_export import hf_model_dir

    hf_dir = hf_model_dir(path, work_dir, flag)
    if tokenizer is not None and any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        own = AutoTokenizer.from_pretrained(hf_dir)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{flag} {path}: its tokenizer ({len(own)} tokens) differs from the base model's "
                             f"({len(tokenizer)} tokens); both models must share one tokenizer")
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def two_model_engines(base, rl, cfg, tokenizer, batch_size: int, seed: int) -> dict:
    """The base model alone, selective replace (γ = 0) and selective extrapolation (γ) as engines
    that share one decode loop, so the three draw the same uniforms (the base rows agree with the
    others up to their first resampled token)."""
    from dataclasses import replace

    from delta_megatron.rollout.extrapolating import ExtrapolatingEngine

    def engine(c):
        return ExtrapolatingEngine(base, rl, tokenizer.pad_token_id, tokenizer.eos_token_id, config=c,
                                   batch_size=batch_size, seed=seed)

    return {"base": engine(replace(cfg, select="none")),
            "replace (γ=0)": engine(replace(cfg, gamma=0.0)),
            f"extrapolate (γ={cfg.gamma})": engine(cfg)}
