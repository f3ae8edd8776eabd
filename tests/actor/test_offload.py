"""Actor offload for colocation (actor/offload.py), on CPU: the parameters and the optimizer state
round-trip bit-exactly, the freed parts really leave the device (measured from the tensors), and
training after a round trip is bit-identical to training without one — for the plain optimizer
(fp32 model: Adam state only), the distributed optimizer (fp32 shards that are views of the
weights) and bf16 weights (fp32 main params the optimizer owns)."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.actor.megatron_actor import MegatronActor
from delta_megatron.credit_contract import LossPlan
from delta_megatron.parallel import destroy, init_distributed
from tests.dist.actor_worker import make_batch, make_config, write_hf_checkpoint

LAYOUTS = {
    "plain_fp32": ["parallel.distributed_optimizer=false"],
    "distributed_fp32": ["parallel.distributed_optimizer=true"],
    "distributed_bf16": ["parallel.distributed_optimizer=true", "model.params_dtype=bfloat16"],
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("offload") / "qwen3_tiny")


@pytest.fixture(scope="module")
def groups(hf_dir):
    g = init_distributed(make_config(hf_dir).parallel, seed=3)
    yield g
    destroy()


def state(actor) -> dict[str, torch.Tensor]:
    """Every parameter and every optimizer tensor (main params and Adam moments), cloned."""
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(actor._params())}
    for j, (_, key, t) in enumerate(actor._offload._optimizer_tensors()):
        out[f"opt{j}:{key}"] = t.detach().clone()
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def train_step(actor) -> dict[str, float]:
    batch = make_batch()
    actor.old_logprobs(batch)
    return actor.train(batch, LossPlan())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_is_bit_exact_and_frees_the_device(groups, hf_dir, layout):
    cfg = make_config(hf_dir, LAYOUTS[layout])
    actor, twin = (MegatronActor(cfg.actor_config(), groups) for _ in range(2))
    for a in (actor, twin):
        train_step(a)  # Adam state exists only after a step
    before = state(actor)
    resident = actor.resident_bytes()
    assert all(resident[k] > 0 for k in ("weights", "grads", "optimizer")), resident
    params = sum(p.numel() for p in actor._params())
    low = sum(p.numel() for p in actor._params() if p.dtype == torch.bfloat16)  # have fp32 main copies
    assert resident["optimizer"] == 8 * params + 4 * low  # fp32 exp_avg + exp_avg_sq (+ main params)
    assert (low > 0) == (layout == "distributed_bf16")

    actor.offload(["optimizer", "grads"])
    assert actor.resident_bytes() == {"weights": resident["weights"], "grads": 0, "optimizer": 0}
    with pytest.raises(RuntimeError, match="optimizer offloaded"):
        actor.train(make_batch(), LossPlan())
    actor.offload(["weights"])
    assert actor.resident_bytes() == {"weights": 0, "grads": 0, "optimizer": 0}
    assert all(p.untyped_storage().nbytes() == 0 for p in actor._params())  # really freed
    with pytest.raises(RuntimeError, match="weights offloaded"):
        actor.old_logprobs(make_batch())

    actor.onload()
    assert actor.resident_bytes() == resident
    assert_identical(state(actor), before)

    for a in (actor, twin):  # a second step: identical with and without the round trip
        train_step(a)
    assert_identical(state(actor), state(twin))
    actor.offload(["optimizer", "grads", "weights"])  # the same pinned buffers are reused
    actor.onload()
    assert_identical(state(actor), state(twin))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_gpu_frees_device_memory_into_pinned_buffers(groups, hf_dir):
    """GPU path: the optimizer state and weights land in pinned host buffers, the device memory they
    held is handed back (memory_allocated drops by their size), and the round trip is bit-exact."""
    cfg = make_config(hf_dir, LAYOUTS["distributed_bf16"])
    actor = MegatronActor(cfg.actor_config(), groups)
    train_step(actor)
    before, resident = state(actor), actor.resident_bytes()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    actor.offload(["optimizer", "grads", "weights"])
    freed = allocated - torch.cuda.memory_allocated()
    assert freed >= 0.95 * sum(resident.values()), (freed, resident)
    assert all(t.is_pinned() for t in actor._offload._host.values())
    actor.onload()
    assert actor.resident_bytes() == resident
    assert_identical(state(actor), before)
