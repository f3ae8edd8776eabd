from delta_megatron.checkpoint.manager import (
    CheckpointManager,
    atomic_write_text,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from delta_megatron.checkpoint.manifest import CheckpointError, verify, write_manifest

__all__ = ["CheckpointManager", "CheckpointError", "atomic_write_text", "resolve_resume", "rng_state",
           "set_rng_state", "verify", "write_manifest"]
