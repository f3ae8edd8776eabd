"""The Megatron actor under TP=2 (± sequence parallel), PP=2 and DP=2 equals the single-process actor.

One torchrun launch per layout runs ``tests/dist/actor_worker.py`` (gloo, CPU); a
``--nproc-per-node 1`` launch of the same worker is the single-process (TP=1) reference, and the
transformers reference of ``hf_reference.py`` is checked too. Per layout, every rank's

* ``logp_old`` / entropy of the tokens it owns (its DP shard; every PP stage holds the last stage's
  values) — 1e-5, and 0 on tokens it does not own;
* DelTA λ̄ in cache / moments / recompute mode — 1e-5, with global token counts and the same number
  of forwards as one process;
* ``score_sequences`` sums; the stats of both PPO mini-batches (``ppo_kl`` of the first one 0,
  grad norm of each);
* HF weights after ``train`` (the union of the PP stages' senders; other DP replicas hold the same)
  — 1e-5; log p with the updated weights — 5e-5 (the weights' round-off, amplified).

A ``--fidelity`` launch at DP = 2 trains FIPO (kept-token normaliser) with seq-mask-tis on a batch where
both filters drop responses in the forward: the weights equal the HF step normalised by each
mini-batch's kept tokens (the DP ranks' dropped fractions are summed before the one rescale).
A ``--selection`` launch trains with DelTA's top-50 % selection as the loss mask (a mask each rank
knows only on the tokens it owns): DP = 2 equals one process, so the normaliser counts every
replica's selected tokens.

Sequence parallelism: megatron-core's local spec has no SP-capable norm without apex (its
``WrappedTorchNorm`` asserts ``not sequence_parallel``), so the SP layout runs with the worker's
``--sp-torch-norm`` (a torch RMSNorm marked ``sequence_parallel``; see the worker's docstring).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.actor import hf_reference as ref_lib
from tests.dist.actor_worker import TOPK, load_hf, make_batch, score_inputs, write_hf_checkpoint
from tests.dist.mg_common import torchrun

pytestmark = pytest.mark.dist

LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["--tp", "2", "--dist-opt"]),
    "tp2_sp": (2, ["--tp", "2", "--sp", "--sp-torch-norm", "--dist-opt"]),
    "pp2": (2, ["--pp", "2"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"]),  # interleaved 1F1B, one layer per model chunk
    "dp2": (2, ["--dist-opt"]),
}
MODES = ("cache", "moments", "recompute")
RUNS = {"cache": 1, "moments": 3, "recompute": 4}
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("actor_dist") / "qwen3_tiny")


@pytest.fixture(scope="module")
def hf_ref(hf_dir):
    ref = ref_lib.reference_run(hf_dir, topk=TOPK)
    return dict(tokens=ref.tokens, lam=ref.lam, lam_topk=ref.lam_topk, train=ref.train,
                after=ref_lib.token_stats(ref.train.model, ref.batch),
                score=ref_lib.score_sums(ref.model, *score_inputs(ref.batch)))


@pytest.fixture(scope="module")
def launch(hf_dir, tmp_path_factory):
    """Runs a layout's worker once (lazily); returns the per-rank result dicts."""
    done: dict[str, list[dict]] = {}

    def get(layout: str) -> list[dict]:
        if layout not in done:
            nproc, extra = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(layout)
            torchrun("actor_worker.py", nproc, ["--hf", str(hf_dir), "--out", str(out), *extra],
                     timeout=300)
            done[layout] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
        return done[layout]

    return get


def merged_weights(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The DP-replica-0 senders' HF tensors (one per PP stage), no name twice."""
    out: dict[str, torch.Tensor] = {}
    for res in ranks:
        if res["dp_rank"] != 0:
            continue
        assert not set(out) & set(res["weights"]), "two senders exported the same tensor"
        out.update(res["weights"])
    return out


def check_layout(ranks: list[dict], single: list[dict], hf_ref: dict) -> None:
    tokens, has = hf_ref["tokens"], hf_ref["tokens"].has_target
    one = single[0]
    covered = torch.zeros_like(has)
    for res in ranks:
        own, other = res["owned"], ~res["owned"]
        covered |= own
        sel = own & has
        for field, want in (("logp_old", tokens.logp), ("entropy", tokens.entropy)):
            torch.testing.assert_close(res[field][sel], want[sel], **TOL)
            torch.testing.assert_close(res[field][sel], one[field][sel], **TOL)
            assert (res[field][other] == 0).all(), field
        for mode in MODES:
            got = res["modes"][mode]
            torch.testing.assert_close(got["credit"][own], hf_ref["lam"][own], **TOL, msg=mode)
            torch.testing.assert_close(got["credit"][own], one["modes"][mode]["credit"][own], **TOL)
            assert (got["credit"][other] == 0).all()
            assert got["runs"] == RUNS[mode], (mode, got["runs"])
            m, m1 = got["metrics"], one["modes"][mode]["metrics"]
            for key in ("n_pos", "n_neg", "n_zero", "extra_forwards"):
                assert m[f"credit/delta/{key}"] == m1[f"credit/delta/{key}"], (mode, key)
            assert m["credit/delta/lambda_bar_std"] == pytest.approx(
                m1["credit/delta/lambda_bar_std"], abs=1e-5)
        topk, topk1 = res["topk"]["credit"], one["topk"]["credit"]  # the §9.5 top-K proxy, cache mode
        torch.testing.assert_close(topk[own], hf_ref["lam_topk"][own], **TOL)
        torch.testing.assert_close(topk[own], topk1[own], **TOL)
        assert (topk[other] == 0).all()
        assert res["topk"]["metrics"]["credit/delta/lambda_bar_std"] == pytest.approx(
            one["topk"]["metrics"]["credit/delta/lambda_bar_std"], abs=1e-5)
        torch.testing.assert_close(res["score"], hf_ref["score"], atol=1e-4, rtol=0)
        minis, want = res["train_minibatches"], hf_ref["train"]
        assert len(minis) == 2
        assert abs(minis[0]["train/ppo_kl"]) < 1e-7
        assert minis[1]["train/ppo_kl"] == pytest.approx(one["train_minibatches"][1]["train/ppo_kl"],
                                                         abs=1e-6)
        for k in range(2):
            assert minis[k]["train/grad_norm"] == pytest.approx(want.grad_norms[k], rel=1e-5)
            assert minis[k]["train/grad_norm"] == pytest.approx(
                one["train_minibatches"][k]["train/grad_norm"], rel=1e-5)
        torch.testing.assert_close(res["logp_after"][sel], hf_ref["after"].logp[sel], atol=5e-5, rtol=0)
        torch.testing.assert_close(res["logp_after"][sel], one["logp_after"][sel], atol=5e-5, rtol=0)
    assert covered.all()  # the DP shards cover the batch

    weights, ref_weights = merged_weights(ranks), merged_weights(single)
    assert set(weights) == set(ref_weights) == set(hf_ref["train"].state_dict) - {"lm_head.weight"}
    for name, w in weights.items():
        torch.testing.assert_close(w, hf_ref["train"].state_dict[name], **TOL, msg=name)
        torch.testing.assert_close(w, ref_weights[name], **TOL, msg=name)
    for res in ranks:  # other DP replicas stepped to the same weights
        if res["dp_rank"] != 0:
            assert set(res["weights"]) == set(weights)
            for name, w in res["weights"].items():
                torch.testing.assert_close(w, weights[name], atol=0, rtol=0, msg=name)


def test_single_process_worker_equals_hf_reference(launch, hf_ref):
    """The reference launch itself against transformers (the layouts are compared with both)."""
    single = launch("single")
    check_layout(single, single, hf_ref)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2"])
def test_layout_equals_single_process(launch, hf_ref, layout):
    ranks = launch(layout)
    if layout == "pp2":
        assert [r["is_last"] for r in ranks] == [False, True]
    if layout == "dp2":
        assert not (ranks[0]["owned"] & ranks[1]["owned"]).any()  # disjoint shards
    check_layout(ranks, launch("single"), hf_ref)


@pytest.mark.slow
def test_fipo_kept_and_seq_mask_tis_dp2_equal_reference(hf_dir, tmp_path):
    out = tmp_path / "fidelity_dp2"
    out.mkdir()
    torchrun("actor_worker.py", 2, ["--hf", str(hf_dir), "--out", str(out), "--dist-opt", "--fidelity"], timeout=300)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = load_hf(hf_dir)
    batch = make_batch()
    want = ref_lib.fidelity_step(model, batch, ref_lib.token_stats(model, batch).logp)
    for res in ranks:
        assert [m["train/norm_dropped"] > 0 for m in res["minis"]] == [True, True]
        for k in range(2):
            assert res["minis"][k]["train/grad_norm"] == pytest.approx(want.grad_norms[k], rel=1e-5)
        assert res["mean"]["train/mismatch/masked_frac"] > 0
    assert ranks[0]["minis"] == ranks[1]["minis"]  # reduced over DP
    for res in ranks:  # both replicas stepped to the reference weights
        assert set(res["weights"]) == set(want.state_dict) - {"lm_head.weight"}
        for name, w in res["weights"].items():
            torch.testing.assert_close(w, want.state_dict[name], **TOL, msg=name)


@pytest.mark.slow
def test_delta_selection_mask_normaliser_dp2_equals_one_process(hf_dir, tmp_path):
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("dp2", 2, ["--dist-opt"])):
        out = tmp_path / name
        out.mkdir()
        torchrun("actor_worker.py", nproc, ["--hf", str(hf_dir), "--out", str(out), "--selection", *extra],
                 timeout=300)
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
    (single,), dp2 = runs["single"], runs["dp2"]
    assert 0 < dp2[0]["selected"] and 0 < dp2[1]["selected"]  # each replica owns some selected tokens
    assert dp2[0]["selected"] + dp2[1]["selected"] == single["selected"]
    for res in dp2:
        for got, want in zip(res["minis"], single["minis"]):
            for key in ("train/pg_loss", "train/grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        for name, w in res["weights"].items():
            torch.testing.assert_close(w, single["weights"][name], **TOL, msg=name)
