"""``delta-megatron study``: presets, the local pool (bounded, failures reported, resumable after an
interruption), the report's numbers against the known curves of a fake trainer, the Slurm dry run,
and the errors for unknown methods, a missing recipe and an empty study directory.

The pool and report tests swap the trainer for ``fake_trainer.py`` (milliseconds per run, curves that
are formulas of method and seed); one slow test runs the real trainer end to end."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from delta_megatron.cli_study import main as study
from delta_megatron.config import load_config
from delta_megatron.study import local
from delta_megatron.study.plan import StudyManifest, read_rows
from delta_megatron.study.presets import PRESETS, method_overrides
from pipelines.tiny_arith_cpu import smoke_config

FAKE = Path(__file__).with_name("fake_trainer.py")
RECIPE = "pipelines.tiny_arith_cpu:smoke_config"
BASE = ["--recipe", RECIPE, "train.steps=6", "eval.every=2"]


@pytest.fixture
def fake_trainer(monkeypatch):
    monkeypatch.setattr(local, "train_command",
                        lambda spec: [sys.executable, str(FAKE), str(Path(spec.dir) / "run.yaml")])
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_HANG", raising=False)


def attempts(out: Path, name: str) -> list[str]:
    return (out / "runs" / name / "attempts.txt").read_text().split()


# ----------------------------------------------------------------------------- presets
def test_presets_set_loss_and_credit():
    assert method_overrides("dapo") == ["algo.loss.name=ppo", "credit.methods=[]"]
    assert method_overrides("dapo-ft") == ["algo.loss.name=ppo", "credit.methods=[forking]",
                                           "credit.forking.rho=0.2"]
    assert method_overrides("delta+lowprob") == ["algo.loss.name=ppo", "credit.methods=[lowprob,delta]"]
    assert method_overrides("sapo+delta") == ["algo.loss.name=sapo", "credit.methods=[delta]",
                                              "algo.aggregation=auto"]
    base = smoke_config()  # the recipe names DelTA: every preset must replace it
    for name in [*PRESETS, "delta+lowprob", "ktae+delta", "fipo+dapo-ft"]:
        cfg = load_config(base=base, overrides=method_overrides(name))
        assert ("delta" in cfg.credit.methods) == ("delta" in name.split("+")), name
    assert load_config(base=base, overrides=method_overrides("gspo")).algo.resolved_aggregation == \
        "seq-mean-token-mean"


@pytest.mark.parametrize("methods, message", [
    ("dapo,foo", "methods: 'foo' — unknown method 'foo'; known: dapo, dapo-ft, sapo"),
    ("dapo,sapo+gspo", "combines two policy losses ['gspo', 'sapo']"),
    ("dapo,delta,delta", "each method at most once"),
])
def test_unknown_methods_are_refused(methods, message, tmp_path, capsys):
    assert study([*BASE, "--methods", methods, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing started


def test_missing_recipe_and_bad_baseline(tmp_path, capsys):
    assert study(["--methods", "dapo,delta", "--out", str(tmp_path)]) == 2
    assert "recipe: None — --recipe is required" in capsys.readouterr().err
    assert study(["--recipe", "pipelines.nope:config", "--out", str(tmp_path)]) == 2
    assert "recipe: 'pipelines.nope:config' — cannot load it: No module named 'pipelines.nope'" in capsys.readouterr().err
    assert study([*BASE, "--methods", "delta,sapo", "--out", str(tmp_path)]) == 2
    assert "baseline: 'dapo' — must be one of --methods (delta, sapo)" in capsys.readouterr().err


def test_report_of_an_empty_or_unfinished_study(tmp_path, capsys):
    assert study(["report", str(tmp_path)]) == 2
    assert "not a study directory (no study.json)" in capsys.readouterr().err
    assert study(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    StudyManifest(RECIPE, ["dapo"], [1], "dapo").save(tmp_path)
    assert study(["report", str(tmp_path)]) == 2
    assert "0 runs, none finished" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the local pool
def test_study_runs_reports_and_numbers_match(tmp_path, fake_trainer, capsys):
    out = tmp_path / "s"
    rc = study([*BASE, "--methods", "dapo,delta", "--seeds", "3", "--jobs", "2", "--out", str(out),
                "--warm-start", "tests.study.fake_warm_start:warm_start"])
    assert rc == 0, capsys.readouterr().err
    manifest = StudyManifest.load(out)
    assert [r.name for r in manifest.runs] == [f"{m}/seed_{s}" for m in ("dapo", "delta") for s in (1, 2, 3)]
    run_yaml = (out / "runs" / "delta" / "seed_2" / "run.yaml").read_text()
    assert "seed: 2" in run_yaml and "lr: 0.00123" in run_yaml and "- delta" in run_yaml
    assert (out / "warm_start" / "calls.txt").read_text().split() == ["32"]  # once, on the recipe's model
    status = json.loads((out / "runs" / "dapo" / "seed_1" / "status.json").read_text())
    assert status["state"] == "done" and status["rc"] == 0 and status["cpu_s"] > 0

    # acc(x) = base·x/6 + c·seed at x = 2, 4, 6; base 0.6, c 0.012 (DelTA) / base 0.4, c 0.01 (DAPO)
    rows = {(r["metric"], r["method"]): r for r in csv.DictReader(open(out / "study.csv"))}
    assert float(rows["final_acc", "delta"]["value"]) == pytest.approx(0.624)
    assert float(rows["final_acc", "dapo"]["value"]) == pytest.approx(0.42)
    assert float(rows["auc", "delta"]["value"]) == pytest.approx(0.4 + 0.024)  # linear: the value at x = 4
    assert float(rows["final_reward", "dapo"]["value"]) == pytest.approx(0.4 * 4 / 6 + 0.02)  # mean of x = 2..6
    assert float(rows["final_acc", "delta"]["p_value"]) == pytest.approx(1 / 20)  # 3 vs 3, separated
    assert float(rows["final_acc", "delta"]["p_holm"]) == pytest.approx(1 / 20)  # a family of one
    assert float(rows["final_acc", "delta"]["vargha_delaney_a"]) == 1.0
    # DAPO's final accuracy 0.42: DelTA seed 1 gets there at x = 6 (0.412 at x = 4), seeds 2, 3 at x = 4
    runs = {(r["method"], r["seed"]): r for r in csv.DictReader(open(out / "runs.csv"))}
    assert [float(runs["delta", s]["steps_to_baseline"]) for s in "123"] == [6, 4, 4]
    assert float(rows["steps_to_baseline", "delta"]["value"]) == 4 and rows["steps_to_baseline", "delta"]["reached"] == "3"
    md = (out / "study.md").read_text()
    assert "| delta | 3 | 0.624 [" in md and "| dapo | 3 | 0.420 [" in md
    for name in ("curves.png", "seeds.png", "token_clouds/delta.png", "token_clouds/delta.md",
                 "runs/delta/seed_1/token_clouds.png"):
        assert (out / name).read_bytes()[:4] in (b"\x89PNG", b"# To"), name
    # token clouds: "0" has mean (30 + 20) / 45 on every step and seed, "digit" 38 / 40
    assert "| 1 | `digit` | 0.9500 | 720 |" in (out / "token_clouds" / "delta.md").read_text()
    err = capsys.readouterr().err
    assert "runs 6: 6 done (0 earlier), 0 running, 0 failed" in err


def test_a_failed_run_is_reported_not_fatal_and_retried(tmp_path, fake_trainer, monkeypatch, capsys):
    out = tmp_path / "s"
    monkeypatch.setenv("FAKE_FAIL", "delta/seed_2")
    assert study([*BASE, "--methods", "dapo,delta", "--seeds", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "failed: delta/seed_2 (rc 3" in err
    status = json.loads((out / "runs" / "delta" / "seed_2" / "status.json").read_text())
    assert status["state"] == "failed" and status["rc"] == 3 and "fake failure" in status["log_tail"]
    md = (out / "study.md").read_text()  # the report covers the runs that finished
    assert "finished runs: 3 of 4 (excluded: delta/seed_2 (failed))" in md
    monkeypatch.delenv("FAKE_FAIL")
    assert study([*BASE, "--methods", "dapo,delta", "--seeds", "2", "--out", str(out)]) == 0
    assert attempts(out, "delta/seed_2") == ["auto", "auto"] and attempts(out, "dapo/seed_1") == ["auto"]
    assert [r["step"] for r in read_rows(out / "runs" / "delta" / "seed_2")] == list(range(6))


def test_an_interrupted_study_resumes(tmp_path, fake_trainer, monkeypatch, capsys):
    """SIGINT to the study while delta/seed_1 hangs at step 3: the runs that finished stay finished,
    the running ones are told to checkpoint (SIGTERM → exit 75); the same command again skips the
    finished runs and resumes the others after their last checkpoint."""
    out = tmp_path / "s"
    monkeypatch.setenv("FAKE_HANG", "delta/seed_1:3")
    args = [*BASE, "--methods", "dapo,delta", "--seeds", "2", "--jobs", "1", "--out", str(out)]
    hung = out / "runs" / "delta" / "seed_1" / "checkpoint.txt"

    def interrupt():
        deadline = time.time() + 60
        while time.time() < deadline and not (hung.exists() and hung.read_text() == "3"):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    assert study(args) == 130
    assert "interrupted: runs saved their checkpoints" in capsys.readouterr().err
    status = json.loads((out / "runs" / "delta" / "seed_1" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["rc"] == 75
    assert [json.loads((out / "runs" / n / "status.json").read_text())["state"]
            for n in ("dapo/seed_1", "dapo/seed_2")] == ["done", "done"]
    assert not (out / "runs" / "delta" / "seed_2").exists() or \
        not (out / "runs" / "delta" / "seed_2" / "attempts.txt").exists()  # never started (--jobs 1)

    monkeypatch.delenv("FAKE_HANG")
    assert study(args) == 0
    assert "runs 4: 4 done (2 earlier)" in capsys.readouterr().err
    assert attempts(out, "dapo/seed_1") == ["auto"]  # skipped
    assert attempts(out, "delta/seed_1") == ["auto", "auto"]  # resumed ...
    assert [r["step"] for r in read_rows(out / "runs" / "delta" / "seed_1")] == list(range(6))  # ... after step 3
    lines = (out / "runs" / "delta" / "seed_1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # no step was redone
    assert "start (resume after step 3)" in (out / "runs" / "delta" / "seed_1" / "train.log").read_text()


def test_more_seeds_extend_a_study_but_another_setup_is_refused(tmp_path, fake_trainer, capsys):
    out = tmp_path / "s"
    assert study([*BASE, "--methods", "dapo,delta", "--seeds", "1", "--out", str(out), "--no-report"]) == 0
    assert study([*BASE, "--methods", "dapo,delta", "--seeds", "2", "--out", str(out), "--no-report"]) == 0
    assert attempts(out, "dapo/seed_1") == ["auto"] and attempts(out, "dapo/seed_2") == ["auto"]
    assert StudyManifest.load(out).seeds == [1, 2]
    assert study([*BASE, "train.lr=1e-3", "--methods", "dapo", "--seeds", "1", "--out", str(out)]) == 2
    assert "this study directory was made with overrides=" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Slurm and help
def test_slurm_dry_run_is_one_job_per_run(tmp_path, capsys, monkeypatch):
    for var in ("SLURM_ACCOUNT", "SLURM_PARTITION", "DELTA_IMAGE", "DELTA_DATA", "DELTA_CKPT"):
        monkeypatch.delenv(var, raising=False)
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        rc = study(["--recipe", "qwen3-8b-delta", "--methods", "dapo,delta+lowprob", "--seeds", "2",
                    "--executor", "slurm", "--cluster", "b200", "--dry-run", "--out", str(tmp_path / "study-8b")])
    assert rc == 0
    captured = capsys.readouterr()
    scripts = captured.out.split("# ---- ")[1:]
    assert [s.split("\n")[0] for s in scripts] == [f"{j}_sbatch.sh" for j in (
        "dapo-s1", "dapo-s2", "delta-lowprob-s1", "delta-lowprob-s2")]
    text = scripts[2]
    assert "#SBATCH --job-name=dm.delta-lowprob-s1\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert "--nnodes 1 --nproc-per-node 8" in text and "#SBATCH --signal=B:USR1@1200\n" in text
    assert "dry run: 4 jobs" in captured.err
    assert not (tmp_path / "study-8b" / "study.json").exists()  # a dry run records nothing
    # where each job writes, as the job and as this machine see it (the profile's mounts mapped back)
    from delta_megatron.cli_study import _job_dirs
    from delta_megatron.planner import load_recipe
    from delta_megatron.study.plan import run_config
    from launchers.executors import load_profile

    job, host = _job_dirs(load_profile("b200"), "study-8b", "delta-lowprob-s1", None)
    assert (job, host) == ("/checkpoints/runs/study-8b/delta-lowprob-s1", "/lustre/checkpoints/runs/study-8b/delta-lowprob-s1")
    cfg = run_config(load_recipe("qwen3-8b-delta"), "delta+lowprob", 2, ["train.seed"], job)
    assert (cfg.credit.methods, cfg.train.seed, cfg.logging.dir) == (["lowprob", "delta"], 2, job)
    assert cfg.checkpoint.resume == "auto"


def test_help_documents_both_commands(capsys):
    for argv, words in ((["--help"], ["--methods", "--seeds", "--executor", "--warm-start", "resume"]),
                        (["report", "--help"], ["Mann–Whitney", "Holm", "Vargha–Delaney", "bootstrap", "--baseline"])):
        with pytest.raises(SystemExit) as exit_:
            study(argv)
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), (argv, text)


# ----------------------------------------------------------------------------- the real trainer
@pytest.mark.slow
def test_a_real_study_end_to_end(tmp_path, capsys):
    """Two methods × one seed of the smoke recipe through the real trainer processes."""
    out = tmp_path / "s"
    rc = study(["--recipe", RECIPE, "--methods", "dapo,delta", "--seeds", "1", "--jobs", "2", "--out", str(out),
                "train.steps=2", "data.synthetic_digits=1"])
    assert rc == 0, capsys.readouterr().err
    for method in ("dapo", "delta"):
        rows = read_rows(out / "runs" / method / "seed_1")
        assert [r["step"] for r in rows] == [0, 1]
        assert (out / "runs" / method / "seed_1" / "checkpoints").is_dir()
    assert "credit/delta/lambda_bar_mean" in read_rows(out / "runs" / "delta" / "seed_1")[0]
    assert (out / "study.md").exists() and (out / "curves.png").exists()
