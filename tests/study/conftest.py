"""The Slurm dry run imports NeMo-Run, which writes under NEMORUN_HOME (read once, at import): keep it
in a private directory, as tests/launch does (whichever conftest is imported first sets it)."""

import os
import shutil
import tempfile

_HOME = None
if "NEMORUN_HOME" not in os.environ:
    _HOME = tempfile.mkdtemp(prefix="dm-nemorun-study-")
    os.environ["NEMORUN_HOME"] = _HOME


def pytest_sessionfinish(session, exitstatus):
    if _HOME:
        shutil.rmtree(_HOME, ignore_errors=True)
