"""Dry runs: the exact sbatch text NeMo-Run generates for the B200 recipes (snapshots), the config the
job will train with, and the profile/executor plumbing. Regenerate snapshots after an intended change
with ``UPDATE_SNAPSHOTS=1 pytest tests/launch/test_dry_run.py`` and review the diff."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from delta_megatron.config import Config
from delta_megatron.planner import PlanOptions, plan
from delta_megatron.utils.configs import from_dict
from launchers.executors import expand_env, load_profile, local_executor, rdzv_id
from launchers.launch import CONFIG_EOF, apply_planned_choices, launch, resolve_runs
from pipelines import qwen3_b200

SNAPSHOTS = Path(__file__).parent / "snapshots"


def check_snapshot(name: str, text: str, home: str) -> None:
    text = text.replace(home, "$NEMORUN_HOME")  # the only machine-specific part of a container job
    path = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}; run with UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text()


def dry_run(runs, home, **kwargs):
    return launch(runs, executor="slurm", profile=load_profile("b200"), dry_run=True, **kwargs)


def test_b200_2x8_sbatch_snapshot(nemorun_home, clean_profile_env):
    result = dry_run({"qwen3-14b-delta": qwen3_b200.qwen3_14b(nodes=2)}, nemorun_home, nodes=2,
                     title="qwen3-14b-delta", exp_id="qwen3-14b-delta_dryrun")
    assert list(result.sbatch) == ["qwen3-14b-delta_sbatch.sh"]
    text = result.sbatch["qwen3-14b-delta_sbatch.sh"]
    check_snapshot("b200_2x8_qwen3_14b_delta.sbatch", text, nemorun_home)
    # the parts this project is responsible for, spelled out
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert "#SBATCH --signal=B:USR1@1200\n" in text  # > save + the longest stage (planner)
    job_dir = "$NEMORUN_HOME/experiments/qwen3-14b-delta/qwen3-14b-delta_dryrun/qwen3-14b-delta"
    assert "export DELTA_MEGATRON_REQUEUE_MARKER=/nemo_run/requeue\n" in text.replace(nemorun_home, "$NEMORUN_HOME")
    assert f'dm_marker="{job_dir}/requeue"' in text.replace(nemorun_home, "$NEMORUN_HOME")
    assert "--nnodes 2 --nproc-per-node 8" in text and f"--rdzv-id {rdzv_id('qwen3-14b-delta/qwen3-14b-delta')}" in text
    assert "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1\n" in text
    assert "trap dm_on_signal USR1\n" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "--container-image nvcr.io/nvidia/pytorch:25.09-py3" in text
    assert not Path(result.exp_dir).exists()  # a dry run leaves nothing behind


def test_heterogeneous_sbatch_snapshot(nemorun_home, clean_profile_env):
    result = dry_run({"qwen3-14b-delta": qwen3_b200.qwen3_14b(nodes=2)}, nemorun_home, nodes=2,
                     rollout_nodes=1, title="qwen3-14b-delta", exp_id="qwen3-14b-delta_dryrun")
    text = result.sbatch["qwen3-14b-delta_sbatch.sh"]
    check_snapshot("b200_2x8_plus_1_sglang_qwen3_14b_delta.sbatch", text, nemorun_home)
    assert text.count("#SBATCH hetjob") == 1
    assert "srun --het-group=0" in text and "srun --het-group=1" in text
    hosts = "export DELTA_MEGATRON_ROLLOUT_HOSTS=$(scontrol show hostnames $SLURM_JOB_NODELIST_HET_GROUP_1 | paste -sd, -)"
    assert hosts in text and "SGLANG_ROUTER" not in text  # the trainer computes the placement itself


def test_heterogeneous_job_serves_from_the_same_placement(nemorun_home, clean_profile_env):
    result = dry_run({"q14": qwen3_b200.qwen3_14b(nodes=2)}, nemorun_home, nodes=2, rollout_nodes=1, title="h",
                     exp_id="h_keep", keep_dry_run_dir=True)
    scripts = Path(result.exp_dir) / "q14" / "scripts"
    train, serve = (scripts / "q14-0.sh").read_text(), (scripts / "q14-1.sh").read_text()
    assert serve.rstrip().endswith(
        'exec python -m delta_megatron.cli_serve --config "$config" --actor-nodes 2 --gpus-per-node 8')
    for text in (train, serve):  # the same config on both sides: disaggregated over one serving node
        body = yaml.safe_load(re.search(rf"<<'{CONFIG_EOF}'\n(.*){CONFIG_EOF}\n", text, re.S).group(1))
        assert (body["rollout"]["placement"], body["rollout"]["nodes"]) == ("disaggregated", 1)


def test_a_disaggregated_config_launches_as_rollout_nodes(nemorun_home, clean_profile_env):
    """``rollout.placement=disaggregated rollout.nodes=1`` in the config is ``--rollout-nodes 1``: the same
    heterogeneous job, and the planner counts the serving node's GPUs apart."""
    from delta_megatron.utils.configs import ConfigError, apply_overrides

    cfg = apply_overrides(qwen3_b200.qwen3_14b(nodes=2), ["rollout.placement=disaggregated", "rollout.nodes=1"])
    by_flag = dry_run({"q14": qwen3_b200.qwen3_14b(nodes=2)}, nemorun_home, nodes=2, rollout_nodes=1, title="h",
                      exp_id="h_same")
    by_config = dry_run({"q14": cfg}, nemorun_home, nodes=2, title="h", exp_id="h_same")
    assert by_config.sbatch == by_flag.sbatch and "#SBATCH hetjob" in by_config.sbatch["q14_sbatch.sh"]
    hw = load_profile("b200").hardware
    want = plan(qwen3_b200.qwen3_14b(nodes=2), hw, PlanOptions(nodes=2, rollout_nodes=1)).to_dict()
    assert plan(cfg, hw, PlanOptions(nodes=2)).to_dict() == want
    assert want != plan(qwen3_b200.qwen3_14b(nodes=2), hw, PlanOptions(nodes=2)).to_dict()
    with pytest.raises(ConfigError, match="one placement for every run of a launch"):
        dry_run({"a": cfg, "b": qwen3_b200.qwen3_14b(nodes=2)}, nemorun_home, nodes=2, title="h")


def test_the_job_trains_with_the_recipe_config(nemorun_home, clean_profile_env):
    cfg = qwen3_b200.qwen3_14b(nodes=2)
    result = dry_run({"q14": cfg}, nemorun_home, nodes=2, title="t", exp_id="t_keep",
                     keep_dry_run_dir=True)
    script = (Path(result.exp_dir) / "q14" / "scripts" / "q14.sh").read_text()
    body = re.search(rf"<<'{CONFIG_EOF}'\n(.*){CONFIG_EOF}\n", script, re.S).group(1)
    shipped = from_dict(Config, yaml.safe_load(body))
    cfg.logging.dir = "/checkpoints/runs/t/q14"  # run_dir of the b200 profile / title / job
    cfg.checkpoint.resume = "auto"
    assert shipped == cfg
    assert script.rstrip().endswith('exec python -m delta_megatron.train --config "$config" --resume auto')


def test_table3_is_one_experiment_of_five_jobs(nemorun_home, clean_profile_env):
    runs = resolve_runs("table3-qwen3-8b", [], nodes=1)
    result = dry_run(runs, nemorun_home, nodes=1, title="table3", exp_id="table3_dryrun")
    assert result.jobs == ["qwen3-8b-dapo", "qwen3-8b-dapo-ft", "qwen3-8b-sapo", "qwen3-8b-fipo",
                           "qwen3-8b-delta"]
    assert sorted(result.sbatch) == sorted(f"{j}_sbatch.sh" for j in result.jobs)


def test_overrides_reach_the_config():
    runs = resolve_runs("qwen3-8b-delta", ["train.steps=7", "parallel.fp8=delayed"], nodes=1)
    assert list(runs) == ["qwen3-8b-delta"]
    assert runs["qwen3-8b-delta"].train.steps == 7 and runs["qwen3-8b-delta"].parallel.fp8 == "delayed"


def test_profiles(monkeypatch, clean_profile_env):
    monkeypatch.setenv("SLURM_ACCOUNT", "proj_rl")
    b200 = load_profile("b200")
    assert (b200.slurm.account, b200.slurm.partition) == ("proj_rl", "batch")
    assert b200.hardware.gpus_per_node == 8 and b200.ranks_per_node == 8
    assert b200.slurm.container_mounts == ["/lustre/data:/data", "/lustre/checkpoints:/checkpoints"]
    local = load_profile("local")
    assert (local.slurm.container_image, local.ranks_per_node, local.slurm.signal) == (None, 2, "B:USR1@60")
    assert load_profile("h100").hardware.hbm_gib == 79.6
    assert expand_env({"a": ["${NOPE_X:-d}", "${SLURM_ACCOUNT}"]}) == {"a": ["d", "proj_rl"]}


def test_profile_validation_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nslurm:\n  signal: USR1\n")
    with pytest.raises(Exception, match=r"slurm.signal: 'USR1' — signal 'USR1': expected"):
        load_profile(str(bad))


def test_local_executor_is_torchrun():
    ex = local_executor(2)
    assert (ex.ntasks_per_node, ex.nodes, ex.launcher) == (2, 1, "torchrun")


def test_cli_dry_run_prints_the_sbatch(capsys, nemorun_home, clean_profile_env):
    from launchers.launch import main

    assert main(["qwen3-14b-delta", "--executor", "slurm", "--cluster", "b200", "--nodes", "2",
                 "--dry-run", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "# ---- qwen3-14b-delta_sbatch.sh\n#!/bin/bash\n" in out and "#SBATCH --nodes=2\n" in out


def test_cli_refuses_what_the_planner_rejects(capsys, nemorun_home, clean_profile_env):
    from launchers.launch import main

    assert main(["qwen3-14b-delta", "--executor", "slurm", "--cluster", "b200", "--dry-run",
                 "parallel.cp=1"]) == 1
    err = capsys.readouterr().err
    assert "verdict: DOES NOT FIT" in err and "train micro-batch: one sequence of 22528 tokens" in err


def test_plan_cli(capsys):
    from delta_megatron.planner import main

    assert main(["qwen3-32b-delta", "--nodes", "2", "--cluster", "b200"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    assert main(["qwen3-14b-delta", "--nodes", "1", "--cluster", "b200", "parallel.cp=1"]) == 1
    assert main(["no-such-recipe"]) == 2
    assert "recipe: 'no-such-recipe' — known recipes:" in capsys.readouterr().err


def test_launch_writes_the_planners_choices_into_the_job(nemorun_home, clean_profile_env, capsys):
    """`launch --executor slurm` plans, checks the time limit and signal lead, and the job's config
    carries what the plan assumed: the DelTA cache's device (auto resolved) and the save time."""
    from launchers.launch import main

    assert main(["qwen3-14b-delta", "--executor", "slurm", "--cluster", "b200", "--dry-run",
                 "credit.delta.cache_device=auto"]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --signal=B:USR1@1200" in text
    runs = resolve_runs("qwen3-14b-delta", [], nodes=1)
    planned = plan(runs["qwen3-14b-delta"], load_profile("b200").hardware, PlanOptions(nodes=1))
    cfg = apply_planned_choices(runs["qwen3-14b-delta"], planned)
    assert cfg.credit.delta.cache_device == "gpu" and cfg.checkpoint.save_seconds == 21.0  # ⌈20.7 s⌉
    # a lead the plan rejects stops the launch before anything is submitted
    assert main(["qwen3-14b-delta", "--executor", "slurm", "--cluster", "b200", "--dry-run",
                 "eval.max_prompts=150"]) == 1  # 2 sets x 150 x 8 samples of <= 30000 tokens: ~38 min
    err = capsys.readouterr().err
    assert "signal lead: 1200 s before the time limit" in err and "longest stage (eval" in err
