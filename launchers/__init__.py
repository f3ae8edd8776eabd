"""NeMo-Run launchers for delta-megatron: cluster profiles, local/Slurm executors, sweeps, preemption.

The library (``delta_megatron``) never imports this package; ``delta-megatron launch`` does, lazily.
See docs/launch.md.
"""
