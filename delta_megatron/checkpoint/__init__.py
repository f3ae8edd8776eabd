from delta_megatron.checkpoint.manager import (
    CheckpointManager,
    atomic_write_text,
    resolve_resume,
    rng_state,
    set_rng_state,
)

__all__ = ["CheckpointManager", "atomic_write_text", "resolve_resume", "rng_state", "set_rng_state"]
