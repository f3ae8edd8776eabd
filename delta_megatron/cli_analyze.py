"""``delta-megatron analyze dlogp``: what an RL run changed, token by token (baselines.md §9.1).

Samples responses from the base and / or the RL model, scores every token with both (Δlog p, the
entropies, KL(π_RL ‖ π_Base)), and writes:

* ``dlogp_histograms.png`` — entropy, KL and Δlog p over tokens of base- and RL-sampled responses side
  by side (the paper's picture: the two sources overlap in entropy and KL, while Δlog p splits into a
  negative tail on base samples and a positive one on RL samples);
* ``replacement_curve.png`` — base sampling where the positions picked by Δlog p, KL, entropy or at
  random are resampled from the RL model (weights (0, 1)), accuracy against the measured share of
  replaced tokens;
* ``dlogp.md`` — the numbers: summary statistics, the most increased / decreased tokens, the curve
  table and, when the RL run's ``samples.jsonl`` carries DelTA λ̄, its correlation with Δlog p;
* ``token_stats.csv`` — one row per scored token.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from delta_megatron.utils.commands import command_parser

RATES = (0.02, 0.05, 0.1, 0.2, 0.4)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dlogp"]:
        return dlogp_main(argv[1:])
    parser = command_parser(
        "delta-megatron analyze",
        "Look inside a finished RL run. One analysis so far:\n"
        "  dlogp  what the run changed, token by token: Δlog p = log π_RL − log π_Base of base- and\n"
        "         RL-sampled responses next to entropy and KL, the most moved tokens, a selective-\n"
        "         replacement curve, and DelTA λ̄ against Δlog p (delta-megatron analyze dlogp --help)",
        "the analysis name, then its own arguments",
        "see the analysis' --help",
        ["delta-megatron analyze dlogp --base runs/demo/sft_model --rl runs/demo/delta "
         "--data synthetic:arith@eval"])
    parser.add_argument("analysis", choices=["dlogp"], help="dlogp")
    parser.parse_args(argv[:1])  # --help, or an error naming the analyses
    return 2


def _dlogp_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "delta-megatron analyze dlogp",
        "Sample responses from the base and / or the RL model, score every token with both models\n"
        "(Δlog p = log π_RL − log π_Base, both entropies, KL(π_RL ‖ π_Base)), and show where RL moved\n"
        "probability: histograms by sampling model, the most moved tokens, base sampling with the tokens\n"
        "a rule picks (Δlog p, KL, entropy, random) resampled from the RL model (baselines.md 9.1), and\n"
        "for a DelTA run the λ̄ of its recorded samples against their Δlog p.",
        """\
        --base / --rl: HF directories or our run / checkpoint directories (the latest checkpoint is
        exported to <out>/models/); --data: a dataset file or short name (problem + answer) or
        synthetic:arith@eval; the run config (template, reward, tokenizer) from --config / --recipe,
        else the RL run's config.yaml when --rl is a run or checkpoint directory, else the defaults;
        dotted overrides""",
        """\
        in --out: dlogp.md (statistics, most moved tokens, curve table, λ̄ correlation),
        dlogp_histograms.png, replacement_curve.png, lambda_vs_dlogp.png (DelTA runs) and
        token_stats.csv (one row per scored token); dlogp.md is printed too""",
        ["delta-megatron analyze dlogp --base runs/demo/sft_model --rl runs/demo/delta "
         "--data synthetic:arith@eval --k 8 --max-prompts 256 --out runs/demo/analysis"])
    parser.add_argument("--base", required=True, help="base model: HF dir or run / checkpoint dir")
    parser.add_argument("--rl", required=True, help="RL model: HF dir or run / checkpoint dir")
    parser.add_argument("--data", required=True, help="prompts with answers (file, short name or synthetic:…)")
    parser.add_argument("--samples-from", choices=["base", "rl", "both"], default="both",
                        help="which model samples the scored responses (default: both, side by side)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML run config (template, reward, tokenizer)")
    src.add_argument("--recipe", help="module:function returning a Config")
    parser.add_argument("--out", default="analysis/dlogp", help="report directory")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-prompts", type=int, default=128, help="first N prompts of --data")
    parser.add_argument("--max-new-tokens", type=int, help="response length limit (default: eval.max_new_tokens)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p of every sampling here")
    parser.add_argument("--candidates", type=int, default=50, help="top-k log-probs per model and step")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES),
                        help="target replacement rates of the curve (comma separated; '' = no curve)")
    parser.add_argument("--lambda-run", help="run directory whose samples.jsonl holds DelTA λ̄ (default: "
                        "the RL run when --rl is a run or checkpoint directory)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.template=plain")
    return parser


def dlogp_main(argv: list[str]) -> int:
    """``delta-megatron analyze dlogp``: see :func:`_dlogp_parser` (``--help``)."""
    parser = _dlogp_parser()
    args = parser.parse_intermixed_args(argv)
    if args.k < 1 or args.max_prompts < 1:
        parser.error(f"--k {args.k} / --max-prompts {args.max_prompts}: both must be >= 1")
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: comma-separated fractions in (0, 1), e.g. 0.05,0.1")
    if any(not 0 < r < 1 for r in rates):
        parser.error(f"--rates {args.rates!r}: each rate must be in (0, 1)")
    run_dir = _run_dir(args.rl)
    config = args.config
    if config is None and args.recipe is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        config = str(run_dir / "config.yaml")

    from delta_megatron.config import load_run_config
    from delta_megatron.rollout.extrapolation import ExtrapolationConfig
    from delta_megatron.utils.configs import ConfigError, validate

    cfg = load_run_config(config, args.recipe, list(args.overrides))
    decode_cfg = ExtrapolationConfig(gamma=0.0, temperature=args.temperature, top_p=args.top_p,
                                     num_logprobs=args.candidates)
    try:
        validate(decode_cfg)
    except ConfigError as err:
        parser.error(f"sampling settings: {err}")
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from delta_megatron.tracking import quiet_third_party_warnings

    quiet_third_party_warnings()
    import torch

    with torch.no_grad():  # inference only, scoped: an in-process caller keeps its grad mode
        from delta_megatron import builders
        from delta_megatron.cli_eval import load_model
        from delta_megatron.data.datasets import load_dataset
        from delta_megatron.rollout.extrapolating import check_same_vocab

        tokenizer, _ = builders.build_tokenizer(cfg, out)
        base = load_model(args.base, out / "models" / "base", "--base")
        rl = load_model(args.rl, out / "models" / "rl", "--rl", tokenizer=tokenizer)
        check_same_vocab(base, rl, f"--base {args.base}", f"--rl {args.rl}")
        synthetic = builders.arithmetic_task(cfg).cfg if args.data.startswith("synthetic:") else None
        encode = builders.prompt_encoder(cfg, tokenizer)
        examples = list(builders.limit_prompts(
            cfg, load_dataset(args.data, max_rows=args.max_prompts, synthetic=synthetic), encode))
        reward = builders.build_reward(cfg)
        study = _Study(base, rl, tokenizer, encode, reward, examples, args, max_new)
        try:
            sources = ["base", "rl"] if args.samples_from == "both" else [args.samples_from]
            tables = {s: study.sample_and_score(s) for s in sources}
            calib = tables.get("base", tables[sources[0]])
            curve = study.replacement_curve(decode_cfg, calib, rates) if rates else []
        finally:
            reward.close()
        lam = lambda_correlation(Path(args.lambda_run) if args.lambda_run else run_dir, base, rl, tokenizer)
        md = write_report(out, tables, study.accuracy, curve, lam, tokenizer, vars(args), max_new)
        print(md.read_text(encoding="utf-8"))
        print(f"wrote {md}, {out / 'dlogp_histograms.png'}, {out / 'token_stats.csv'}"
              + (f", {out / 'replacement_curve.png'}" if curve else ""))
        return 0


def _run_dir(path: str) -> Path | None:
    """The run directory of a run / checkpoints / step argument (None for an HF directory)."""
    p = Path(path)
    if (p / "config.json").is_file() or not p.exists():
        return None
    from delta_megatron.cli_export import resolve_checkpoint

    try:
        return resolve_checkpoint(p)[1]
    except FileNotFoundError:
        return None


class _Study:
    """Sampling, scoring and the replacement curve on one prompt set with one seed."""

    def __init__(self, base, rl, tokenizer, encode, reward, examples, args, max_new: int):
        self.base, self.rl, self.tokenizer, self.encode, self.reward = base, rl, tokenizer, encode, reward
        self.examples, self.args, self.max_new = examples, args, max_new
        self.accuracy: dict[str, float] = {}  # source -> mean reward > 0 of its samples

    def _seed(self, what: str) -> int:
        from delta_megatron.rollout.requests import step_seed

        return step_seed(self.args.seed, 30_000_000, what)

    def sample_and_score(self, source: str):
        import torch

        from delta_megatron.eval.dlogp import score_responses
        from delta_megatron.rollout.embedded import EmbeddedEngine
        from delta_megatron.rollout.engine import SamplingParams
        from delta_megatron.rollout.requests import requests_for

        model = self.base if source == "base" else self.rl
        engine = EmbeddedEngine(model, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        params = SamplingParams(temperature=self.args.temperature, top_p=self.args.top_p,
                                max_new_tokens=self.max_new, n=self.args.k, seed=self._seed(source))
        samples = engine.generate(requests_for(self.examples, self.encode, params, step=0, first_group=0))
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        rewards = self._rewards(texts, [self.examples[int(s.group_id)].answer for s in samples])
        self.accuracy[source] = sum(r > 0 for r in rewards) / max(len(rewards), 1)
        table = score_responses(self.base, self.rl, [s.prompt_ids for s in samples],
                                [s.response_ids for s in samples], pad_token_id=self.tokenizer.pad_token_id)
        table.reward = torch.tensor(rewards, dtype=torch.float32)[table.seq]
        return table

    def _rewards(self, texts, answers) -> list[float]:
        out = self.reward.score(list(zip(texts, answers)))
        return list(out[0] if isinstance(out, tuple) else out)

    def replacement_curve(self, decode_cfg, calib, rates):
        """Selective replace (γ = 0) with each selection rule at thresholds calibrated on ``calib``'s
        tokens to the target rates; the base model alone (rate 0) and full replacement close the curve."""
        from delta_megatron.eval.dlogp import STATISTICS, thresholds_for_rates

        points = [self._point(replace(decode_cfg, select="none"), "none", None, 0.0),
                  self._point(replace(decode_cfg, select="all"), "all", None, 1.0)]
        for criterion, (column, tail) in STATISTICS.items():
            values = getattr(calib, column)
            for rate, thr in zip(rates, thresholds_for_rates(values, rates, tail)):
                cfg = replace(decode_cfg, select=criterion, tau=thr) if criterion == "dlogp" else replace(
                    decode_cfg, select=criterion, threshold=thr)
                points.append(self._point(cfg, criterion, thr, rate))
        for rate in rates:
            points.append(self._point(replace(decode_cfg, select="random", threshold=rate), "random", rate, rate))
        return points

    def _point(self, cfg, criterion: str, threshold, rate: float):
        from delta_megatron.eval.dlogp import CurvePoint
        from delta_megatron.eval.evaluate import EvalSettings, evaluate
        from delta_megatron.rollout.extrapolating import ExtrapolatingEngine
        from delta_megatron.rollout.requests import text_generator

        engine = ExtrapolatingEngine(self.base, self.rl, self.tokenizer.pad_token_id,
                                     self.tokenizer.eos_token_id, config=cfg)
        seed = self._seed("curve")  # one seed for every point: paired comparisons
        generate = text_generator(engine, self.tokenizer, self.encode, lambda _call: seed)
        settings = EvalSettings(k=self.args.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=self.max_new, prompts_per_call=len(self.examples))
        res = evaluate(generate, {"data": self.examples}, self.reward, settings, prompt_fn=lambda ex: ex)
        return CurvePoint(criterion, threshold, rate, engine.stats.selected_frac, res.benchmarks[0].metrics())


def lambda_correlation(run_dir: Path | None, base, rl, tokenizer) -> dict | None:
    """Δlog p (base -> final RL model) of the tokens whose DelTA λ̄ the run recorded in
    ``samples.jsonl``, and its correlation with λ̄: overall and per advantage sign. None when the run
    has no such file; a dict with a ``note`` when its rows cannot be re-scored."""
    if run_dir is None or not (run_dir / "samples.jsonl").is_file():
        return None
    from delta_megatron.eval.dlogp import correlation, score_responses

    rows = []
    for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows += [s for s in json.loads(line).get("samples", []) if s.get("credit")]
    if not rows:
        return {"note": f"{run_dir / 'samples.jsonl'} holds no λ̄ (not a DelTA run)"}
    scorable = [s for s in rows if "prompt_ids" in s and "response_ids" in s]
    if not scorable:
        return {"note": f"{run_dir / 'samples.jsonl'} predates prompt_ids / response_ids: its responses "
                        "cannot be re-scored"}
    import torch

    table = score_responses(base, rl, [s["prompt_ids"] for s in scorable], [s["response_ids"] for s in scorable],
                            pad_token_id=tokenizer.pad_token_id)
    lam = torch.tensor([w for s in scorable for w in s["credit"]], dtype=torch.float64)
    adv = torch.tensor([s["advantage"] for s in scorable], dtype=torch.float64)[table.seq]
    delta = table.delta.double()
    out = {"run": str(run_dir), "responses": len(scorable), "all": correlation(lam, delta),
           "lambda": lam.tolist(), "delta": delta.tolist(), "advantage": adv.tolist()}
    for name, mask in (("A>0", adv > 0), ("A<0", adv < 0)):
        if int(mask.sum()) > 2:
            out[name] = correlation(lam[mask], delta[mask])
    return out


# ---------------------------------------------------------------------------------------- report
def write_report(out: Path, tables: dict, accuracy: dict[str, float], curve: list, lam: dict | None,
                 tokenizer, args: dict, max_new: int) -> Path:
    """``dlogp.md`` + the pictures + ``token_stats.csv``; returns the markdown path."""
    from delta_megatron.eval.dlogp import most_moved_tokens

    def decode(tok: int) -> str:
        return repr(tokenizer.decode([tok]))

    write_token_csv(out / "token_stats.csv", tables, decode)
    plot_histograms(tables, out / "dlogp_histograms.png")
    lines = [f"# Δlog p analysis: {args['base']} → {args['rl']}", "",
             f"Prompts: first {args['max_prompts']} of `{args['data']}`, {args['k']} samples each, temperature "
             f"{args['temperature']}, top-p {args['top_p']}, at most {max_new} new tokens, seed {args['seed']}. "
             "Δlog p = log π_RL(y_t) − log π_Base(y_t); entropies and KL(π_RL ‖ π_Base) over the full "
             "vocabulary, temperature 1.", "",
             "## Scored tokens", "",
             "| sampled by | responses | tokens | accuracy | mean Δlog p | Δlog p ≤ −0.3 | Δlog p ≥ 0.3 "
             "| mean entropy (sampler) | mean KL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for src, t in tables.items():
        d, n = t.delta, max(len(t), 1)
        responses = len(set(t.seq.tolist()))
        lines.append(f"| {src} | {responses} | {len(t)} | {accuracy.get(src, float('nan')):.3f} | "
                     f"{float(d.mean()) if len(t) else float('nan'):+.3f} | {int((d <= -0.3).sum()) / n:.1%} | "
                     f"{int((d >= 0.3).sum()) / n:.1%} | {float(t.entropy_of(src).mean()):.3f} | "
                     f"{float(t.kl.mean()):.3f} |")
    lines += ["", "Pictures: `dlogp_histograms.png` (entropy, KL and Δlog p per token, one colour per sampling "
              "model).", ""]
    for src, t in tables.items():
        up, down = most_moved_tokens(t, decode)
        lines += [f"## Most moved tokens ({src} samples)", "", "| increased | count | mean Δlog p | "
                  "decreased | count | mean Δlog p |", "|---|---:|---:|---|---:|---:|"]
        for i in range(max(len(up), len(down))):
            a = f"{up[i].text} | {up[i].count} | {up[i].mean_delta:+.3f}" if i < len(up) else " | | "
            b = f"{down[i].text} | {down[i].count} | {down[i].mean_delta:+.3f}" if i < len(down) else " | | "
            lines.append(f"| {a} | {b} |")
        lines.append("")
    if curve:
        plot_curve(curve, accuracy, out / "replacement_curve.png")
        metrics = list(curve[0].metrics)
        lines += ["## Selective replacement curve", "",
                  "Base sampling; positions picked by the rule are resampled from π_RL over the base model's "
                  f"top-{args['candidates']} candidates (weights (0, 1), same top-p). Thresholds are quantiles "
                  "of the statistic on the scored base tokens; `replaced` is measured. Picture: "
                  "`replacement_curve.png`.", "",
                  "| selection | threshold | target | replaced | " + " | ".join(metrics) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(metrics)]
        for p in curve:
            thr = "" if p.threshold is None else f"{p.threshold:+.4f}"
            lines.append(f"| {p.criterion} | {thr} | {p.target_rate:.1%} | {p.replaced:.1%} | "
                         + " | ".join(f"{p.metrics[m]:.3f}" for m in metrics) + " |")
        if "rl" in accuracy:
            lines += ["", f"RL model alone: accuracy {accuracy['rl']:.3f} (mean over its scored samples)."]
        lines.append("")
    if lam is not None:
        lines += ["## DelTA λ̄ vs Δlog p", ""]
        if "note" in lam:
            lines += [lam["note"], ""]
        else:
            plot_lambda(lam, out / "lambda_vs_dlogp.png")
            lines += [f"Tokens of {lam['responses']} sample responses recorded in `{lam['run']}/samples.jsonl` "
                      "(λ̄ as the run computed it at that step; Δlog p of the final RL model over the base). "
                      "Picture: `lambda_vs_dlogp.png`.", "",
                      "| tokens | n | Pearson r | Spearman ρ |", "|---|---:|---:|---:|"]
            for key in ("all", "A>0", "A<0"):
                if key in lam:
                    c = lam[key]
                    lines.append(f"| {key} | {c['n']} | {c['pearson']:+.3f} | {c['spearman']:+.3f} |")
            lines.append("")
    md = out / "dlogp.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md


def write_token_csv(path: Path, tables: dict, decode) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sampled_by", "response", "position", "token", "text", "logp_base", "logp_rl", "dlogp",
                    "entropy_base", "entropy_rl", "kl_rl_base", "reward"])
        for src, t in tables.items():
            reward = t.reward.tolist() if t.reward is not None else [""] * len(t)
            for i in range(len(t)):
                w.writerow([src, int(t.seq[i]), int(t.position[i]), int(t.token_ids[i]), decode(int(t.token_ids[i])),
                            f"{float(t.logp_base[i]):.6f}", f"{float(t.logp_rl[i]):.6f}", f"{float(t.delta[i]):.6f}",
                            f"{float(t.entropy_base[i]):.6f}", f"{float(t.entropy_rl[i]):.6f}",
                            f"{float(t.kl[i]):.6f}", reward[i]])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_png: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


COLORS = {"base": "tab:blue", "rl": "tab:orange"}


def plot_histograms(tables: dict, out_png: Path) -> Path:
    """Entropy (of the sampling model), KL(π_RL ‖ π_Base) and Δlog p, one histogram per sampling model."""
    import torch

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("entropy of the sampling model (nats)", lambda s, t: t.entropy_of(s), False),
              ("KL(π_RL ‖ π_Base) (nats)", lambda s, t: t.kl, False),
              ("Δlog p = log π_RL − log π_Base", lambda s, t: t.delta, True)]
    for ax, (title, get, signed) in zip(axes, panels):
        values = {s: get(s, t).double() for s, t in tables.items() if len(t)}
        allv = torch.cat(list(values.values())) if values else torch.zeros(1, dtype=torch.float64)
        hi = float(torch.quantile(allv.abs() if signed else allv, 0.995)) or 1.0
        lo = -hi if signed else 0.0
        bins = torch.linspace(lo, hi, 61).tolist()
        for s, v in values.items():
            ax.hist(v.clamp(lo, hi).tolist(), bins=bins, weights=[1.0 / len(v)] * len(v), histtype="step",
                    lw=1.6, color=COLORS.get(s), label=f"sampled by {s} ({len(v)} tokens)")
        ax.set_title(title)
        ax.set_ylabel("fraction of tokens")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, out_png)


def plot_curve(curve: list, accuracy: dict[str, float], out_png: Path) -> Path:
    """First metric (avg@k) against the measured replaced share, one line per selection rule."""
    plt = _pyplot()
    metric = next(iter(curve[0].metrics))
    ends = {p.criterion: p for p in curve if p.criterion in ("none", "all")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for crit in ("dlogp", "kl", "entropy", "random"):
        pts = sorted([p for p in curve if p.criterion == crit], key=lambda p: p.replaced)
        pts = ([ends["none"]] if "none" in ends else []) + pts + ([ends["all"]] if "all" in ends else [])
        ax.plot([100 * p.replaced for p in pts], [p.metrics[metric] for p in pts], marker="o", ms=3,
                label={"dlogp": "Δlog p (lowest first)", "kl": "KL (highest first)",
                       "entropy": "base entropy (highest first)", "random": "random"}[crit])
    if "rl" in accuracy:
        ax.axhline(accuracy["rl"], color="grey", ls="--", lw=1, label="RL model alone")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0.0, 100.0)
    ax.set_xlabel("replaced tokens (%)")
    ax.set_ylabel(metric)
    ax.set_title("Base sampling with selected tokens resampled from π_RL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_png)


def plot_lambda(lam: dict, out_png: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for sign, color, name in ((1, "tab:green", "A > 0"), (-1, "tab:red", "A < 0")):
        xs = [d for d, a in zip(lam["delta"], lam["advantage"]) if a * sign > 0]
        ys = [w for w, a in zip(lam["lambda"], lam["advantage"]) if a * sign > 0]
        ax.scatter(xs, ys, s=8, alpha=0.5, color=color, label=f"{name} ({len(xs)} tokens)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("Δlog p (final RL model − base)")
    ax.set_ylabel("DelTA λ̄ (during the run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out_png)


if __name__ == "__main__":
    sys.exit(main())
