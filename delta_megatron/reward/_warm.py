"""Preloaded by the verifier pool's forkserver: math-verify imported *and* warmed once, so every worker
forked from it (including replacements after a timeout) starts hot instead of paying ~0.3 s each."""

from delta_megatron.reward.verify import warmup

warmup()
