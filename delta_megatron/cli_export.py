"""HF export: safetensors (+ index when sharded), config.json, generation_config.json, tokenizer.

Writes through the same converter as weight sync (models/converter.py), so an exported checkpoint
is exactly what a rollout engine receives. Atomic: everything goes to a temp dir next to
``out_dir``, is fsync'ed, then renamed into place; on any failure the temp dir is removed and an
existing ``out_dir`` is left untouched. Collective when torch.distributed is initialised: every rank
calls it; the TP-rank-0 rank of each pipeline stage (first DP replica) writes that stage's shards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from delta_megatron.checkpoint.manager import fsync_tree as _fsync_tree
from delta_megatron.config import Config, ModelConfig
from delta_megatron.models.converter import megatron_to_hf
from delta_megatron.models.hf_config import to_hf_config
from delta_megatron.utils.commands import command_parser

__all__ = ["export_hf", "hf_model_dir", "load_model_from_checkpoint", "main"]

_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def load_model_from_checkpoint(ckpt_dir: str | Path, cfg: Config):
    """This rank's model chunks with the weights of a trainer checkpoint (``step_N/actor`` holds a
    megatron dist-ckpt). dist-ckpt reshards on load, so any TP/PP layout can read any other's; only the
    model entries are read (the optimizer state is left on disk). ``parallel_state`` must be set up."""
    from megatron.core import dist_checkpointing

    from delta_megatron.models.gpt import build_model_chunks

    path = Path(ckpt_dir)
    if (path / "actor").is_dir():
        path = path / "actor"
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt_dir!s} is not a trainer checkpoint (no actor/metadata.json)")
    chunks = build_model_chunks(cfg.model, cfg.parallel, load_hf=False)
    state = dist_checkpointing.load({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)},
                                    str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"])
    return chunks


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint step dir, run dir) from a step dir, a ``checkpoints/`` root or a run dir."""
    from delta_megatron.checkpoint import CheckpointManager

    p = Path(path)
    for root in (p, p / "checkpoints"):
        latest = CheckpointManager(root).latest() if root.is_dir() else None
        if latest is not None and not (p / "actor").is_dir():
            p = latest
            break
    if not (p / "actor").is_dir():
        raise FileNotFoundError(f"{path!s}: no checkpoint found (expected step_N/actor, a checkpoints/ "
                                "directory or a run directory)")
    return p, p.parent.parent


def _coords() -> tuple[bool, bool, int]:
    """(is global rank 0, in the first DP(xCP) replica, pipeline rank) of this process."""
    if not dist.is_initialized():
        return True, True, 0
    from megatron.core import parallel_state as ps

    return (dist.get_rank() == 0, ps.get_data_parallel_rank(with_context_parallel=True) == 0,
            ps.get_pipeline_model_parallel_rank())


def _all_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _write_stage_shards(models, cfg: ModelConfig, tmp: Path, pp_rank: int,
                        max_shard_bytes: int, dtype) -> None:
    """Each PP stage's TP rank 0 writes its buckets as ``part-<stage>-<k>`` files (the whole TP
    group iterates: the gather is collective)."""
    from safetensors.torch import save_file

    for k, bucket in enumerate(megatron_to_hf(models, cfg, bucket_bytes=max_shard_bytes,
                                              dtype=dtype)):
        if not bucket:  # TP ranks other than 0 take part in the gathers and get empty buckets
            continue
        save_file(dict(bucket), str(tmp / f"part-{pp_rank:03d}-{k:05d}.safetensors"),
                  metadata={"format": "pt"})


def _finalize(tmp: Path, cfg: ModelConfig, tokenizer_dir, dtype) -> None:
    """Rank 0: name the shards, write the index, config, generation config, tokenizer files."""
    import json

    from safetensors import safe_open
    from transformers import GenerationConfig

    parts = sorted(tmp.glob("part-*.safetensors"))
    if not parts:
        raise RuntimeError("export_hf: no weights were written")
    if len(parts) == 1:
        parts[0].rename(tmp / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, part in enumerate(parts):
            final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            with safe_open(str(part), framework="pt") as fh:
                for name in fh.keys():
                    weight_map[name] = final
                    t = fh.get_slice(name)
                    total += _nbytes(t.get_shape(), t.get_dtype())
            part.rename(tmp / final)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_cfg = to_hf_config(cfg)
    if dtype is not None:
        hf_cfg.dtype = str(dtype).replace("torch.", "")
    hf_cfg.save_pretrained(str(tmp))
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None:
        if not tok.is_dir():
            raise FileNotFoundError(f"export_hf: tokenizer_dir {tok} is not a directory")
        for f in sorted(tok.iterdir()):
            if f.is_file() and f.name not in _SKIP and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
    if not (tmp / "generation_config.json").exists():
        GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(tmp))


def _nbytes(shape, dtype: str) -> int:
    size = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}[dtype]
    n = 1
    for s in shape:
        n *= s
    return n * size


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-export"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists():
            os.rename(old, out)  # put the previous export back
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.exists():
        shutil.rmtree(old)


def export_hf(model_or_ckpt, cfg: Config | ModelConfig, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, *, max_shard_bytes: int = 4 << 30,
              dtype: torch.dtype | None = None) -> Path:
    """Export a megatron model (chunk or list of chunks on this rank) or checkpoint dir to HF.

    ``dtype`` casts the weights (default: as trained). Returns the final directory.
    """
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    models = model_or_ckpt
    if isinstance(model_or_ckpt, (str, Path)):
        if not isinstance(cfg, Config):
            raise TypeError("export_hf from a checkpoint needs the full Config (parallel layout)")
        models = load_model_from_checkpoint(model_or_ckpt, cfg)
    out = Path(out_dir).resolve()
    tmp = out.parent / f".{out.name}.tmp-export"
    is_rank0, first_replica, pp_rank = _coords()
    error: BaseException | None = None
    if is_rank0:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except Exception as exc:  # noqa: BLE001 (reported collectively below)
            error = exc
    if _all_ok(error is None) and first_replica:
        try:
            _write_stage_shards(models, model_cfg, tmp, pp_rank, max_shard_bytes, dtype)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if _all_ok(error is None) and is_rank0:
        try:
            _finalize(tmp, model_cfg, tokenizer_dir, dtype)
            _fsync_tree(tmp)
            _swap_into_place(tmp, out)
        except Exception as exc:  # noqa: BLE001
            error = exc
    failed = not _all_ok(error is None)
    if failed and is_rank0 and tmp.exists():
        shutil.rmtree(tmp)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("export_hf failed on another rank")
    return out


def hf_model_dir(path: str | Path, work_dir: str | Path, flag: str = "--model") -> Path:
    """An HF model directory for a command-line model argument: ``path`` itself when it holds a
    ``config.json``, else the latest checkpoint of a run, ``checkpoints/`` or step directory, exported
    (as trained, one process) to ``work_dir``. ``flag`` names the argument in errors."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such directory (expected an HF model directory or a run / "
                                "checkpoint directory)")
    try:
        step_dir, _ = resolve_checkpoint(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: neither an HF model directory (no config.json) nor a run / "
                                "checkpoints / step_N directory with a checkpoint (step_N/actor)") from None
    out = Path(work_dir)
    main([str(step_dir), str(out)])
    return out


def main(argv: list[str] | None = None) -> int:
    """``delta-megatron export CKPT OUT_DIR [--config run.yaml] [--tokenizer DIR] [--dtype bfloat16]``.

    CKPT: a checkpoint step dir, a ``checkpoints/`` dir or a run dir (latest checkpoint). The run's
    ``config.yaml`` and ``tokenizer/`` are found next to its checkpoints. Runs in one process (or under
    torchrun with overrides such as ``parallel.tp=2`` for models that do not fit one device)."""
    from delta_megatron.config import load_config
    from delta_megatron.parallel import destroy, init_distributed

    parser = command_parser(
        "delta-megatron export",
        "Convert a trainer checkpoint (megatron dist-ckpt) to an HF model directory through the same\n"
        "converter the weight sync uses; written atomically (temp dir, fsync, rename).",
        """\
        CKPT: a checkpoint step dir, a checkpoints/ dir or a run dir (its newest checkpoint); the run's
        config.yaml and tokenizer/ next to it (or --config / --tokenizer); overrides such as
        parallel.tp=2 under torchrun for models that do not fit one device""",
        """\
        OUT: model(-0000N-of-0000M).safetensors (+ index when sharded), config.json,
        generation_config.json and the tokenizer files""",
        ["delta-megatron export runs/demo/delta runs/demo/delta/hf --dtype bfloat16"])
    parser.add_argument("ckpt", help="checkpoint step dir, checkpoints/ dir or run dir")
    parser.add_argument("out", help="HF output directory (written atomically)")
    parser.add_argument("--config", default=None, help="the run's YAML (default: <run>/config.yaml)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: <run>/tokenizer, "
                        "data.tokenizer or model.hf_path)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (a.b=c)")
    args = parser.parse_intermixed_args(argv)
    step_dir, run_dir = resolve_checkpoint(args.ckpt)
    config_path = Path(args.config) if args.config else run_dir / "config.yaml"
    if not config_path.exists():
        parser.error(f"no config at {config_path}; pass --config")
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.vpp=null",
              "parallel.sequence_parallel=false", "model.hf_path=null"]
    cfg = load_config(config_path, layout + list(args.overrides))
    tokenizer = args.tokenizer or next((str(p) for p in (run_dir / "tokenizer",) if p.is_dir()),
                                       cfg.data.tokenizer)
    init_distributed(cfg.parallel, seed=0)
    try:
        export_hf(step_dir, cfg, args.out, tokenizer, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                  dtype=getattr(torch, args.dtype) if args.dtype else None)
    finally:
        destroy()
    return 0
