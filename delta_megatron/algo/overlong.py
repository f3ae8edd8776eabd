"""DAPO soft overlong punishment (baselines.md §3).

R_len(|y|) = 0 if |y| ≤ L_max − L_cache; (L_max − L_cache − |y|)/L_cache · κ inside the buffer;
−κ beyond (truncated responses have |y| = L_max and get exactly −κ). ``|y|`` counts valid response
tokens including EOS, as verl does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.utils.configs import Section, fail, option


@dataclass
class OverlongConfig(Section):
    enabled: bool = option(False, "add the soft overlong penalty to the reward")
    max_len: int | None = option(None, "L_max; null = rollout.max_new_tokens", ge=1)
    buffer_len: int = option(4096, "L_cache: length of the linear penalty ramp before L_max", ge=1)
    penalty_factor: float = option(1.0, "κ: penalty at and beyond L_max", ge=0)

    def validate(self) -> None:
        if self.max_len is not None and self.max_len <= self.buffer_len:
            fail("max_len", self.max_len, f"must exceed buffer_len={self.buffer_len}")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """Per-response reward term R_len (≤ 0), float64 for exactness."""
    expected = max_len - buffer_len
    over = lengths.to(torch.float64) - expected
    return torch.clamp(-over / buffer_len * penalty_factor, max=0.0, min=-penalty_factor)
