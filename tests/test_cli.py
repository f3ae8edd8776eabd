"""The ``delta-megatron`` command line: help and version, ``config show/explain/diff``, ``doctor``."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from delta_megatron.cli import COMMANDS
from delta_megatron.cli import main as cli
from delta_megatron.cli_doctor import run_checks, slurm_seconds
from delta_megatron.config import Config, load_config
from delta_megatron.planner import load_recipe
from delta_megatron.utils.configs import field_doc, walk_fields
from pipelines.tiny_arith_cpu import smoke_config

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU machine reports")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli(list(argv))
    except SystemExit as exit_:  # argparse's --help / usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ help and version
def test_top_level_help_lists_every_command_and_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}  " in out and text in out
    examples = out.split("examples:\n")[1].splitlines()
    assert len(examples) >= len(COMMANDS) and all(e.startswith("  delta-megatron ") for e in examples)
    assert "RST" not in out and "``" not in out  # no module docstring leaking into the help


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"delta-megatron {importlib.metadata.version('delta-megatron')}\n"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_says_what_it_reads_writes_with_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: delta-megatron {command}" in out and "``" not in out  # plain text, no RST
    head, rest = out.split("Inputs:\n", 1)
    inputs, rest = rest.split("Outputs:\n", 1)
    outputs, example = rest.split("Example:\n", 1)
    assert len(head.split("\n\n", 1)[1].strip()) > 40  # what it does
    assert inputs.strip() and outputs.strip()
    assert example.strip().splitlines()[0].strip().startswith(("delta-megatron", "torchrun", "srun"))


def test_unknown_command_suggests_the_closest(capsys):
    code, _, err = run(capsys, "docter")
    assert code == 2 and "unknown command 'docter' (did you mean 'doctor'?)" in err


# ------------------------------------------------------------------ config show / explain / diff
@pytest.mark.parametrize("source,overrides", [
    ("pipelines.tiny_arith_cpu:config", ["train.lr=1e-3", "credit.methods=[delta,lowprob]"]),
    ("qwen3-14b-delta", ["train.steps=7", "--nodes", "2"]),
])
def test_config_show_round_trips(capsys, tmp_path, source, overrides):
    code, out, _ = run(capsys, "config", "show", source, *overrides)
    assert code == 0
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    nodes = {"nodes": 2} if "--nodes" in overrides else {}
    expected = load_recipe(source, [o for o in overrides if "=" in o], **nodes)
    assert load_config(path) == expected
    assert expected.train.lr == 1e-3 if source.startswith("pipelines") else expected.train.steps == 7


def test_config_show_of_a_sweep_and_one_of_its_runs(capsys):
    code, out, _ = run(capsys, "config", "show", "table3-qwen3-8b")
    assert code == 0 and out.count("---\n# run: qwen3-8b-") == 5
    code, out, _ = run(capsys, "config", "show", "table3-qwen3-8b@sapo")
    assert code == 0 and "# run" not in out and "name: sapo" in out
    code, _, err = run(capsys, "config", "show", "table3-qwen3-8b@nope")
    assert code == 2 and "run: 'nope' — table3-qwen3-8b has runs: qwen3-8b-dapo, qwen3-8b-dapo-ft" in err


def test_config_show_rejects_a_bad_override_with_the_path(capsys):
    code, out, err = run(capsys, "config", "show", "qwen3-8b-delta", "checkpoint.keep=0")
    assert code == 2 and out == "" and "checkpoint.keep: 0 — must be >= 1" in err


def test_config_explain_covers_every_field_of_every_section(capsys):
    code, out, _ = run(capsys, "config", "explain", "--all")
    assert code == 0
    lines = out.splitlines()
    heads = {line.split(" (")[0]: (line, lines[i + 1]) for i, line in enumerate(lines) if not line.startswith(" ")}
    fields = list(walk_fields(Config))
    assert set(heads) == {path for path, _, _ in fields}
    for path, f, tp in fields:
        head, meaning = heads[path]
        assert meaning.strip() == field_doc(f) != ""
        if not dataclasses.is_dataclass(tp):
            assert "; default " in head, head


def test_config_explain_one_field_and_a_typo(capsys):
    code, out, _ = run(capsys, "config", "explain", "train.lr", "rollout.sglang.weight_sync")
    assert code == 0
    assert out.splitlines() == [
        "train.lr (float; default 0.0005; > 0)", "    peak learning rate",
        "rollout.sglang.weight_sync (one of 'auto', 'ipc', 'distributed', 'disk'; default auto)",
        "    auto: ipc when colocated, distributed (NCCL; gloo on CPU) when disaggregated; disk: safetensors "
        "through sync_dir"]
    code, _, err = run(capsys, "config", "explain", "train.lrr")
    assert code == 2 and "train.lrr: 'train.lrr' — no such config key; closest: train.lr" in err


def test_config_diff(capsys):
    code, out, _ = run(capsys, "config", "diff", "table3-qwen3-8b@dapo", "table3-qwen3-8b@sapo")
    assert code == 0
    assert out.splitlines() == ["# table3-qwen3-8b@dapo -> table3-qwen3-8b@sapo: 2 differences",
                                "algo.loss.name: ppo -> sapo", "algo.aggregation: token-mean -> auto"]
    code, out, _ = run(capsys, "config", "diff", "qwen3-8b-delta", "qwen3-8b-delta", "train.lr=3e-6")
    assert code == 0 and out.splitlines() == ["# qwen3-8b-delta -> qwen3-8b-delta: 0 differences"]
    code, out, _ = run(capsys, "config", "diff", "table3-qwen3-8b")  # every run against the first
    assert code == 0 and out.count("# qwen3-8b-dapo -> ") == 4 and "credit.methods: [] -> [forking]" in out


# ------------------------------------------------------------------ doctor
def by_name(checks):
    return {c.name: c for c in checks}


@no_cuda
def test_doctor_on_a_cpu_machine(tmp_path):
    cpu = by_name(run_checks(smoke_config(str(tmp_path / "run")), cluster="b200"))
    for name in ("python", "torch", "megatron-core", "math-verify", "data.train", "logging.dir",
                 "checkpoint.dir", "plan", "disk", "time limit"):
        assert cpu[name].status == "ok", cpu[name]
    for name in ("cuda", "nccl", "gpus vs plan"):  # a CPU recipe does not need them: warn, with the fix
        assert cpu[name].status == "warn" and cpu[name].fix, cpu[name]
    assert cpu["cuda"].detail.startswith("no CUDA device")

    gpu = by_name(run_checks(load_recipe("qwen3-8b-delta"), cluster="b200"))
    for name in ("cuda", "nccl", "gpus vs plan"):  # a B200 recipe needs them: fail, with the fix
        assert gpu[name].status == "fail" and gpu[name].fix, gpu[name]
    assert gpu["model.hf_path"].status == "fail" and "/data/models/Qwen3-8B-Base" in gpu["model.hf_path"].detail
    assert all(c.fix for c in gpu.values() if c.status != "ok")


def test_doctor_names_a_missing_data_path(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "train.parquet"
    checks = by_name(run_checks(smoke_config(str(tmp_path / "run")), cluster="local"))
    assert checks["data.train"].status == "ok"
    code, out, _ = run(capsys, "doctor", "pipelines.tiny_arith_cpu:smoke_config", f"data.train={missing}",
                       f"logging.dir={tmp_path / 'run'}", "--cluster", "local", "--json")
    assert code == 1
    got = {c["name"]: c for c in json.loads(out)}
    assert got["data.train"]["status"] == "fail" and got["data.train"]["detail"] == f"{missing}: not found"
    assert "set data.train to an existing jsonl/parquet file" in got["data.train"]["fix"]
    assert [c["name"] for c in got.values() if c["status"] == "fail"] == ["data.train"]


def test_doctor_time_limit_against_the_plan(tmp_path):
    cfg = load_recipe("qwen3-8b-delta")
    cfg.checkpoint.dir = str(tmp_path)
    limit = by_name(run_checks(cfg, cluster="b200"))["time limit"]
    # 4 h of ~15 min steps (the planner's estimate) with a 120 s signal lead: fewer steps than the run
    assert limit.detail.startswith("profile b200: 04:00:00 holds ~") and "of 220 steps per job" in limit.detail


def test_slurm_durations():
    assert slurm_seconds("04:00:00") == 4 * 3600 and slurm_seconds("1-02:00:00") == 26 * 3600
    assert slurm_seconds("30") == 1800 and slurm_seconds("30:15") == 1815 and slurm_seconds("2-3") == 2 * 86400 + 3 * 3600
    assert slurm_seconds("UNLIMITED") is None


def test_launch_runs_the_doctor_on_every_node_first():
    from launchers.launch import train_script

    text = train_script(smoke_config(), doctor=("local", 2)).inline
    check = text.index('if [ "${LOCAL_RANK:-0}" = 0 ]; then python -m delta_megatron.cli doctor "$config" '
                       "--cluster local --nodes 2 || exit 1; fi")
    assert check < text.index("exec python -m delta_megatron.train")
    assert "doctor" not in train_script(smoke_config()).inline


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("srun") is None, reason="no srun: run slurm/local/setup.sh first")
def test_doctor_inside_a_slurm_job_step_reads_the_job_time_limit(tmp_path):
    """On the local cluster: a job step with a 5-minute limit; the doctor reads it from squeue."""
    done = subprocess.run(
        ["srun", "-N", "1", "-n", "1", "-t", "5", "--chdir", str(tmp_path), sys.executable, "-m", "delta_megatron.cli",
         "doctor", "pipelines.tiny_arith_cpu:smoke_config", f"logging.dir={tmp_path / 'run'}", "--cluster", "local",
         "--json"], capture_output=True, text=True, timeout=240, env=os.environ | {"PYTHONPATH": str(REPO)})
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    limit = checks["time limit"]
    assert limit["detail"].startswith("job ") and ": 5:00 " in limit["detail"], limit
    assert checks["slurm client"]["status"] == "ok" and checks["logging.dir"]["status"] == "ok"
