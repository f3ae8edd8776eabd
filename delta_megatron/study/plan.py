"""A study directory: its manifest (``study.json``), the (method, seed) runs and their states.

Layout (local executor)::

    DIR/study.json                   recipe, overrides, warm start, methods, seeds, baseline, runs
    DIR/warm_start/                  the shared SFT warm start (if the recipe has one)
    DIR/runs/<method>/seed_<n>/      one run: run.yaml, train.log, status.json, metrics.jsonl, ...
    DIR/study.md, study.csv, ...     the report

On Slurm the runs live where the cluster profile puts job outputs (``slurm.run_dir``); the manifest
records each run's directory as the job sees it and as this machine sees it (container mounts
mapped back), so ``study report`` reads them from a shared filesystem.

A run is *done* when its metrics reach the last step; otherwise, re-running the study resumes it
from its last checkpoint (``checkpoint.resume=auto``). Re-running with more seeds or methods adds
runs; a different recipe, warm start or overrides in the same directory is refused, so one study's
runs always share one configuration apart from method and seed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from delta_megatron.config import Config
from delta_megatron.study.presets import method_overrides
from delta_megatron.utils.configs import ConfigError, apply_overrides, validate

MANIFEST = "study.json"
STATUS = "status.json"


@dataclass
class RunSpec:
    """One (method, seed) run. ``dir``: where this machine reads it; ``job_dir``: where the job
    writes it (differs on a container cluster)."""

    method: str
    seed: int
    dir: str
    steps: int
    job_dir: str | None = None

    @property
    def name(self) -> str:
        return f"{self.method}/seed_{self.seed}"

    @property
    def job_name(self) -> str:
        """A Slurm/NeMo-Run-safe name: ``delta+lowprob`` seed 3 → ``delta-lowprob-s3``."""
        return re.sub(r"[^A-Za-z0-9-]+", "-", self.method) + f"-s{self.seed}"


@dataclass
class StudyManifest:
    recipe: str
    methods: list[str]
    seeds: list[int]
    baseline: str
    overrides: list[str] = field(default_factory=list)
    warm_start: str | None = None
    seed_keys: list[str] = field(default_factory=lambda: ["train.seed"])
    executor: str = "local"
    runs: list[RunSpec] = field(default_factory=list)

    # identity: what every run of the study shares
    def identity(self) -> dict:
        return {"recipe": self.recipe, "overrides": self.overrides, "warm_start": self.warm_start,
                "seed_keys": self.seed_keys, "executor": self.executor}

    def save(self, study_dir: Path) -> Path:
        study_dir.mkdir(parents=True, exist_ok=True)
        path = study_dir / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, study_dir: Path) -> StudyManifest:
        path = Path(study_dir) / MANIFEST
        if not Path(study_dir).is_dir():
            raise ConfigError("study_dir", str(study_dir), "no such directory")
        if not path.exists():
            raise ConfigError("study_dir", str(study_dir),
                              f"not a study directory (no {MANIFEST}); create one with `delta-megatron study "
                              f"--recipe ... --out {study_dir}`")
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = [RunSpec(**r) for r in data.pop("runs", [])]
        return cls(**data, runs=runs)

    def merge(self, new: StudyManifest) -> StudyManifest:
        """This (existing) study extended by ``new``'s methods and seeds (``new``'s entry wins for a run
        both list); refuses a different setup."""
        if self.identity() != new.identity():
            diff = {k: (v, new.identity()[k]) for k, v in self.identity().items() if new.identity()[k] != v}
            key = next(iter(diff))
            raise ConfigError(key, diff[key][1], f"this study directory was made with {key}={diff[key][0]!r}; "
                              "use a new --out for a different setup")
        methods = self.methods + [m for m in new.methods if m not in self.methods]
        seeds = sorted(set(self.seeds) | set(new.seeds))
        latest = {r.name: r for r in new.runs}  # a resubmitted Slurm run may have a new directory
        runs = [latest.pop(r.name, r) for r in self.runs] + list(latest.values())
        return StudyManifest(self.recipe, methods, seeds, new.baseline, self.overrides, self.warm_start,
                             self.seed_keys, self.executor, runs)


def seed_overrides(seed: int, keys: list[str]) -> list[str]:
    return [f"{k}={seed}" for k in keys]


def run_config(base: Config, method: str, seed: int, seed_keys: list[str], run_dir: str,
               extra: list[str] = ()) -> Config:
    """The config of one run: the recipe's, then the method preset, the seed, the study's extra
    overrides (warm start), and where the run writes; resumable from its last checkpoint (a recipe
    that saves only at the end gets a checkpoint every fifth of the run)."""
    every = [] if base.checkpoint.every else [f"checkpoint.every={max(1, math.ceil(base.train.steps / 5))}"]
    cfg = apply_overrides(base, method_overrides(method) + seed_overrides(seed, seed_keys) + list(extra) + every + [
        f"logging.dir={run_dir}", "checkpoint.resume=auto", "logging.progress=false"])
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- run states
def read_rows(run_dir: str | Path) -> list[dict]:
    """The run's metrics rows, one per step (a resumed run may have re-logged steps: last wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed run
                continue
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def steps_done(run_dir: str | Path) -> int:
    rows = read_rows(run_dir)
    return rows[-1]["step"] + 1 if rows else 0


def read_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_status(run_dir: str | Path, **status) -> None:
    path = Path(run_dir) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_state(spec: RunSpec) -> str:
    """``done`` (metrics reach the last step), ``failed`` (the last attempt failed), ``partial``
    (started: it will resume from its last checkpoint) or ``pending``."""
    if steps_done(spec.dir) >= spec.steps:
        return "done"
    status = read_status(spec.dir).get("state")
    if status == "failed":
        return "failed"
    if status is not None or (Path(spec.dir) / "metrics.jsonl").exists():
        return "partial"
    return "pending"


def host_path(job_path: str, mounts: list[str]) -> str:
    """A path inside a container (``/checkpoints/runs/x``) as the host sees it through the profile's
    ``host:container`` mounts; unchanged when no mount covers it."""
    best = None
    for mount in mounts:
        host, _, inside = mount.partition(":")
        inside = inside.split(":")[0]
        if inside and (job_path == inside or job_path.startswith(inside.rstrip("/") + "/")):
            if best is None or len(inside) > len(best[1]):
                best = (host, inside)
    if best is None:
        return job_path
    return best[0].rstrip("/") + job_path[len(best[1].rstrip("/")):]


def fmt_seconds(s: float) -> str:
    if s is None or math.isnan(s):
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
