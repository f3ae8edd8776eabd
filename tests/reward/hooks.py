"""Score functions that misbehave on purpose, run inside verifier workers (module-level so they pickle).

The response text selects the misbehaviour; anything else is an exact-match score, so the same pool
can show that it keeps scoring correctly after a worker was killed or died.
"""

import ctypes
import os
import signal
import time


def misbehaving_score(response: str, gold: str) -> float | None:
    if response == "SLEEP":
        time.sleep(3600)
    if response == "STUBBORN":  # hangs and ignores SIGTERM: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    if response == "EXIT":
        os._exit(3)
    if response == "SEGV":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if response == "RAISE":
        raise RuntimeError("verifier bug")
    if response == "NAN":
        return float("nan")
    if response == "":
        return None
    return 1.0 if response == gold else 0.0
