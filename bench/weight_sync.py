"""Weight-sync bandwidth: the engine's sync paths against a plain memcpy of the same bytes.

CPU (always): ``EmbeddedEngine.update_weights`` receiving a ~100M-parameter Qwen3-shaped state dict
as a bucketed (name, tensor) stream, vs one ``copy_`` of a flat buffer of the same size. The ratio
says what the per-tensor path (name checks, many small copies) costs over raw memory bandwidth.

GPU (only when CUDA exists): CUDA-IPC buckets (``serialize_named_tensors`` in this process, a
receiver process opening the handles and copying into its own buffers, as an SGLang server does)
and, with two GPUs, an NCCL broadcast between two processes, each vs a device-to-device memcpy.

    python bench/weight_sync.py [--hidden 768 --layers 8 --vocab 32000 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from delta_megatron.rollout.embedded import EmbeddedEngine
from delta_megatron.rollout.weight_sync import (
    deserialize_named_tensors,
    iter_buckets,
    serialize_named_tensors,
)


def build_model(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=4, head_dim=64,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    return model.to_empty(device="cpu").float().eval()


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so load drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (page faults, allocator)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (page faults, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_bench(args) -> None:
    model = build_model(args)
    engine = EmbeddedEngine(model, pad_token_id=0, eos_token_id=1)
    source = {n: torch.randn_like(t) for n, t in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    bucket_bytes = args.bucket_mb * 2**20

    def embedded():
        stream = (nt for bucket in iter_buckets(source.items(), bucket_bytes) for nt in bucket)
        engine.update_weights(stream)

    targets = model.state_dict(keep_vars=True)

    def per_tensor():  # the same copies without the engine (names, checks, stream)
        with torch.no_grad():
            for name, t in source.items():
                targets[name].copy_(t)

    flat_src = torch.randn(nbytes // 4)
    flat_dst = torch.empty_like(flat_src)
    medians = interleaved({"engine": embedded, "tensor": per_tensor,
                           "flat": lambda: flat_dst.copy_(flat_src)}, args.repeats)
    t_engine, t_tensor, t_copy = medians["engine"], medians["tensor"], medians["flat"]
    for name, t in source.items():  # the engine really received the tensors
        assert torch.equal(model.state_dict()[name], t), name
    gb = nbytes / 1e9
    print(f"params: {sum(t.numel() for t in source.values()) / 1e6:.1f}M fp32 = {gb:.2f} GB, "
          f"{len(source)} tensors, buckets of {args.bucket_mb} MB, torch threads "
          f"{torch.get_num_threads()}")
    print(f"cpu embedded update_weights: {gb / t_engine:6.2f} GB/s ({t_engine * 1e3:.0f} ms)")
    print(f"cpu per-tensor copy_:        {gb / t_tensor:6.2f} GB/s ({t_tensor * 1e3:.0f} ms)")
    print(f"cpu plain memcpy (flat):     {gb / t_copy:6.2f} GB/s ({t_copy * 1e3:.0f} ms)")
    print(f"ratio embedded / memcpy:     {t_copy / t_engine:6.2f}  "
          f"(embedded / per-tensor copy_: {t_tensor / t_engine:.2f})")


def _ipc_receiver(conn, shapes):  # a separate process, like an SGLang server
    buffers = {n: torch.empty(s, device="cuda") for n, s in shapes.items()}
    while True:
        data = conn.recv()
        if data is None:
            return
        with torch.no_grad():
            for name, tensor in deserialize_named_tensors(data):
                buffers[name].copy_(tensor)
        torch.cuda.synchronize()
        conn.send(True)


def _nccl_receiver(port, shapes):
    import torch.distributed as dist

    torch.cuda.set_device(1)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=1)
    buffers = [torch.empty(s, device="cuda") for s in shapes]
    for _ in range(2):  # warm-up + measured; the sender repeats the same schedule
        for b in buffers:
            dist.broadcast(b, src=0)
    torch.cuda.synchronize()
    dist.destroy_process_group()


def gpu_bench(args) -> None:
    import torch.multiprocessing as mp

    source = {n: torch.randn_like(t, device="cuda") for n, t in build_model(args).state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    gb = nbytes / 1e9
    flat_src = torch.randn(nbytes // 4, device="cuda")
    flat_dst = torch.empty_like(flat_src)

    def device_copy():
        flat_dst.copy_(flat_src)
        torch.cuda.synchronize()

    t_copy = timed(device_copy, args.repeats)
    print(f"gpu device memcpy:           {gb / t_copy:6.1f} GB/s ({t_copy * 1e3:.1f} ms)")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ipc_receiver, args=(child, {n: t.shape for n, t in source.items()}))
    proc.start()
    bucket_bytes = args.bucket_mb * 2**20

    def ipc():
        for bucket in iter_buckets(source.items(), bucket_bytes):
            parent.send(serialize_named_tensors(bucket))
            parent.recv()

    t_ipc = timed(ipc, args.repeats)
    parent.send(None)
    proc.join()
    print(f"gpu CUDA-IPC buckets:        {gb / t_ipc:6.1f} GB/s ({t_ipc * 1e3:.1f} ms), "
          f"ratio ipc / memcpy {t_copy / t_ipc:.2f}")

    if torch.cuda.device_count() < 2:
        print("gpu NCCL broadcast: skipped (needs 2 GPUs)")
        return
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = ctx.Process(target=_nccl_receiver, args=(port, [t.shape for t in source.values()]))
    proc.start()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0)
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for t in source.values():
            dist.broadcast(t, src=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    proc.join()
    print(f"gpu NCCL broadcast:          {gb / times[-1]:6.1f} GB/s ({times[-1] * 1e3:.1f} ms), "
          f"ratio nccl / memcpy {t_copy / times[-1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)  # 99.5M params with the defaults
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu_bench(args)
    if torch.cuda.is_available():
        gpu_bench(args)
    else:
        print("gpu paths: skipped (no CUDA)")


if __name__ == "__main__":
    main()
