"""The Megatron actor in one process (TP = PP = DP = 1) against an unsharded transformers reference.

The actor loads a tiny Qwen3 (fp32; vocab 64, hidden 64, 4 heads / 2 KV heads, 4 layers) from an HF
checkpoint; ``tests/actor/hf_reference.py`` recomputes everything from the same checkpoint with
transformers, one sequence at a time:

* ``old_logprobs``: log p and entropy of every token (1e-5), for token budgets that pack the 12
  samples one per micro-batch, a few per micro-batch and all in one (packing must not matter);
* DelTA λ̄ (``credit_delta``) = ``delta_reference`` on v = (1 − p) h from HF's final-norm hidden
  states (1e-5), in cache / moments / recompute mode, with 0 / K+1 / K+2 extra forwards;
* ``score_sequences`` = HF sums of log p;
* ``train``: two PPO mini-batches (two Adam steps, the first one grad-norm clipped) give the same weights
  as the HF reference step with ``torch.optim.Adam`` (1e-5), for micro-batch budgets 24 and 4096
  (and the plain vs the distributed optimizer); the first mini-batch's ``ppo_kl`` is 0;
* FIPO with the kept-token normaliser and seq-mask-tis, responses dropped in the forward of both
  mini-batches: the actor's one gradient rescale equals the HF step on the whole mini-batch divided by
  its kept tokens (budgets 24 and 4096; DP = 2 in test_actor_dist.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from delta_megatron.actor.megatron_actor import MegatronActor
from delta_megatron.algo.rollout_correction import mismatch_metrics
from delta_megatron.credit.delta import DeltaConfig, DeltaCredit
from delta_megatron.credit_contract import Capture, LossPlan
from delta_megatron.parallel import destroy, init_distributed
from tests.actor import hf_reference as ref_lib
from tests.dist.actor_worker import (
    FIDELITY,
    count_runs,
    export_weights,
    fidelity_fields,
    fidelity_run,
    make_batch,
    make_config,
    record_minibatches,
    score_inputs,
    write_hf_checkpoint,
)

TOL = dict(atol=1e-5, rtol=0)
# transformer forwards over the batch per old_logprobs call with K = 1 (cache: none extra)
RUNS = {"cache": 1, "moments": 3, "recompute": 4}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("actor") / "qwen3_tiny")


@pytest.fixture(scope="module")
def ref(hf_dir):
    return ref_lib.reference_run(hf_dir)


@pytest.fixture(scope="module")
def groups(hf_dir):
    g = init_distributed(make_config(hf_dir).parallel, seed=3)
    yield g
    destroy()


@pytest.fixture(scope="module")
def actor(groups, hf_dir):
    return MegatronActor(make_config(hf_dir).actor_config(), groups)


def test_train_deterministic_reaches_megatron(actor):
    """``train.deterministic`` (on in these configs) is megatron's deterministic_mode: the embedding
    takes its index-based path, and every comparison in this file holds with it."""
    from delta_megatron.models.gpt import unwrap

    assert actor.cfg.train.deterministic
    assert unwrap(actor.model[0]).config.deterministic_mode is True
    assert unwrap(actor.model[0]).embedding.word_embeddings.deterministic_mode is True


def test_reference_is_not_degenerate(ref):
    """The comparisons below mean something: λ̄ varies, both advantage signs and A = 0 occur."""
    resp = ref.batch.loss_mask
    adv = ref.batch["advantage_tokens"][resp]
    assert (adv > 0).any() and (adv < 0).any() and (adv == 0).any()
    assert ref.lam[resp].std() > 0.05
    assert ref.lam[resp].mean() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("budget", [5, 24, 4096])
def test_old_logprobs_equal_hf_for_any_token_budget(actor, ref, budget):
    batch = make_batch()
    assert len(batch.micro_batches(budget)) == {5: 12, 24: 6, 4096: 1}[budget]  # the packings differ
    actor.cfg.train.max_tokens_per_gpu_logprob = budget
    try:
        actor.old_logprobs(batch, Capture(entropy=True))
    finally:
        actor.cfg.train.max_tokens_per_gpu_logprob = 24
    has = ref.tokens.has_target
    torch.testing.assert_close(batch["logp_old"][has], ref.tokens.logp[has], **TOL)
    torch.testing.assert_close(batch["entropy"][has], ref.tokens.entropy[has], **TOL)
    assert (batch["logp_old"][~has] == 0).all()


def test_old_logprobs_apply_the_rollout_temperature(actor, ref):
    batch = make_batch()
    actor.cfg.logprob_temperature = 0.7
    try:
        actor.old_logprobs(batch)
    finally:
        actor.cfg.logprob_temperature = 1.0
    hot = ref_lib.token_stats(ref.model, batch, temperature=0.7)
    has = hot.has_target
    torch.testing.assert_close(batch["logp_old"][has], hot.logp[has], **TOL)
    assert (hot.logp - ref.tokens.logp)[has].abs().max() > 0.1  # T matters at this scale


@pytest.mark.parametrize("mode", ["cache", "moments", "recompute"])
def test_delta_lambda_equals_reference(actor, ref, mode):
    batch = make_batch()
    runs = count_runs(actor)
    try:
        metrics = actor.old_logprobs(batch, ref_lib.capture_for(DeltaCredit(DeltaConfig(mode=mode))))
    finally:
        del actor._run  # drop the spy (instance attribute) again
    torch.testing.assert_close(batch["credit_delta"], ref.lam, **TOL)  # 0 off the response
    assert runs[0] == RUNS[mode]
    assert metrics["credit/delta/extra_forwards"] == RUNS[mode] - 1
    adv = batch["advantage_tokens"][batch.loss_mask]
    assert metrics["credit/delta/n_pos"] == float((adv > 0).sum())
    assert metrics["credit/delta/n_neg"] == float((adv < 0).sum())
    assert metrics["credit/delta/n_zero"] == float((adv == 0).sum())


def test_delta_host_cache_equals_device_cache_in_the_actor(actor):
    """credit.delta.cache_device=host inside the old-log-prob pass: the same λ̄ bit for bit."""
    got = {}
    for place in ("gpu", "host"):
        batch = make_batch()
        actor.old_logprobs(batch, ref_lib.capture_for(DeltaCredit(DeltaConfig(cache_device=place))))
        got[place] = batch["credit_delta"]
    assert torch.equal(got["host"], got["gpu"]) and got["gpu"].std() > 0.01


@pytest.mark.parametrize("mode", ["cache", "recompute"])
def test_delta_topk_hidden_proxy_equals_reference(actor, ref, mode):
    """The §2.2 ablation proxy built inside the output layer (global top-K from the log-prob kernel)
    gives the λ̄ of the literal DelTA on v̂ from HF's LM head."""
    cfg = DeltaConfig(mode=mode, proxy="topk_hidden", topk_k=8)
    batch = make_batch()
    actor.old_logprobs(batch, ref_lib.capture_for(DeltaCredit(cfg)))
    want = ref_lib.delta_lambda_topk(ref.model, ref.tokens, batch, cfg)
    torch.testing.assert_close(batch["credit_delta"], want, **TOL)
    assert (want - ref.lam)[batch.loss_mask].abs().max() > 1e-2  # not the default proxy's λ̄


def test_score_sequences_equal_hf_sums(actor, ref):
    seqs, masks = score_inputs(ref.batch)
    got = actor.score_sequences(seqs, masks)
    want = ref_lib.score_sums(ref.model, seqs, masks)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5 * max(int(m.sum()) for m in masks), rtol=0)


def _train_once(groups, hf_dir, budget: int, dist_opt: bool):
    cfg = make_config(hf_dir, [f"train.max_tokens_per_gpu_train={budget}",
                               f"train.max_tokens_per_gpu_logprob={budget}",
                               f"parallel.distributed_optimizer={str(dist_opt).lower()}"])
    actor = MegatronActor(cfg.actor_config(), groups)
    batch = make_batch()
    actor.old_logprobs(batch, ref_lib.capture_for(DeltaCredit(DeltaConfig(mode="cache"))))
    minis = record_minibatches(actor)
    mean = actor.train(batch, LossPlan(weight_field="credit_delta"))
    after = make_batch()
    actor.old_logprobs(after)
    return SimpleNamespace(minis=minis, mean=mean, weights=export_weights(actor),
                           logp_after=after["logp_old"])


@pytest.fixture(scope="module")
def trained(groups, hf_dir):
    return {budget: _train_once(groups, hf_dir, budget, dist_opt)
            for budget, dist_opt in ((24, False), (4096, True))}


@pytest.mark.parametrize("budget", [24, 4096])
def test_train_step_equals_reference(trained, ref, budget):
    got, want = trained[budget], ref.train
    assert len(got.minis) == 2
    assert abs(got.minis[0]["train/ppo_kl"]) < 1e-7  # ratio exactly 1 before the first update
    assert abs(got.minis[1]["train/ppo_kl"] - want.ppo_kl[1]) < 1e-6
    assert abs(want.ppo_kl[1]) > 1e-3  # ... and measurably not after it
    for k in range(2):
        assert got.minis[k]["train/grad_norm"] == pytest.approx(want.grad_norms[k], rel=1e-5)
        assert got.minis[k]["train/update_skipped"] == 0.0
    # train.grad_clip = 3: the first step is clipped, the second not (a wrong gradient scale then
    # shows in the weights, not only in grad_norm)
    assert want.grad_norms[0] > 3.0 > want.grad_norms[1]
    initial = ref.model.state_dict()
    assert set(got.weights) == set(want.state_dict) - {"lm_head.weight"}  # tied: exported once
    moved = 0.0
    for name, w in got.weights.items():
        torch.testing.assert_close(w, want.state_dict[name], **TOL, msg=name)
        moved = max(moved, float((w - initial[name]).abs().max()))
    assert moved > 1e-3  # the step is large against the tolerance
    has = ref.tokens.has_target
    after = ref_lib.token_stats(want.model, make_batch())
    # log p after the step inherits the weights' ~3e-7 round-off, amplified through 4 layers
    torch.testing.assert_close(got.logp_after[has], after.logp[has], atol=5e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_to_reference_step_equals_reference(groups, hf_dir, ref, estimator):
    """KL to the frozen initial policy: ``ref_logprobs`` swaps the initial weights in and out; the
    train step with the KL term equals the HF reference; the reference stays the initial policy after
    the update, and the policy's weights are restored after each reference pass."""
    cfg = make_config(hf_dir, [f"algo.kl.estimator={estimator}", "algo.kl.coef=0.5"])
    actor = MegatronActor(cfg.actor_config(), groups)
    batch = make_batch()
    actor.old_logprobs(batch)
    actor.ref_logprobs(batch)
    has = ref.tokens.has_target
    torch.testing.assert_close(batch["logp_ref"], batch["logp_old"], atol=0, rtol=0)  # policy = reference
    minis = record_minibatches(actor)
    actor.train(batch, LossPlan())
    want = ref_lib.train_step(ref.model, batch, ref.tokens.logp, None, cfg, ref_logp=ref.tokens.logp)
    assert minis[0]["train/kl_loss"] == 0.0  # before the first update the policy is the reference
    assert abs(want.kl_loss[1]) > 1e-4 and minis[1]["train/kl_loss"] == pytest.approx(want.kl_loss[1], rel=1e-4)
    for k in range(2):
        assert minis[k]["train/grad_norm"] == pytest.approx(want.grad_norms[k], rel=1e-5)
    weights = export_weights(actor)
    for name, w in weights.items():
        torch.testing.assert_close(w, want.state_dict[name], **TOL, msg=name)
    if estimator == "k1":  # k1's gradient is coef·∇log p: the update differs from plain PPO's
        assert max(float((w - ref.train.state_dict[n]).abs().max()) for n, w in weights.items()) > 1e-4
    after = make_batch()
    actor.ref_logprobs(after)  # still the initial policy ...
    torch.testing.assert_close(after["logp_ref"][has], ref.tokens.logp[has], **TOL)
    actor.old_logprobs(after)  # ... and the policy's updated weights came back
    moved = ref_lib.token_stats(want.model, make_batch())
    torch.testing.assert_close(after["logp_old"][has], moved.logp[has], atol=5e-5, rtol=0)


def test_train_step_is_independent_of_the_microbatch_budget(trained):
    small, large = trained[24], trained[4096]
    for name, w in small.weights.items():
        torch.testing.assert_close(w, large.weights[name], **TOL, msg=name)
    for key in ("train/pg_loss", "train/ppo_kl", "train/grad_norm", "train/clip_frac"):
        assert small.mean[key] == pytest.approx(large.mean[key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def fidelity_ref(ref):
    return ref_lib.fidelity_step(ref.model, ref.batch, ref.tokens.logp)


@pytest.mark.parametrize("budget", [24, 4096])
def test_fipo_kept_and_seq_mask_tis_step_equals_reference(groups, hf_dir, ref, fidelity_ref, budget):
    cfg = make_config(hf_dir, FIDELITY + [f"train.max_tokens_per_gpu_train={budget}"])
    got = fidelity_run(MegatronActor(cfg.actor_config(), groups))
    dropped = [m["train/norm_dropped"] for m in got["minis"]]
    batch = make_batch()  # mini-batch 0 = samples 0..5 (34 loss tokens), 1 = samples 6..11
    lens = batch.response_lens.tolist()
    assert dropped[0] == pytest.approx((lens[1] + lens[3]) / sum(lens[:6]), abs=1e-12)  # FIPO s1, seq-mask s3
    assert dropped[1] == pytest.approx(lens[9] / sum(lens[6:]), abs=1e-12)  # seq-mask s9
    for k in range(2):
        assert got["minis"][k]["train/grad_norm"] == pytest.approx(fidelity_ref.grad_norms[k], rel=1e-5)
    for name, w in got["weights"].items():
        torch.testing.assert_close(w, fidelity_ref.state_dict[name], **TOL, msg=name)
    old, rollout = fidelity_fields(batch, ref.tokens.logp)
    want = mismatch_metrics("seq-mask-tis", cfg.algo.mismatch, old, rollout, batch.loss_mask, batch.seq_index,
                            batch.num_seqs)
    assert want["mismatch/masked_frac"] == pytest.approx((lens[3] + lens[9]) / sum(lens), abs=1e-12)
    for key, value in want.items():
        assert got["mean"][f"train/{key}"] == pytest.approx(value, abs=1e-5), key


def test_rollout_correction_without_engine_logprobs_is_a_clear_error(groups, hf_dir):
    actor = MegatronActor(make_config(hf_dir, ["algo.rollout_correction=tis"]).actor_config(), groups)
    batch = make_batch()
    actor.old_logprobs(batch)
    with pytest.raises(ValueError, match=r"algo\.rollout_correction='tis'.*logp_rollout"):
        actor.train(batch, LossPlan())
