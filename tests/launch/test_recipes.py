"""The B200 recipes carry the paper's settings (delta.md §7.1) and plan as fitting on B200 nodes."""

from __future__ import annotations

import pytest

from delta_megatron.planner import PlanOptions, load_hardware, load_recipe, plan
from pipelines import qwen3_b200 as q


def test_paper_settings():
    cfg = q.qwen3_14b()
    assert (cfg.train.prompts_per_step, cfg.rollout.n_samples, cfg.train.mini_batches) == (128, 16, 4)
    assert (cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens) == (2048, 20480)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay) == (1e-6, 0, 0.1)
    loss = cfg.algo.loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip_c) == (0.2, 0.28, 10.0)
    assert cfg.algo.overlong.enabled and cfg.algo.overlong.buffer_len == 4096
    assert not cfg.algo.dynamic_sampling.enabled and cfg.algo.kl.estimator == "none"
    assert cfg.credit.methods == ["delta"]
    assert (cfg.credit.delta.K, tuple(cfg.credit.delta.lambda_range)) == (1, (0.8, 1.2))
    assert cfg.train.steps == 300 and q.qwen3_8b().train.steps == 220
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size) == (5120, 40, 17408)
    assert cfg.parallel.fp8 == "none" and q.qwen3_14b(fp8=True).parallel.fp8 == "delayed"


def test_table3_is_five_runs_differing_only_in_the_method():
    runs = q.table3("8b")
    assert list(runs) == [f"qwen3-8b-{m}" for m in ("dapo", "dapo-ft", "sapo", "fipo", "delta")]
    method = {name: (cfg.algo.loss.name, cfg.credit.methods) for name, cfg in runs.items()}
    assert method == {"qwen3-8b-dapo": ("ppo", []), "qwen3-8b-dapo-ft": ("ppo", ["forking"]),
                      "qwen3-8b-sapo": ("sapo", []), "qwen3-8b-fipo": ("fipo", []),
                      "qwen3-8b-delta": ("ppo", ["delta"])}
    assert runs["qwen3-8b-dapo-ft"].credit.forking.rho == 0.2
    assert (runs["qwen3-8b-sapo"].algo.loss.sapo.tau_pos, runs["qwen3-8b-sapo"].algo.loss.sapo.tau_neg) \
        == (1.0, 1.05)
    fipo = runs["qwen3-8b-fipo"].algo.loss.fipo
    assert (fipo.decay_rate, fipo.chunk, fipo.safety_thresh, tuple(fipo.f_range)) == (32.0, 128, 10.0,
                                                                                     (1.0, 1.2))
    assert {cfg.train.lr for cfg in runs.values()} == {1e-6}


@pytest.mark.parametrize("recipe, nodes", [("qwen3-8b-delta", 1), ("qwen3-14b-delta", 1),
                                           ("qwen3-14b-delta", 2), ("qwen3-32b-delta", 2),
                                           ("qwen3-32b-delta", 4), ("qwen3-14b-delta-fp8", 1)])
def test_recipes_fit_on_b200(recipe, nodes):
    result = plan(load_recipe(recipe, nodes=nodes), load_hardware("b200"), PlanOptions(nodes=nodes))
    assert result.fits, result.format()


def test_32b_does_not_fit_on_one_node():
    cfg = q.paper_config("32b", nodes=2)
    cfg.parallel.cp = 1  # tp 8 on one node: dp x cp = 1, nothing shards the Adam state
    result = plan(q.with_delta(cfg), load_hardware("b200"), PlanOptions(nodes=1))
    assert result.memory["train"]["optimizer"] / 2**30 == pytest.approx(45.8, abs=0.05)
    assert "optimizer" not in result.memory["rollout"]  # colocated: on the host while SGLang runs
    expected = ["train micro-batch: one sequence of 22528 tokens needs 22528 tokens per GPU at cp=1",
                "log-prob micro-batch: one sequence of 22528 tokens needs 22528 tokens per GPU"]
    assert len(result.problems) == 2
    for problem, start in zip(result.problems, expected):
        assert problem.startswith(start), problem
    cfg.memory.colocate = False  # the whole actor next to SGLang's pool (what the code did before)
    result = plan(q.with_delta(cfg), load_hardware("b200"), PlanOptions(nodes=1))
    assert result.problems[2].startswith("rollout phase: needs 194.0 GiB per GPU > usable 171.0 GiB")


@pytest.mark.parametrize("recipe, nodes", [("qwen3-8b-delta", 1), ("qwen3-14b-delta", 1),
                                           ("qwen3-32b-delta", 2), ("qwen3-14b-delta-fp8", 1)])
def test_recipes_checkpoint_before_the_b200_time_limit(recipe, nodes):
    """The b200 profile's 4 h limit leaves start-up + a step + (save + longest stage), and its signal
    comes before the time a save and the longest stage take: a job always checkpoints a finished
    step before its limit. The old 120 s lead did not cover a 14B rollout."""
    from launchers.executors import load_profile
    from launchers.launch import slurm_time_problems

    profile = load_profile("b200")
    result = plan(load_recipe(recipe, nodes=nodes), profile.hardware, PlanOptions(nodes=nodes))
    assert slurm_time_problems(result, profile) == []
    assert result.stages["rollout"] == max(result.stages.values())  # the stage the lead must cover
    profile.slurm.signal = "B:USR1@120"
    problem, = slurm_time_problems(result, profile)
    assert problem.startswith("signal lead: 120 s before the time limit < save") and "rollout" in problem
    profile.slurm.time = "00:30:00"
    assert any(p.startswith("time limit: 0.50 h") for p in slurm_time_problems(result, profile))
