"""``delta-megatron study``: a seeded comparison of credit methods, and its report.

    delta-megatron study --recipe pipelines.scaffold_arith_cpu:config \\
        --warm-start pipelines.scaffold_arith_cpu:warm_start --methods dapo,delta,dapo-ft --seeds 8 \\
        --out runs/study
    delta-megatron study report runs/study --baseline dapo

Every (method, seed) pair is one run of the recipe with the method's preset and the seed applied
(``delta-megatron study --list-methods``), in its own directory. Locally the runs go through a pool of
``--jobs`` processes (default: one per core, one thread each); with ``--executor slurm`` they are one
NeMo-Run experiment of one Slurm job per run, through the same launcher as ``delta-megatron launch``.
Running the same command again skips finished runs and resumes the others from their last
checkpoint; a failed run is reported and does not stop the others. At the end (local) the report is
written: see ``delta-megatron study report --help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delta_megatron.study.plan import RunSpec, StudyManifest, run_config, run_state
from delta_megatron.study.presets import PRESETS, parse_methods
from delta_megatron.utils.commands import command_parser
from delta_megatron.utils.configs import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "delta-megatron study",
        """\
        Run every (method, seed) pair of one recipe, each in its own directory, then compare the methods
        with a baseline (see `delta-megatron study report --help`). Methods are presets (--list-methods:
        dapo, dapo-ft, sapo, gspo, fipo, delta, ktae, lowprob, counterfactual) or '+' combinations such
        as delta+lowprob; the seed sets --seed-keys. Locally the runs go through a pool of --jobs
        processes (default one per core, one thread each) with a live progress table; with --executor
        slurm they are one NeMo-Run experiment of one Slurm job per run. Running the same command again
        skips finished runs and resumes the others from their last checkpoint (Ctrl-C asks the running
        ones to checkpoint first); a failed run is reported and does not stop the others.""",
        """\
        a recipe (--recipe: name, module:function or YAML) and dotted overrides for every run; an
        optional warm start run once before the runs (--warm-start module:function, local only)""",
        """\
        DIR/study.json (the manifest), DIR/runs/<method>/seed_<n>/ (run.yaml, train.log, status.json,
        metrics, checkpoints), and at the end of a local study the report (study.md, study.csv,
        runs.csv, curves.png, seeds.png, token clouds); Slurm: the sbatch scripts with --dry-run""",
        ["delta-megatron study --recipe pipelines.scaffold_arith_cpu:config "
         "--warm-start pipelines.scaffold_arith_cpu:warm_start --methods dapo,delta,dapo-ft --seeds 8 "
         "--out runs/study-cpu train.steps=80",
         "delta-megatron study --recipe qwen3-8b-delta --methods dapo,delta --seeds 8 --executor slurm "
         "--cluster b200 --out runs/study-8b --dry-run"])
    p.add_argument("--recipe", help="the run every method starts from: recipe name, module:function or YAML "
                                    "(e.g. pipelines.scaffold_arith_cpu:config, qwen3-8b-delta)")
    p.add_argument("--methods", default="dapo,delta", help="comma-separated presets or '+' combinations "
                                                           "(default: dapo,delta; see --list-methods)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per method (default 8)")
    p.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--seed-keys", default="train.seed",
                   help="config fields set to the seed, comma-separated (default train.seed: sampling and "
                        "initialisation; add data.shuffle_seed to vary the prompt order too)")
    p.add_argument("--out", default="runs/study", help="the study directory (default runs/study)")
    p.add_argument("--warm-start", metavar="MODULE:FUNCTION",
                   help="run once before the runs (local only), e.g. an SFT warm-up: fn(config, out_dir) -> "
                        "overrides for every run (pipelines.scaffold_arith_cpu:warm_start)")
    p.add_argument("--baseline", default="dapo", help="the method the others are tested against (default dapo)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--jobs", type=int, default=None, help="local: runs at once (default: one per core)")
    p.add_argument("--cluster", default="local", help="slurm: cluster profile name or YAML path")
    p.add_argument("--nodes", type=int, default=1, help="slurm: actor nodes per run")
    p.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch scripts, submit nothing")
    p.add_argument("--no-plan", action="store_true", help="slurm: skip the planner's fit check")
    p.add_argument("--no-report", action="store_true", help="local: do not write the report at the end")
    p.add_argument("--list-methods", action="store_true", help="list the method presets and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=20")
    return p


def _report_parser() -> argparse.ArgumentParser:
    return _add_report_args(command_parser(
        "delta-megatron study report",
        """\
        Per method, over the seeds that finished: final held-out avg@k, area under the held-out curve
        (the mean accuracy over training), final train reward (mean of the last --tail steps), and the
        steps to reach the baseline's final accuracy (median; never = did not get there), each with
        a 95 % bootstrap CI; against the baseline a one-sided Mann–Whitney U p-value (H1: the method
        is better), Holm-adjusted over the methods, and Vargha–Delaney A (the probability that a run
        of the method beats a run of the baseline). Statistics by scipy.""",
        """\
        a study directory (DIR/study.json and the runs it lists; runs still going or failed are listed
        and left out)""",
        """\
        DIR/study.md (tables, run times, pictures), DIR/study.csv (per method and metric),
        DIR/runs.csv (per run), DIR/curves.png (mean over seeds with 95 % bands), DIR/seeds.png (every
        seed), token clouds of DelTA methods (DIR/token_clouds/, and in each DelTA run's directory)""",
        ["delta-megatron study report runs/study-cpu --baseline dapo"]))


def _add_report_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("dir", help="the study directory (holds study.json)")
    p.add_argument("--baseline", default=None, help="compare against this method (default: the study's)")
    p.add_argument("--tail", type=int, default=5, help="final train reward = mean of the last N steps (default 5)")
    p.add_argument("--min-count", type=int, default=20,
                   help="token clouds: tokens seen fewer times are left out (default 20)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = _parser().parse_intermixed_args(argv)
    if args.list_methods:
        for name, preset in PRESETS.items():
            print(f"{name:15s} {preset.help}")
        print("a+b            combination, e.g. delta+lowprob (at most one loss other than PPO)")
        return 0
    from delta_megatron.tracking import quiet_third_party_warnings

    quiet_third_party_warnings()  # the warm start trains in this process
    try:
        return _study(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def report_main(argv: list[str]) -> int:
    from delta_megatron.study.report import write_report

    args = _report_parser().parse_args(argv)
    try:
        md = write_report(Path(args.dir), args.baseline, args.tail, args.min_count)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} (+ study.csv, runs.csv, curves.png, seeds.png)")
    return 0


def _study(args: argparse.Namespace) -> int:
    from delta_megatron.planner import load_recipe

    if not args.recipe:
        raise ConfigError("recipe", None, "--recipe is required (e.g. pipelines.scaffold_arith_cpu:config)")
    methods = parse_methods(args.methods)
    if args.baseline not in methods:
        raise ConfigError("baseline", args.baseline, f"must be one of --methods ({', '.join(methods)})")
    if args.seeds < 1:
        raise ConfigError("seeds", args.seeds, "must be >= 1")
    if args.executor == "slurm" and args.warm_start:
        raise ConfigError("warm_start", args.warm_start, "runs locally; on a cluster start the recipe from an "
                          "HF checkpoint (model.hf_path) instead")
    seed_keys = [k.strip() for k in args.seed_keys.split(",") if k.strip()]
    try:
        base = load_recipe(args.recipe, args.overrides, nodes=args.nodes)
    except (ImportError, AttributeError, FileNotFoundError) as err:
        raise ConfigError("recipe", args.recipe, f"cannot load it: {err}") from None
    if isinstance(base, dict):
        raise ConfigError("recipe", args.recipe, "returns several runs; a study needs one base run")
    out = Path(args.out)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    manifest = StudyManifest(args.recipe, methods, seeds, args.baseline, list(args.overrides), args.warm_start,
                             seed_keys, args.executor)
    if args.executor == "slurm":
        return _slurm(args, manifest, base, out)
    manifest.runs = [RunSpec(m, s, str(out / "runs" / m / f"seed_{s}"), base.train.steps)
                     for m in methods for s in seeds]
    if (out / "study.json").exists():
        manifest = StudyManifest.load(out).merge(manifest)
    for spec in manifest.runs:  # every config checked before anything runs
        run_config(base, spec.method, spec.seed, seed_keys, spec.dir)
    manifest.save(out)
    return _local(args, manifest, base, out)


def _local(args: argparse.Namespace, manifest: StudyManifest, base, out: Path) -> int:
    from delta_megatron.config import dump_yaml
    from delta_megatron.study.local import Progress, default_jobs, run_pool

    requested = {(m, s) for m in parse_methods(args.methods)
                 for s in range(args.first_seed, args.first_seed + args.seeds)}
    wanted = [s for s in manifest.runs if (s.method, s.seed) in requested]
    todo = [s for s in wanted if run_state(s) != "done"]
    extra = _warm_start(args, base, out) if todo and args.warm_start else _recorded_warm_start(out)
    for spec in todo:
        cfg = run_config(base, spec.method, spec.seed, manifest.seed_keys, spec.dir, extra)
        Path(spec.dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, Path(spec.dir) / "run.yaml")
    jobs = args.jobs or default_jobs()
    print(f"study {out}: {len(wanted)} runs ({len(wanted) - len(todo)} finished earlier), {jobs} at a time",
          file=sys.stderr)
    try:
        with Progress(len(wanted), len(wanted) - len(todo)) as progress:
            outcomes = run_pool(todo, jobs, on_change=progress)
    except KeyboardInterrupt:
        print(f"interrupted: runs saved their checkpoints; run the same command to resume ({out})", file=sys.stderr)
        return 130
    failed = [name for name, o in outcomes.items() if o.state != "done"]
    for name in failed:
        print(f"failed: {name} (rc {outcomes[name].rc}; see {out / 'runs' / name / 'train.log'})", file=sys.stderr)
    if not args.no_report:
        try:
            return report_main([str(out), "--baseline", args.baseline]) or (1 if failed else 0)
        except Exception as err:  # the runs are safe on disk; a report problem must not hide that
            print(f"report failed: {err!r}; rerun `delta-megatron study report {out}`", file=sys.stderr)
            return 1
    return 1 if failed else 0


def _warm_start(args: argparse.Namespace, base, out: Path) -> list[str]:
    """Run the recipe's warm start once (``out/warm_start``); its overrides are kept for resumes."""
    import json

    from delta_megatron.planner import recipe_function

    record = out / "warm_start" / "overrides.json"
    if record.exists():
        return json.loads(record.read_text(encoding="utf-8"))
    try:
        fn = recipe_function(args.warm_start)
    except (ImportError, AttributeError) as err:
        raise ConfigError("warm_start", args.warm_start, f"cannot load it: {err}") from None
    print(f"warm start: {args.warm_start} -> {out / 'warm_start'}", file=sys.stderr)
    import torch

    # one thread, as the runs: on a shared 2-core machine two OpenMP threads made an SFT step ~10×
    # slower than one (docs/study.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = list(fn(base, out / "warm_start"))
    finally:
        torch.set_num_threads(threads)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(overrides), encoding="utf-8")
    return overrides


def _recorded_warm_start(out: Path) -> list[str]:
    import json

    record = out / "warm_start" / "overrides.json"
    return json.loads(record.read_text(encoding="utf-8")) if record.exists() else []


def _slurm(args: argparse.Namespace, manifest: StudyManifest, base, out: Path) -> int:
    """One NeMo-Run experiment, one Slurm job per run (``launchers.launch``); runs already finished
    (their directory, when this machine sees it, has every step) are not submitted again."""
    from delta_megatron.planner import PlanOptions, plan
    from launchers.executors import load_profile
    from launchers.launch import launch

    profile = load_profile(args.cluster)
    title = out.resolve().name
    earlier = {r.name: r for r in StudyManifest.load(out).runs} if (out / "study.json").exists() else {}
    configs, specs = {}, []
    for method in manifest.methods:
        for seed in manifest.seeds:
            spec = RunSpec(method, seed, "", base.train.steps)
            old = earlier.get(spec.name)
            if old is not None and old.dir and run_state(old) == "done":
                specs.append(old)
                continue
            spec.job_dir, host = _job_dirs(profile, title, spec.job_name, None)
            spec.dir = host or ""
            specs.append(spec)
            if host and run_state(spec) == "done":
                continue
            configs[spec.job_name] = run_config(base, method, seed, manifest.seed_keys, spec.job_dir or "run")
    if not args.no_plan:
        for name, cfg in configs.items():
            result = plan(cfg, profile.hardware, PlanOptions(nodes=args.nodes))
            if not result.fits:
                raise ConfigError("recipe", name, result.format())
    if not configs:
        print("every run of the study is finished; nothing to submit", file=sys.stderr)
        return 0
    result = launch(configs, executor="slurm", profile=profile, nodes=args.nodes, title=title,
                    dry_run=args.dry_run, detach=True)
    for fname, text in result.sbatch.items():
        print(f"# ---- {fname}\n{text}")
    if args.dry_run:
        print(f"dry run: {len(configs)} jobs ({', '.join(configs)}), nothing submitted", file=sys.stderr)
        return 0
    for spec in specs:  # directories that exist only once the experiment does
        if spec.job_name in configs and not spec.dir:
            spec.job_dir, spec.dir = _job_dirs(profile, title, spec.job_name, result.exp_dir)
    manifest.runs = specs
    if (out / "study.json").exists():
        manifest = StudyManifest.load(out).merge(manifest)
    manifest.save(out)
    print(f"experiment {result.exp_id}: {len(result.jobs)} jobs submitted ({result.exp_dir}); when they finish: "
          f"delta-megatron study report {out}", file=sys.stderr)
    return 0


def _job_dirs(profile, title: str, name: str, exp_dir: str | None) -> tuple[str | None, str | None]:
    """(the run's directory as the job sees it, as this machine sees it); None where it is known only
    once the NeMo-Run experiment exists (``exp_dir``). A profile with ``slurm.run_dir`` gives a fixed
    path (mapped back through the container mounts); otherwise the job writes under its job
    directory, which a container mounts at ``/nemo_run``."""
    from delta_megatron.study.plan import host_path
    from launchers.launch import _run_dir

    s = profile.slurm
    if s.container_image is not None and s.run_dir:
        job_dir = _run_dir(profile, title, name, "")
        return job_dir, host_path(job_dir, s.container_mounts)
    if exp_dir is None:
        return None, None
    job_dir = str(Path(exp_dir) / name)
    return _run_dir(profile, title, name, job_dir), str(Path(job_dir) / "run")
