"""``delta-megatron doctor [RECIPE] [--nodes N]``: does this node have what the run needs?

Before a four-hour Slurm job starts, check — and say how to fix — the software (Python, torch and CUDA,
NCCL, megatron-core, transformer-engine, SGLang and its router, math-verify at the versions the
package pins), the hardware against the planner's numbers (GPU count and memory per GPU), the Slurm
client and accounting, the recipe's paths (data, model, tokenizer readable; logs and checkpoints
writable), free disk for ``checkpoint.keep`` + 1 checkpoints, and the time limit against the planner's
step and save time. Each check is ok / warn / fail; any fail makes the exit code 1. Inside a Slurm job
step the job's own time limit is used (``delta-megatron launch --doctor`` runs this on every node before
training). Requirements depend on the recipe: a CPU run needs no GPU, an SGLang run needs SGLang.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import yaml

from delta_megatron.config import Config
from delta_megatron.utils.commands import command_parser
from delta_megatron.utils.configs import ConfigError

__all__ = ["Check", "run_checks", "main", "slurm_seconds"]

Status = Literal["ok", "warn", "fail"]
DIST = "delta-megatron"


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def needs_gpu(cfg: Config | None) -> bool:
    """Does the run need CUDA: an SGLang engine, TE kernels (CP, FP8) or NCCL."""
    return cfg is not None and (cfg.rollout.engine == "sglang" or cfg.parallel.layer_spec == "te"
                                or cfg.parallel.fp8 != "none" or cfg.parallel.cp > 1
                                or cfg.parallel.backend == "nccl")


def _need(needed: bool) -> Status:
    """The status of something missing: fail when the run needs it, warn otherwise."""
    return "fail" if needed else "warn"


# ----------------------------------------------------------------------------- software
def pins() -> dict[str, str]:
    """Version specifiers the package declares (core dependencies and the ``gpu`` extra), by
    distribution name; read from the installed metadata (the one source: pyproject.toml)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        reqs = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "gpu"}):
            out.setdefault(canonicalize_name(req.name), str(req.specifier))
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_check(name: str, dist: str, module: str, needed: bool, why: str, pinned: dict[str, str]) -> Check:
    """Installed (metadata), importable (module found) and within the declared specifier."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    spec = pinned.get(canonicalize_name(dist), "")
    version = _version(dist)
    want = f"{dist}{spec}" if spec else dist
    fix = f"pip install '{want}'" + (" (the [gpu] extra: pip install -e '.[gpu]')" if dist in
                                    ("transformer-engine", "sglang", "sglang-router") else "")
    if version is None or find_spec(module) is None:
        return Check(name, _need(needed), f"not installed ({why})", fix)
    if spec and not SpecifierSet(spec).contains(version, prereleases=True):
        return Check(name, _need(needed), f"{version} does not satisfy {spec} ({why})", fix)
    return Check(name, "ok", f"{version}" + (f" ({spec})" if spec else "") + f"; {why}")


def software_checks(cfg: Config | None) -> list[Check]:
    import torch

    pinned = pins()
    checks = []
    need_py = (metadata.metadata(DIST).get("Requires-Python") if _version(DIST) else None) or ">=3.10"
    from packaging.specifiers import SpecifierSet

    py = ".".join(map(str, sys.version_info[:3]))
    checks.append(Check("python", "ok" if SpecifierSet(need_py).contains(py) else "fail",
                        f"{py} ({sys.executable}); package needs {need_py}",
                        "" if SpecifierSet(need_py).contains(py) else f"use a Python {need_py}"))
    if _version(DIST) is None:
        checks.append(Check("delta-megatron", "warn",
                            "package metadata not installed (running from a checkout)",
                            "pip install -e . (or make install) so versions can be checked against the pins"))
    checks.append(package_check("torch", "torch", "torch", True, "the actor and every kernel", pinned))
    gpu = needs_gpu(cfg)
    why_gpu = "this recipe needs GPUs" if gpu else "CPU runs (embedded engine, local layer spec) work"
    if torch.cuda.is_available():
        checks.append(Check("cuda", "ok",
                            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
        version = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        checks.append(Check("nccl", "ok", f"NCCL {'.'.join(map(str, version))}") if isinstance(version, tuple)
                      else Check("nccl", "ok", f"NCCL {version}") if version is not None
                      else Check("nccl", _need(gpu), "torch was built without NCCL",
                                 "install torch's CUDA build (it ships NCCL)"))
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        fix = ("run on a GPU node; install torch's CUDA build (pip install torch from the CUDA index "
               "under the same version pin)")
        checks.append(Check("cuda", _need(gpu), f"no CUDA device (torch {torch.__version__} is {build}); "
                                                      f"{why_gpu}", fix))
        checks.append(Check("nccl", _need(gpu), "unavailable without CUDA (gloo is used on CPU); " + why_gpu,
                            "NCCL comes with torch's CUDA build; run on a GPU node"))
    checks.append(package_check("megatron-core", "megatron-core", "megatron.core", True, "model, optimizer, "
                                "parallel state", pinned))
    needs_te = cfg is not None and (cfg.parallel.layer_spec == "te" or cfg.parallel.cp > 1
                                    or cfg.parallel.fp8 != "none")
    checks.append(package_check("transformer-engine", "transformer-engine", "transformer_engine", needs_te,
                                "needed: TE layer spec / CP / FP8" if needs_te else
                                "optional: TE kernels on GPU (layer_spec auto)", pinned))
    needs_sglang = cfg is not None and cfg.rollout.engine == "sglang"
    why = "needed: rollout.engine sglang" if needs_sglang else "optional: the SGLang rollout engine"
    checks.append(package_check("sglang", "sglang", "sglang", needs_sglang, why, pinned))
    router = package_check("sglang router", "sglang-router", "sglang_router", needs_sglang, why, pinned)
    if router.status == "ok" and find_spec("sglang_router.sglang_router_rs") is None:
        router = Check("sglang router", _need(needs_sglang),
                       "sglang_router installed without its compiled router binary (sglang_router_rs)",
                       "reinstall the sglang-router wheel for this platform")
    checks.append(router)
    needs_mv = cfg is None or cfg.reward.resolved_kind(cfg.data.train) == "math"
    checks.append(package_check("math-verify", "math-verify", "math_verify", needs_mv,
                                "the math verifier (reward.kind math)" if needs_mv else
                                "optional: this recipe uses exact_match", pinned))
    return checks


# ----------------------------------------------------------------------------- Slurm
def _run(cmd: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 127, str(err)
    return done.returncode, (done.stdout + done.stderr).strip()


def slurm_seconds(text: str) -> float | None:
    """A Slurm duration in seconds, read as sbatch reads ``--time``: ``M``, ``M:S``, ``H:M:S``,
    ``D-H``, ``D-H:M``, ``D-H:M:S``; None for UNLIMITED or an empty value."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", "N/A"):
        return None
    days, dash, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if dash:  # D-H[:M[:S]]
        parts += [0.0] * (3 - len(parts))
        return float(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 3:
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0.0)


def slurm_checks() -> list[Check]:
    checks = []
    if shutil.which("sinfo") is None:
        checks.append(Check("slurm client", "warn", "sinfo not on PATH (fine for a local run)",
                            "install the Slurm client (apt install slurm-client) or run on a login node"))
    else:
        rc, out = _run(["sinfo", "-h", "-o", "%P %a %D %t"])
        _, version = _run(["sinfo", "--version"])
        checks.append(Check("slurm client", "ok" if rc == 0 else "warn",
                            f"{version}; partitions: {' | '.join(out.splitlines()[:3])}" if rc == 0 else
                            f"sinfo failed: {out.splitlines()[0] if out else rc}",
                            "" if rc == 0 else "check slurmctld is reachable (scontrol ping) and munge runs"))
    if shutil.which("sacct") is None:
        checks.append(Check("slurm accounting", "warn", "sacct not on PATH",
                            "install the Slurm client; job status and requeue history use sacct"))
    else:
        rc, out = _run(["sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hours"])
        checks.append(Check("slurm accounting", "ok" if rc == 0 else "warn",
                            "sacct answers" if rc == 0 else
                            f"sacct failed: {out.splitlines()[0] if out else rc}",
                            "" if rc == 0 else "enable accounting (AccountingStorageType=accounting_storage/"
                                               "slurmdbd); job history and requeue counts need it"))
    return checks


# ----------------------------------------------------------------------------- the recipe
def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Can this process create files in ``path`` (or, if it does not exist yet, create it)?"""
    base = _existing_ancestor(path)
    if not base.is_dir():
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".doctor-"):
            return True
    except OSError:
        return False


def path_checks(cfg: Config) -> list[Check]:
    from delta_megatron.data.datasets import resolve_path

    checks = []
    specs = [("data.train", cfg.data.train)] + [(f"data.eval[{i}]", s) for i, s in enumerate(cfg.data.eval)]
    for field, spec in specs:
        if spec.startswith("synthetic:"):
            checks.append(Check(field, "ok", f"{spec} (generated)"))
            continue
        try:
            path = resolve_path(spec)
        except (FileNotFoundError, ValueError):
            checks.append(Check(field, "fail", f"{spec}: not found",
                                f"set {field} to an existing jsonl/parquet file (on a cluster: mount it, "
                                "see the profile's container_mounts)"))
            continue
        ok = os.access(path, os.R_OK)
        checks.append(Check(field, "ok" if ok else "fail", f"{path}" + ("" if ok else ": not readable"),
                            "" if ok else f"make {path} readable by this user"))
    for field, spec in (("model.hf_path", cfg.model.hf_path), ("data.tokenizer", cfg.data.tokenizer)):
        if spec is None:
            checks.append(Check(field, "ok", "not set (random init)" if field == "model.hf_path" else
                                "not set (model.hf_path or the synthetic task's)"))
            continue
        path = Path(spec)
        marker = path / ("config.json" if field == "model.hf_path" else "")
        ok = path.is_dir() and os.access(path, os.R_OK | os.X_OK) and marker.exists()
        what = ("an HF model directory with config.json" if field == "model.hf_path"
                else "a tokenizer directory")
        checks.append(Check(field, "ok" if ok else "fail", f"{path}" + ("" if ok else f": not {what}"),
                            "" if ok else f"download/mount it there or set {field}"))
    ckpt = Path(cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints")
    for field, path in (("logging.dir", Path(cfg.logging.dir)), ("checkpoint.dir", ckpt)):
        ok = _writable(path)
        checks.append(Check(field, "ok" if ok else "fail", f"{path.absolute()}" + (" (writable)" if ok else
                            f": cannot write under {_existing_ancestor(path)}"),
                            "" if ok else f"create it writable or set {field} to a writable path"))
    return checks


def plan_checks(cfg: Config, cluster: str, nodes: int) -> list[Check]:
    """GPU count and memory vs the plan, free disk vs checkpoints, time limit vs step and save time."""
    import torch

    from delta_megatron import planner
    from delta_megatron.planner_model import gib, human

    hw = planner.load_hardware(cluster)
    result = planner.plan(cfg, hw, planner.PlanOptions(nodes=nodes))
    checks = [Check("plan", "ok" if result.fits else "fail",
                    f"fits {nodes}x{hw.gpus_per_node} {hw.gpu} ({cluster})" if result.fits else
                    "; ".join(result.problems), "" if result.fits else
                    f"see `delta-megatron plan ... --nodes {nodes} --cluster {cluster}` for the breakdown")]
    profile = yaml.safe_load(planner.profile_path(cluster).read_text(encoding="utf-8")) or {}
    slurm = profile.get("slurm") or {}
    need_gpus = int(slurm.get("gpus_per_node") or 0)
    peak = max(result.peak(phase) for phase in result.memory)
    if need_gpus and torch.cuda.is_available():
        have = torch.cuda.device_count()
        mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(have)) if have else 0
        usable = mem - hw.reserved_gib * 2**30
        ok = have >= need_gpus and usable >= peak
        checks.append(Check("gpus vs plan", "ok" if ok else "fail",
                            f"{have} GPU(s) of {gib(mem):.0f} GiB; the plan needs {need_gpus} per node and "
                            f"{gib(peak):.1f} GiB per GPU (+{hw.reserved_gib:g} reserved)",
                            "" if ok else "run on nodes matching the profile, or change the layout "
                                          "(delta-megatron plan)"))
    elif need_gpus:
        checks.append(Check("gpus vs plan", _need(needs_gpu(cfg)),
                            f"no CUDA device; the {cluster} plan needs {need_gpus} GPUs per node with "
                            f"{gib(peak):.1f} GiB each",
                            "run on a GPU node of the profile"))
    else:
        checks.append(Check("gpus vs plan", "ok",
                            f"{cluster} is a CPU profile ({hw.gpus_per_node} ranks per node)"))

    size = planner.checkpoint_bytes(cfg)
    need = size * (cfg.checkpoint.keep + 1)  # keep old ones while the next is written
    ckpt = Path(cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints")
    free = shutil.disk_usage(_existing_ancestor(ckpt)).free
    checks.append(Check("disk", "ok" if free >= need else "fail",
                        f"{human(free)} free under {_existing_ancestor(ckpt)}; checkpoints need "
                        f"{human(need)} ({cfg.checkpoint.keep} kept + 1 being written, {human(size)} each)",
                        "" if free >= need else "free space, point checkpoint.dir at a larger filesystem, or "
                                                "lower checkpoint.keep"))

    step = sum(result.time_s.values())
    save = planner.checkpoint_save_seconds(cfg, hw, nodes)
    job = os.environ.get("SLURM_JOB_ID")
    limit_text = _run(["squeue", "-h", "-j", job, "-o", "%l"])[1] if job and shutil.which("squeue") else \
        str(slurm.get("time", ""))
    limit = slurm_seconds(limit_text) if limit_text else None
    where = f"job {job}" if job else f"profile {cluster}"
    if limit is None:
        checks.append(Check("time limit", "ok",
                            f"{where}: no time limit; step ~{step:.0f} s, save ~{save:.0f} s"))
    elif limit < step + save:
        checks.append(Check("time limit", "fail",
                            f"{where}: {limit_text} < one step (~{step:.0f} s) + one save (~{save:.0f} s)",
                            "raise the time limit (profile slurm.time / sbatch --time) or shrink the step "
                            "(prompts_per_step, max_new_tokens)"))
    else:
        signal = slurm.get("signal")
        lead = int(str(signal).rpartition("@")[2]) if signal else 0
        train_phase = result.time_s.get("train fwd+bwd", 0.0)
        per_job = int((limit - save) // max(step, 1e-9))
        held = f"the whole run ({cfg.train.steps} steps)" if per_job >= cfg.train.steps else \
            f"~{per_job} of {cfg.train.steps} steps per job (requeues continue)"
        detail = f"{where}: {limit_text} holds {held}; step ~{step:.0f} s, save ~{save:.0f} s"
        if lead < save + train_phase:
            checks.append(Check("time limit", "warn",
                                detail + f"; preemption signal lead {lead} s < save + one train phase "
                                f"(~{save + train_phase:.0f} s)",
                                "raise the profile's slurm.signal lead (B:USR1@<seconds>)"))
        else:
            checks.append(Check("time limit", "ok", detail + f"; signal lead {lead} s covers a save"))
    return checks


def run_checks(cfg: Config | None, cluster: str = "b200", nodes: int = 1) -> list[Check]:
    checks = software_checks(cfg) + slurm_checks()
    if cfg is not None:
        checks += path_checks(cfg) + plan_checks(cfg, cluster, nodes)
    return checks


# ----------------------------------------------------------------------------- output
def print_table(checks: list[Check], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title=title, show_lines=False)
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    console.print(f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "delta-megatron doctor",
        """\
        Check, before a long Slurm job starts, that this node has what the run needs, and say how to
        fix what is missing: Python, torch/CUDA, NCCL, megatron-core, transformer-engine, SGLang and its
        router, math-verify (at the versions the package pins; needed or optional by the recipe's layer
        spec, engine and verifier), GPU count and memory against the plan, the Slurm client and
        accounting, readable data/model/tokenizer paths, writable log and checkpoint directories, free
        disk for checkpoint.keep + 1 checkpoints, and the time limit against the planner's step and save
        time (inside a job step: the job's own limit; `launch --doctor` runs it on every node).""",
        """\
        RECIPE (optional): a recipe name, module:function or YAML config (NAME@RUN for one run of a
        sweep) and dotted overrides; without it only the software and Slurm checks run.
        --nodes N, --cluster PROFILE (slurm/profiles/<name>.yaml: hardware + time limit)""",
        """\
        a table of checks (ok / warn / fail, with the fix) on stdout, or JSON with --json;
        exit 1 if any check fails, 2 on a bad recipe or override""",
        ["delta-megatron doctor qwen3-8b-delta --nodes 2 --cluster b200",
         "srun -N 2 --ntasks-per-node 1 delta-megatron doctor run.yaml --nodes 2   # every node of a job"])
    parser.add_argument("recipe", nargs="?", help="recipe name, module:function or YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. checkpoint.dir=/ckpt")
    parser.add_argument("--nodes", type=int, default=1,
                        help="actor nodes (the plan and recipes that take it)")
    parser.add_argument("--cluster", default="b200", help="profile name or YAML path (default b200)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    cfg = None
    try:
        if args.recipe:
            from delta_megatron.cli_config import load_runs

            runs = load_runs(args.recipe, args.overrides, args.nodes)
            if len(runs) > 1:
                raise ConfigError("recipe", args.recipe, f"a sweep of {len(runs)} runs: pick one with "
                                  f"{args.recipe}@RUN ({', '.join(runs)})")
            cfg = next(iter(runs.values()))
        checks = run_checks(cfg, args.cluster, args.nodes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        host = os.uname().nodename
        print_table(checks, f"delta-megatron doctor on {host}" + (f": {args.recipe}" if args.recipe else ""))
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
