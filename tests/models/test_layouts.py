"""Layout invariance of the megatron actor's per-token quantities and weight round trips.

One torchrun launch per layout (TP=1, TP=2, PP=2) runs tests/dist/mg_model_layouts.py on tiny HF
models (Qwen3 tied, Llama untied, Qwen2 untied with q/k/v biases); here the saved results are
compared with the unsharded transformers reference:
* log p of the sampled tokens, entropy and top-K (packed and each sequence alone) — 1e-5 fp32;
* gradients of Σ c·logp + e·H w.r.t. every weight (chunked differentiable log-prob through
  megatron's backward, converted back to HF layout) — 1e-5;
* HF -> Megatron -> HF export bit-exact; transformers loads the export and its logits equal
  megatron's — 1e-5. (Vocab-parallel op checks on the TP group and export atomicity are asserted
  inside the worker.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist.mg_common import (
    TINY,
    coeffs,
    hf_logits,
    make_hf_dir,
    make_tokenizer_dir,
    sample_sequences,
    torchrun,
)

pytestmark = pytest.mark.dist

LAYOUTS = {
    "tp1": (1, ["--atomic", "--tokenizer", "{tokenizer}"], list(TINY)),
    "tp2": (2, ["--tp", "2", "--ops"], list(TINY)),
    "pp2": (2, ["--pp", "2", "--shard-bytes", "20000"], ["qwen3_tied", "llama_untied"]),
}
# one launch per layout (~10-20 s on 2 cores); TP=1 runs by default, TP=2 / PP=2 are `slow`
CASES = [pytest.param(lay, m, marks=[pytest.mark.slow] if lay != "tp1" else [])
         for lay, (_, _, models) in LAYOUTS.items() for m in models]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    for name in TINY:
        make_hf_dir(name, root)
    make_tokenizer_dir(root)
    return root


@pytest.fixture(scope="module")
def layout_out(hf_root, tmp_path_factory):
    """Runs each layout's worker once (lazily) and returns its output directory."""
    done: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in done:
            nproc, extra, models = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(layout)
            extra = [e.format(tokenizer=hf_root / "tokenizer") for e in extra]
            torchrun("mg_model_layouts.py", nproc,
                     ["--root", str(hf_root), "--out", str(out), "--models", *models, *extra])
            done[layout] = out
        return done[layout]

    return get


@pytest.fixture(scope="module")
def reference(hf_root):
    """Unsharded transformers logits of every sequence, per model."""
    seqs = sample_sequences()
    return seqs, {name: hf_logits(hf_root / name, seqs) for name in TINY}


def _ref_token_stats(logits: torch.Tensor, seq: torch.Tensor):
    lsm = torch.log_softmax(logits, dim=-1)  # [n, V]
    logp = lsm[:-1].gather(1, seq[1:, None])[:, 0]
    return logp, -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("layout,model", CASES)
def test_logprobs_equal_unsharded_reference(layout_out, reference, layout, model):
    res = torch.load(layout_out(layout) / f"{model}_fwd.pt")
    seqs, ref = reference
    for i, (seq, logits) in enumerate(zip(seqs, ref[model])):
        logp, ent = _ref_token_stats(logits, seq)
        n = len(seq)
        torch.testing.assert_close(res["logp"][i][: n - 1], logp, **TOL)
        assert torch.all(res["logp"][i][n - 1] == 0)  # no target after the last token
        torch.testing.assert_close(res["logp_alone"][i][: n - 1], logp, **TOL)
        torch.testing.assert_close(res["entropy"][i], ent, **TOL)
        top_vals, top_ids = torch.topk(logits, 3, dim=-1)
        assert torch.equal(res["topk_ids"][i], top_ids)
        torch.testing.assert_close(res["topk"][i], top_vals, **TOL)
        torch.testing.assert_close(res["logits"][i], logits, **TOL)


def _hf_grads(model_dir: Path, seqs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    loss = 0.0
    for i, seq in enumerate(seqs):
        logp, ent = _ref_token_stats(model(seq[None]).logits[0], seq)
        c, e = coeffs(i, len(seq))
        loss = loss + (c[:-1] * logp).sum() + (e * ent).sum()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout,model", CASES)
def test_gradients_equal_unsharded_reference(layout_out, hf_root, layout, model):
    out = layout_out(layout)
    grads: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob(f"{model}_grads_pp*.pt")):
        for name, g in torch.load(f).items():
            if name.startswith("tied-copy:"):  # last-stage copy of the tied embedding (PP > 1)
                name = name.split(":", 1)[1]
                g = g + grads.get(name, 0)
            elif name in grads:
                g = g + grads[name]
            grads[name] = g
    ref = _hf_grads(hf_root / model, sample_sequences())
    if TINY[model]["tie_word_embeddings"]:
        ref.pop("lm_head.weight", None)  # the same tensor as embed_tokens
    assert set(grads) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("layout,model", CASES)
def test_export_roundtrip_bit_exact(layout_out, hf_root, layout, model):
    exported = _safetensors_dir(layout_out(layout) / f"{model}_export")
    original = _safetensors_dir(hf_root / model)
    assert set(exported) == set(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    if layout == "pp2":
        assert (layout_out(layout) / f"{model}_export" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("layout,model", CASES)
def test_hf_model_from_export_matches_megatron_logits(layout_out, reference, layout, model):
    seqs, _ = reference
    res = torch.load(layout_out(layout) / f"{model}_fwd.pt")
    for mine, hf in zip(res["logits"], hf_logits(layout_out(layout) / f"{model}_export", seqs)):
        torch.testing.assert_close(hf, mine, **TOL)


@pytest.mark.parametrize("model", list(TINY))
def test_export_carries_tokenizer_and_generation_config(layout_out, hf_root, model):
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    export = layout_out("tp1") / f"{model}_export"
    for f in (hf_root / "tokenizer").iterdir():
        assert (export / f.name).read_bytes() == f.read_bytes(), f.name
    # (AutoTokenizer would pick the family's own tokenizer class for this toy word-level one)
    tok = PreTrainedTokenizerFast.from_pretrained(str(export))
    assert tok("w3 w7 w1")["input_ids"] == [3, 7, 1] and tok.eos_token == "<eos>"
    assert GenerationConfig.from_pretrained(str(export)) is not None
    assert AutoConfig.from_pretrained(str(export)).to_dict()["tie_word_embeddings"] == \
        TINY[model]["tie_word_embeddings"]
