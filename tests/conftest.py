"""Session-wide test settings.

One intra-op thread per process: CI has 2 cores and many tests run 2–4 torchrun workers; OpenMP threads
spinning against each other made small-model steps ~10× slower (measured, docs/platform.md). Set
before torch is imported, so it holds for this process and every subprocess that inherits the env.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
