"""torchrun worker: tiny HF models loaded into megatron under one TP/PP layout.

Per model dir given (HF checkpoints written by the parent) it
* loads HF -> megatron (converter, from the safetensors dir),
* runs the packed sequences through megatron's pipeline schedule (forward only) and computes
  log p / entropy / top-K from ``h`` chunk-wise (ops.logprob), and the same from the full logits
  shard — asserting here that both agree — plus each sequence alone (unpacked) in a second pass,
* runs a train-style pass (schedule with backward) of L = Σ c·logp + e·H and converts the
  parameter gradients to HF names (converter layouts),
* exports to HF (cli_export, collective).
Results land in ``--out`` (written by TP rank 0 of the last stage / every stage for grads); the
parent compares them with the unsharded transformers reference. ``--ops`` adds vocab-parallel
op checks on the TP group; ``--atomic`` adds export-failure checks.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from mg_common import coeffs, sample_sequences  # tests/dist is the script dir


def run_schedule(chunks, batches, cfg, groups, train: bool):
    """One micro-batch per PackedSeqs; returns the loss_func dicts on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from delta_megatron.models.gpt import output_weight, return_hidden
    from delta_megatron.ops.logprob import chunked_logprob_from_hidden, vocab_parallel_logprobs

    it = iter(batches)

    def step(data_iterator, model):
        pk = next(data_iterator)
        with return_hidden(model):
            h = model(**pk.forward_kwargs())  # [1, S(/TP), d] on the last stage
        logits = None
        if not train and output_weight_available(model):
            logits = model(**pk.forward_kwargs())  # [1, S, V/TP]

        def loss_func(out):
            targets = pk.next_token_targets()  # [1, S]
            res = chunked_logprob_from_hidden(
                out.transpose(0, 1), output_weight(model), targets.t(), groups.tp, chunk=5,
                vocab_size=cfg.vocab_size, top_k=3)  # [S, 1]
            logp, ent = res.logp.t()[0], res.entropy.t()[0]  # [S]
            record = {"logp": logp.detach(), "entropy": ent.detach(),
                      "topk_ids": res.topk_ids[:, 0].detach(), "topk": res.topk_logits[:, 0].detach()}
            if logits is not None:
                ref = vocab_parallel_logprobs(logits[0], targets[0], groups.tp, chunk_tokens=4,
                                              vocab_size=cfg.vocab_size)
                assert torch.allclose(ref.logp, logp, atol=1e-5), (ref.logp - logp).abs().max()
                assert torch.allclose(ref.entropy, ent, atol=1e-5)
                full = [torch.empty_like(logits[0]) for _ in range(groups.tp_size)]
                dist.all_gather(full, logits[0].contiguous(), group=groups.tp)
                record["logits"] = torch.cat(full, dim=-1)[:, : cfg.vocab_size]
            loss = out.sum() * 0
            if train:
                for i, (lp, en) in enumerate(zip(pk.unpack(logp), pk.unpack(ent))):
                    c, e = coeffs(pk_index[id(pk)] + i, len(lp))
                    loss = loss + (c[:-1] * lp[:-1]).sum() + (e * en).sum()
            return loss, record

        return h, loss_func

    pk_index = {}
    seen = 0
    for pk in batches:
        pk_index[id(pk)] = seen
        seen += len(pk.seq_lens)
    seq_len = max(pk.total_len for pk in batches)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=it, model=chunks, num_microbatches=len(batches),
        seq_length=seq_len, micro_batch_size=1, forward_only=not train)


def output_weight_available(model) -> bool:
    from delta_megatron.models.gpt import unwrap

    return unwrap(model).post_process


def grads_to_hf(chunks, cfg, groups) -> dict[str, torch.Tensor]:
    """Parameter gradients in HF names/layouts (the converter's merge), on TP rank 0."""
    from delta_megatron.models.converter import hf_param_names, merge_shards

    out = {}
    for chunk in chunks:
        for name, param, kind, hf_names, exported in hf_param_names(chunk, cfg):
            g = param.grad.detach().clone()
            if "q_layernorm" in name or "k_layernorm" in name:
                # per-head norms see only local heads: megatron's finalize_model_grads sums over TP
                dist.all_reduce(g, group=groups.tp)
            shards = [torch.empty_like(g) for _ in range(groups.tp_size)]
            dist.all_gather(shards, g.contiguous(), group=groups.tp)
            names = hf_names if exported else ("tied-copy:model.embed_tokens.weight",)
            for n, t in zip(names, merge_shards(kind, shards, cfg)):
                out[n] = t
    return out


def model_checks(model_dir: Path, seqs, args, groups, out: Path) -> None:
    from delta_megatron.cli_export import export_hf
    from delta_megatron.config import ParallelConfig
    from delta_megatron.models.gpt import build_model_chunks
    from delta_megatron.models.hf_config import load_model_config
    from delta_megatron.ops.packing import pack_sequences, packing_alignment

    cfg = load_model_config(model_dir)
    par = ParallelConfig(tp=args.tp, pp=args.pp)
    chunks = build_model_chunks(cfg, par)  # loads cfg.hf_path = model_dir via the converter
    align = packing_alignment(args.tp, 1, False)
    name = model_dir.name
    last_writer = groups.is_last_stage and groups.tp_rank == 0

    for c in chunks:
        c.eval()
    with torch.no_grad():
        packed = [pack_sequences(seqs[:2], align=align), pack_sequences(seqs[2:], align=align)]
        alone = [pack_sequences([s], align=align) for s in seqs]
        rec_packed = run_schedule(chunks, packed, cfg, groups, train=False)
        rec_alone = run_schedule(chunks, alone, cfg, groups, train=False)
    if last_writer:
        res = {k: [] for k in ("logp", "entropy", "topk", "topk_ids", "logits")}
        for pk, rec in zip(packed, rec_packed):
            for k in res:
                if k in rec:
                    res[k] += pk.unpack(rec[k])
        res["logp_alone"] = [pk.unpack(r["logp"])[0] for pk, r in zip(alone, rec_alone)]
        torch.save(res, out / f"{name}_fwd.pt")

    for c in chunks:
        c.train()
        c.zero_grad(set_to_none=False)
    run_schedule(chunks, [pack_sequences(seqs, align=align)], cfg, groups, train=True)
    grads = grads_to_hf(chunks, cfg, groups)
    if groups.tp_rank == 0:
        torch.save(grads, out / f"{name}_grads_pp{groups.pp_rank}.pt")

    export_hf(chunks, cfg, out / f"{name}_export", tokenizer_dir=args.tokenizer,
              max_shard_bytes=args.shard_bytes)
    if args.atomic:
        atomic_checks(chunks, cfg, out / f"{name}_export", groups)


def atomic_checks(chunks, cfg, good: Path, groups) -> None:
    """A failing export leaves neither a partial directory nor a damaged previous export."""
    from delta_megatron.cli_export import export_hf

    before = sorted(p.name for p in good.iterdir())
    target = good.parent / f"{good.name}_failed"
    for dest in (target, good):  # new directory / overwrite of an existing export
        with contextlib.suppress(FileNotFoundError):
            export_hf(chunks, cfg, dest, tokenizer_dir=good.parent / "no_such_tokenizer")
            raise AssertionError("export with a missing tokenizer dir did not fail")
    assert not target.exists(), "partial export directory left behind"
    assert sorted(p.name for p in good.iterdir()) == before, "previous export was modified"
    leftovers = [p.name for p in good.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def ops_checks(groups) -> None:
    """Vocab-parallel ops on the real TP group == unsharded torch reference (values and grads)."""
    from delta_megatron.ops.logprob import chunked_logprob_from_hidden, vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(5)
    T, d, vocab, padded = 23, 6, 61, 64  # padded vocab: the last shard has 3 padding columns
    h = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w = torch.randn(padded, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, vocab, (T,), generator=gen)
    y[4] = -1
    g_lp, g_en = torch.randn(T, generator=gen, dtype=torch.float64), torch.randn(T, generator=gen,
                                                                                  dtype=torch.float64)
    temp = 0.8
    href, wref = h.clone().requires_grad_(), w.clone().requires_grad_()
    lsm = torch.log_softmax(href @ wref[:vocab].t() / temp, dim=-1)
    ref_lp = torch.where(y >= 0, lsm.gather(1, y.clamp(min=0)[:, None])[:, 0], torch.zeros(T,
                         dtype=torch.float64))
    ref_en = -(lsm.exp() * lsm).sum(-1)
    (ref_lp * g_lp + ref_en * g_en).sum().backward()
    rows = padded // groups.tp_size
    sl = slice(groups.tp_rank * rows, (groups.tp_rank + 1) * rows)

    hh, ww = h.clone().requires_grad_(), w[sl].clone().requires_grad_()
    res = chunked_logprob_from_hidden(hh, ww, y, groups.tp, 4, temperature=temp, top_k=5,
                                      vocab_size=vocab)
    (res.logp * g_lp + res.entropy * g_en).sum().backward()
    tol = dict(atol=1e-10, rtol=0)
    assert torch.allclose(res.logp, ref_lp.detach(), **tol)
    assert torch.allclose(res.entropy, ref_en.detach(), **tol)
    assert torch.allclose(hh.grad, href.grad, **tol), (hh.grad - href.grad).abs().max()
    assert torch.allclose(ww.grad, wref.grad[sl], **tol)
    tv, ti = torch.topk(lsm.detach() + res.lse[:, None], 5)  # z = log p + lse
    assert torch.equal(res.topk_ids, ti) and torch.allclose(res.topk_logits, tv, **tol)

    logits = (h @ w.t()).detach()[:, sl].clone().requires_grad_()
    res2 = vocab_parallel_logprobs(logits, y, groups.tp, temperature=temp, chunk_tokens=7,
                                   vocab_size=vocab)
    (res2.logp * g_lp + res2.entropy * g_en).sum().backward()
    full_logits = (h @ w.t()).detach().requires_grad_()
    lsm2 = torch.log_softmax(full_logits[:, :vocab] / temp, dim=-1)
    ref2 = torch.where(y >= 0, lsm2.gather(1, y.clamp(min=0)[:, None])[:, 0], torch.zeros(T,
                       dtype=torch.float64))
    ((ref2 * g_lp) - (lsm2.exp() * lsm2).sum(-1) * g_en).sum().backward()
    assert torch.allclose(res2.logp, ref_lp.detach(), **tol)
    assert torch.allclose(logits.grad, full_logits.grad[:, sl], **tol)

    # sequence parallel: h is this rank's token shard; the gather's backward reduce-scatters
    tokens = T - T % groups.tp_size
    per = tokens // groups.tp_size
    hs = h[groups.tp_rank * per:(groups.tp_rank + 1) * per].clone().requires_grad_()
    res3 = chunked_logprob_from_hidden(hs, w[sl], y[:tokens], groups.tp, 4, temperature=temp,
                                       vocab_size=vocab, sequence_parallel=True)
    (res3.logp * g_lp[:tokens] + res3.entropy * g_en[:tokens]).sum().backward()
    href2 = h[:tokens].clone().requires_grad_()
    lsm3 = torch.log_softmax(href2 @ w[:vocab].t() / temp, dim=-1)
    r3 = torch.where(y[:tokens] >= 0, lsm3.gather(1, y[:tokens].clamp(min=0)[:, None])[:, 0],
                     torch.zeros(tokens, dtype=torch.float64))
    (r3 * g_lp[:tokens] - (lsm3.exp() * lsm3).sum(-1) * g_en[:tokens]).sum().backward()
    assert torch.allclose(res3.logp, r3.detach(), **tol)
    assert torch.allclose(hs.grad, href2.grad[groups.tp_rank * per:(groups.tp_rank + 1) * per], **tol)


def main() -> None:
    from delta_megatron import parallel
    from delta_megatron.config import ParallelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="*", default=[])
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--atomic", action="store_true")
    ap.add_argument("--shard-bytes", type=int, default=1 << 30)
    ap.add_argument("--tokenizer", type=Path, default=None, help="copied into the exports")
    args = ap.parse_args()
    groups = parallel.init_distributed(ParallelConfig(tp=args.tp, pp=args.pp), seed=7)
    args.out.mkdir(parents=True, exist_ok=True)
    seqs = sample_sequences()
    if args.ops:
        ops_checks(groups)
    for name in args.models:
        model_checks(args.root / name, seqs, args, groups, args.out)
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
