"""``delta-megatron launch RECIPE --executor local|slurm --cluster PROFILE [--nodes N] [--dry-run]``.

Turns a recipe (a ``Config``, or a dict of them = one experiment of several runs) into a NeMo-Run
experiment: the config travels in a script NeMo-Run writes into the job directory, and every rank runs
``python -m delta_megatron.train --config <it> --resume auto`` under torchrun, so a requeued job
(preemption, crash) continues from its last checkpoint. ``--dry-run`` prints the sbatch script(s)
without submitting anything.

Layouts: by default SGLang (if the recipe uses it) is colocated on the actor GPUs and started by the
trainer (each node's local rank 0 starts its node's servers); ``--rollout-nodes R`` makes a
heterogeneous job whose second component runs ``delta_megatron.cli_serve`` on R nodes of their own
(``rollout.placement: disaggregated``, ``rollout.nodes: R``); both components learn the serving nodes'
hostnames from ``DELTA_MEGATRON_ROLLOUT_HOSTS`` and compute the same placement
(``delta_megatron.topology``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nemo_run as run

from delta_megatron.config import Config, dump_yaml
from delta_megatron.planner import (
    Plan,
    PlanOptions,
    call_recipe,
    load_recipe,
    plan,
    recipe_function,
    time_problems,
)
from delta_megatron.utils.commands import command_parser
from delta_megatron.utils.configs import ConfigError, apply_overrides, validate
from delta_megatron.utils.job_clock import parse_time_left
from launchers.executors import (
    ClusterProfile,
    load_profile,
    local_executor,
    make_heterogeneous,
    rdzv_id,
    rollout_executor,
    slurm_executor,
)
from launchers.requeue import REQUEUE_MARKER_ENV, parse_signal
from launchers.sweeps import parse_grid, scale_points

RUNDIR = "/nemo_run"  # NeMo-Run mounts the job dir here in a container (or substitutes the path)
HOSTS_ENV = "DELTA_MEGATRON_ROLLOUT_HOSTS"
ROLLOUT_HOSTS = "$(scontrol show hostnames $SLURM_JOB_NODELIST_HET_GROUP_1 | paste -sd, -)"
CONFIG_EOF = "DELTA_MEGATRON_CONFIG_EOF"


@dataclass
class LaunchResult:
    """What a launch did: the experiment id, its job ids and, for a dry run, the sbatch texts."""

    exp_id: str
    exp_dir: str
    jobs: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)  # scheduler handles once submitted
    sbatch: dict[str, str] = field(default_factory=dict)  # file name -> script text


def train_script(cfg: Config, resume: str = "auto", torchrun: tuple[int, int] | None = None,
                 rdzv: int = 0, doctor: tuple[str, int] | None = None) -> run.Script:
    """Write the run's config to a private temp file and exec the trainer. The config travels
    inside this script, which NeMo-Run writes into the job directory (and mounts in a container), so
    the job needs no other path and its directory keeps a record of the config.

    By default NeMo-Run's torchrun launcher starts this script once per rank. ``torchrun=(nnodes,
    nproc_per_node)`` instead runs torchrun from the script, once per node: used by heterogeneous
    jobs, where NeMo-Run would apply one launcher to every component (``DM_RDZV_ENDPOINT`` is
    exported by the batch script).

    ``doctor=(cluster, nodes)`` first runs ``delta-megatron doctor`` on the config, once per node
    (local rank 0); a failed check ends the job before any training work (the other ranks then fail
    their rendezvous and torchrun stops them)."""
    text = dump_yaml(cfg)
    if CONFIG_EOF in text:
        raise ConfigError("config", CONFIG_EOF, "the config may not contain the heredoc delimiter")
    trainer = f"python -m delta_megatron.train --config \"$config\" --resume {resume}"
    if torchrun:
        nnodes, nproc = torchrun
        trainer = (f"torchrun --nnodes {nnodes} --nproc-per-node {nproc} --node-rank $SLURM_NODEID "
                   f"--rdzv-backend c10d --rdzv-endpoint $DM_RDZV_ENDPOINT --rdzv-id {rdzv} "
                   f"-m delta_megatron.train --config \"$config\" --resume {resume}")
    check = ""
    if doctor:
        cluster, nodes = doctor
        check = (f'if [ "${{LOCAL_RANK:-0}}" = 0 ]; then python -m delta_megatron.cli doctor "$config" '
                 f'--cluster {cluster} --nodes {nodes} || exit 1; fi\n')
    return run.Script(inline=f"""\
set -euo pipefail
config=$(mktemp "${{TMPDIR:-/tmp}}/delta-megatron-XXXXXX.yaml")
cat > "$config" <<'{CONFIG_EOF}'
{text}{CONFIG_EOF}
{check}exec {trainer}
""")


def rollout_script(cfg: Config, actor_nodes: int, gpus_per_node: int) -> run.Script:
    """Per serving node: ``delta_megatron.cli_serve`` starts the node's servers (and, on the first
    serving node, the router) from the same config and placement as the trainer."""
    if not cfg.model.hf_path:
        raise ConfigError("model.hf_path", None, "SGLang servers need an HF checkpoint path")
    text = dump_yaml(cfg)
    return run.Script(inline=f"""\
set -euo pipefail
config=$(mktemp "${{TMPDIR:-/tmp}}/delta-megatron-XXXXXX.yaml")
cat > "$config" <<'{CONFIG_EOF}'
{text}{CONFIG_EOF}
exec python -m delta_megatron.cli_serve --config "$config" --actor-nodes {actor_nodes} --gpus-per-node {gpus_per_node}
""")


def _run_dir(profile: ClusterProfile | None, title: str, name: str, job_dir: str) -> str:
    """Where the trainer writes logs and checkpoints; stable across requeues of the same job."""
    if profile is None or profile.slurm.container_image is None:
        return str(Path(job_dir) / "run")
    if profile.slurm.run_dir:
        return f"{profile.slurm.run_dir}/{title}/{name}"
    return f"{RUNDIR}/run"


def _prepare_config(cfg: Config, run_dir: str) -> Config:
    cfg = apply_overrides(cfg, [f"logging.dir={run_dir}", "checkpoint.resume=auto"])
    validate(cfg)
    return cfg


def launch(runs: dict[str, Config], *, executor: str, profile: ClusterProfile, nodes: int = 1,
           rollout_nodes: int = 0, title: str = "delta-megatron", dry_run: bool = False,
           exp_id: str | None = None, detach: bool = True, keep_dry_run_dir: bool = False,
           per_run_nodes: dict[str, int] | None = None, doctor: bool = False) -> LaunchResult:
    """One ``run.Experiment`` with one job per entry of ``runs`` (name -> Config); ``doctor`` runs
    ``delta-megatron doctor`` on every node before training (see :func:`train_script`)."""
    if not rollout_nodes:  # a config with rollout.placement: disaggregated names its own serving nodes
        nodes_of = {c.rollout.nodes if c.rollout.placement == "disaggregated" else 0 for c in runs.values()}
        if len(nodes_of) > 1:
            raise ConfigError("rollout.nodes", sorted(nodes_of), "one placement for every run of a launch "
                              "(0: colocated); or pass --rollout-nodes")
        rollout_nodes = nodes_of.pop() if nodes_of else 0
    if executor not in ("local", "slurm"):
        raise ConfigError("executor", executor, "local or slurm")
    if rollout_nodes and executor != "slurm":
        raise ConfigError("rollout_nodes", rollout_nodes, "separate rollout nodes need --executor slurm")
    with run.Experiment(title, id=exp_id, log_level="WARN", enable_goodbye_message=False) as exp:
        for name, cfg in runs.items():
            n = (per_run_nodes or {}).get(name, nodes)
            if executor == "local":
                job_dir = str(Path(exp._exp_dir) / name)  # NeMo-Run's job dir for a named task
                task = train_script(_prepare_config(cfg, _run_dir(None, title, name, job_dir)),
                                    doctor=(profile.name, n) if doctor else None)
                exp.add(task, executor=local_executor(profile.ranks_per_node), name=name)
                continue
            job_dir = str(Path(exp._exp_dir) / name)
            actor = slurm_executor(profile, n, name=f"{title}/{name}", dry_run=dry_run,
                                   requeue_marker=f"{job_dir}/requeue")
            if profile.slurm.container_image is not None:  # the job dir is mounted at RUNDIR
                actor.env_vars[REQUEUE_MARKER_ENV] = f"{RUNDIR}/requeue"
            if rollout_nodes:
                cfg = apply_overrides(cfg, ["rollout.placement=disaggregated", f"rollout.nodes={rollout_nodes}"])
            run_cfg = _prepare_config(cfg, _run_dir(profile, title, name, job_dir))
            if rollout_nodes:  # SGLang has GPUs of its own: nothing to release or offload
                run_cfg = apply_overrides(run_cfg, ["memory.colocate=false"])
                # one launcher would apply to both components: torchrun moves into the script
                actor.launcher, actor.torchrun_nproc_per_node = None, None
                actor.monitor_group_job_wait_time = 10  # the batch shell's trap waits on this sleep
                actor.env_vars |= {"DM_RDZV_ENDPOINT": "${het_group_host_0}:29500", HOSTS_ENV: ROLLOUT_HOSTS}
                rollout = rollout_executor(profile, rollout_nodes, env={HOSTS_ENV: ROLLOUT_HOSTS}, dry_run=dry_run)
                task = train_script(run_cfg, torchrun=(n, profile.ranks_per_node),
                                    rdzv=rdzv_id(f"{title}/{name}"),
                                    doctor=(profile.name, n) if doctor else None)
                exp.add([task, rollout_script(run_cfg, n, profile.ranks_per_node)],
                        executor=make_heterogeneous(actor, rollout), name=name)
                continue
            task = train_script(run_cfg, doctor=(profile.name, n) if doctor else None)
            exp.add(task, executor=actor, name=name)
        result = LaunchResult(exp_id=exp._id, exp_dir=exp._exp_dir, jobs=[j.id for j in exp.jobs])
        if dry_run:
            exp.dryrun(log=executor == "local", delete_exp_dir=False)
            result.sbatch = {p.name: p.read_text() for p in sorted(Path(exp._exp_dir).glob("*_sbatch.sh"))}
            if not keep_dry_run_dir:
                shutil.rmtree(exp._exp_dir, ignore_errors=True)
        else:
            exp.run(detach=detach and executor == "slurm", tail_logs=executor == "local")
            result.handles = [job.handle for job in exp.jobs]
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser(
        "delta-megatron launch",
        "Submit a recipe as a NeMo-Run experiment: one Slurm job per run (or torchrun on this machine\n"
        "with --executor local); every rank runs `delta_megatron.train --resume auto`, so a requeued\n"
        "job continues from its last checkpoint. On Slurm the planner's fit check runs first.",
        """\
        RECIPE: a recipe name (pipelines/*.RECIPES; a sweep recipe = one job per run), module:function
        or a YAML config; --cluster (slurm/profiles/<name>.yaml), --nodes, dotted overrides""",
        """\
        the experiment id and job ids (or, with --dry-run, the sbatch scripts on stdout); logs and
        checkpoints in the profile's run_dir (default: the job directory)""",
        ["delta-megatron launch qwen3-8b-delta --executor slurm --cluster b200 --nodes 2 --doctor",
         "delta-megatron launch pipelines.tiny_arith_cpu:smoke_config --executor local"])
    parser.add_argument("recipe", help="recipe name, module:function, or a config YAML")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--cluster", default="local", help="profile name or YAML path")
    parser.add_argument("--nodes", type=int, default=1, help="actor nodes")
    parser.add_argument("--rollout-nodes", type=int, default=0, help="SGLang nodes (0: colocated)")
    parser.add_argument("--name", default=None, help="experiment title (default: the recipe)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="slurm: stay attached until the jobs end")
    parser.add_argument("--no-plan", action="store_true", help="skip the planner's fit check")
    parser.add_argument("--doctor", action="store_true", help="run `delta-megatron doctor` on every node "
                        "before training; a failed check ends the job")
    for axis in ("nodes", "tp", "pp", "cp"):
        parser.add_argument(f"--sweep-{axis}", default=None, metavar="N,N,..",
                            help=f"scale-up sweep over {axis} (one experiment, one job per point)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=10")
    return parser.parse_intermixed_args(argv)


def recipe_name(recipe: str) -> str:
    """A job/experiment name: ``qwen3-14b-delta``, ``pipelines.tiny_arith_cpu:config`` ->
    ``tiny-arith-cpu-config``, ``runs/x.yaml`` -> ``x``."""
    if recipe.endswith((".yaml", ".yml")):
        name = Path(recipe).stem
    elif ":" in recipe:
        module, _, fn = recipe.partition(":")
        name = f"{module.rpartition('.')[2]}-{fn}"
    else:
        name = recipe
    return name.replace("_", "-")


def resolve_runs(recipe: str, overrides: list[str], nodes: int) -> dict[str, Config]:
    """A recipe returning a Config is one run; one returning ``{name: Config}`` is a sweep."""
    if recipe.endswith((".yaml", ".yml")):
        return {recipe_name(recipe): load_recipe(recipe, overrides)}
    out = call_recipe(recipe_function(recipe), nodes=nodes)
    items = out if isinstance(out, dict) else {recipe_name(recipe): out}
    runs = {}
    for name, cfg in items.items():
        cfg = apply_overrides(cfg, overrides) if overrides else cfg
        validate(cfg)
        runs[name.replace("_", "-")] = cfg
    return runs


def slurm_time_problems(result: Plan, profile: ClusterProfile) -> list[str]:
    """The profile's time limit and signal lead against the plan's stage, step and save times."""
    lead = parse_signal(profile.slurm.signal)[2] if profile.slurm.signal else None
    return time_problems(result, parse_time_left(profile.slurm.time), lead, profile.hardware.startup_s)


def apply_planned_choices(cfg: Config, result: Plan) -> Config:
    """The job runs what the planner modelled: its resolution of ``auto`` settings (e.g. the DelTA
    cache's device) and its save-time estimate (the trainer's deadline margin)."""
    return apply_overrides(cfg, [f"{key}={value}" for key, value in result.choices.items()])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        profile = load_profile(args.cluster)
        runs = resolve_runs(args.recipe, args.overrides, args.nodes)
        per_run_nodes: dict[str, int] = {}
        if any(getattr(args, f"sweep_{a}") for a in ("nodes", "tp", "pp", "cp")):
            runs, per_run_nodes = _sweep(args, runs, profile)
        elif args.executor == "slurm" and not args.no_plan:
            for name, cfg in runs.items():
                result = plan(cfg, profile.hardware, PlanOptions(nodes=args.nodes,
                                                                 rollout_nodes=args.rollout_nodes))
                problems = result.problems + slurm_time_problems(result, profile)
                if problems:
                    print(f"{name}: {result.format()}", file=sys.stderr)
                    print("\n".join(f"  - {p}" for p in problems[len(result.problems):]), file=sys.stderr)
                    return 1
                runs[name] = apply_planned_choices(cfg, result)
        title = args.name or recipe_name(args.recipe)
        result = launch(runs, executor=args.executor, profile=profile, nodes=args.nodes,
                        rollout_nodes=args.rollout_nodes, title=title,
                        dry_run=args.dry_run, detach=not args.wait, per_run_nodes=per_run_nodes,
                        doctor=args.doctor)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for fname, text in result.sbatch.items():
        print(f"# ---- {fname}\n{text}")
    if not args.dry_run:
        print(f"experiment {result.exp_id}: jobs {', '.join(result.jobs)} ({result.exp_dir})")
    return 0


def _sweep(args: argparse.Namespace, runs: dict[str, Config],
           profile: ClusterProfile) -> tuple[dict[str, Config], dict[str, int]]:
    """Expand one recipe into the grid points that fit; report the others on stderr."""
    if len(runs) != 1:
        raise ConfigError("recipe", args.recipe, "a scale-up sweep needs a single-run recipe")
    (name, base), = runs.items()
    points, skipped = scale_points(
        base, name, profile.hardware, nodes=parse_grid(args.sweep_nodes, args.nodes),
        tp=parse_grid(args.sweep_tp, base.parallel.tp), pp=parse_grid(args.sweep_pp, base.parallel.pp),
        cp=parse_grid(args.sweep_cp, base.parallel.cp), check_plan=not args.no_plan)
    for skip in skipped:
        print(f"skip {skip.name}: {skip.reason}", file=sys.stderr)
    if not points:
        raise ConfigError("sweep", args.recipe, "no grid point fits")
    return {p.name: p.cfg for p in points}, {p.name: p.nodes for p in points}


if __name__ == "__main__":
    sys.exit(main())
