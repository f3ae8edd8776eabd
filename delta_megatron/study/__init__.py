"""Seeded credit-method studies: every (method preset, seed) run of one recipe, run locally as a bounded
process pool or on Slurm as a NeMo-Run sweep, then a report with bootstrap CIs, one-sided Mann–Whitney
U against a baseline, Vargha–Delaney A and Holm correction (``delta-megatron study``; docs/study.md).

Modules: ``presets`` (method name → config overrides), ``plan`` (the study directory, its manifest and
per-run configs and states), ``local`` (the process pool and its progress display), ``stats`` (the
statistics, scipy underneath), ``report`` (tables and pictures).
"""
