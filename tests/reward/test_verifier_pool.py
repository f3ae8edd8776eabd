"""The verifier pool on real data rows, pathological answers, and workers that hang or die."""

import time
from pathlib import Path

import pytest

from delta_megatron.data import load_dataset
from delta_megatron.reward import MathReward, RewardConfig, VerifierPool
from tests.reward.hooks import misbehaving_score

DATA = Path(__file__).resolve().parents[2] / "data"  # the repo's copy of the shared data
TIMEOUT_S = 2.0


def _rows():
    wanted = {
        "eval/math500.jsonl": ["math500/test/counting_and_probability/282.json",  # \frac{1}{2}
                               "math500/test/algebra/2780.json"],                 # \$18.90
        "train/deepmath_1k.jsonl": ["deepmath_1k/train/251",                      # \dfrac{\pi}{4}
                                    "deepmath_1k/train/585"],                     # Yes
        "eval/aime24.jsonl": ["aime24/60"],                                       # 204
    }
    out = {}
    for path, ids in wanted.items():
        for ex in load_dataset(DATA / path):
            if ex.id in ids:
                out[ex.id] = ex.answer
    return out


@pytest.fixture(scope="module")
def gold():
    rows = _rows()
    assert rows == {
        "math500/test/counting_and_probability/282.json": "\\frac{1}{2}",
        "math500/test/algebra/2780.json": "\\$18.90",
        "deepmath_1k/train/251": "\\dfrac{\\pi}{4}",
        "deepmath_1k/train/585": "Yes",
        "aime24/60": "204",
    }
    return rows


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
        yield p


def _real_batch(gold):
    half = gold["math500/test/counting_and_probability/282.json"]
    pi4 = gold["deepmath_1k/train/251"]
    return [
        ("so the probability is \\boxed{0.5}.", half),                          # 0.5 == 1/2
        ("the probability is \\boxed{\\frac{1}{3}}", half),                     # wrong
        ("hence \\boxed{\\frac{\\pi}{4}}", pi4),                                # \dfrac vs \frac
        ("...\nAnswer: $\\pi/4$", pi4),                                         # Answer: line
        ("cost: \\boxed{18.9}", gold["math500/test/algebra/2780.json"]),        # \$18.90
        ("\\boxed{No}", gold["deepmath_1k/train/585"]),                         # wrong word answer
        ("Answer: 204", gold["aime24/60"]),
        ("I think it is 204 but I am not sure", gold["aime24/60"]),             # no answer
    ]


REAL_REWARDS = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_math_verify_on_real_rows(pool, gold):
    rewards, stats = pool.score(_real_batch(gold))
    assert rewards == REAL_REWARDS
    assert (stats.total, stats.correct, stats.no_answer, stats.timeouts, stats.crashes, stats.errors) == \
        (8, 5, 1, 0, 0, 0)


def test_workers_are_reused_across_calls(pool, gold):
    pids = [w.proc.pid for w in pool._workers]
    for _ in range(2):
        assert pool.score(_real_batch(gold)[:2])[0] == [1.0, 0.0]
    assert [w.proc.pid for w in pool._workers] == pids


def test_pathological_answer_times_out_and_pool_recovers(pool, gold):
    # With math-verify's own (signal.alarm) timeout off, comparing 9^(9^(9^9)) with 3 never ends.
    t0 = time.monotonic()
    rewards, stats = pool.score([("\\boxed{9^{9^{9^{9}}}}", "3")])
    elapsed = time.monotonic() - t0
    assert elapsed <= TIMEOUT_S + 1.0  # issue 7: returns within timeout + 1 s
    assert rewards == [0.0]
    assert (stats.timeouts, stats.crashes, stats.errors, stats.correct) == (1, 0, 0, 0)
    rewards, stats = pool.score(_real_batch(gold))  # the replaced worker scores correctly
    assert rewards == REAL_REWARDS and stats.timeouts == 0


def test_gold_that_parses_to_nothing_is_an_error_not_a_zero(pool):
    rewards, stats = pool.score([("\\boxed{3}", "\\"), ("\\boxed{3}", "3")])
    assert rewards == [0.0, 1.0]
    assert (stats.errors, stats.correct) == (1, 1)


def test_dapo_and_binary_variants(gold):
    batch = _real_batch(gold)
    with MathReward(RewardConfig(kind="math", variant="dapo", num_workers=1, timeout_s=TIMEOUT_S)) as dapo:
        rewards, stats = dapo.score(batch)
    assert rewards == [1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0]  # no answer counts as wrong: -1
    assert stats.correct == 5
    with MathReward(RewardConfig(kind="math", variant="binary", num_workers=1)) as binary:
        assert binary.score(batch)[0] == REAL_REWARDS


@pytest.fixture(scope="module")
def hook_pool():
    with VerifierPool(num_workers=2, timeout_s=1.0, score_fn=misbehaving_score) as p:
        yield p


def test_hanging_worker_is_killed_within_the_timeout(hook_pool):
    t0 = time.monotonic()
    rewards, stats = hook_pool.score([("SLEEP", "x"), ("a", "a"), ("b", "c")])
    assert time.monotonic() - t0 <= 1.0 + 5.0  # the hook sleeps 3600 s; slack for a loaded CI box
    assert rewards == [0.0, 1.0, 0.0]
    assert (stats.timeouts, stats.crashes, stats.correct) == (1, 0, 1)


def test_crashing_workers_score_zero_and_are_replaced(hook_pool):
    pids_before = {w.proc.pid for w in hook_pool._workers}
    rewards, stats = hook_pool.score([("EXIT", "x"), ("a", "a"), ("SEGV", "x"), ("d", "d"), ("e", "f")])
    assert rewards == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert (stats.crashes, stats.timeouts, stats.errors, stats.correct) == (2, 0, 0, 2)
    assert len({w.proc.pid for w in hook_pool._workers} - pids_before) >= 1  # fresh workers
    rewards, stats = hook_pool.score([("g", "g"), ("h", "i")])
    assert rewards == [1.0, 0.0] and stats.crashes == 0


def test_exceptions_and_bad_values_are_errors(hook_pool):
    rewards, stats = hook_pool.score([("RAISE", "x"), ("NAN", "x"), ("", "x"), ("k", "k")])
    assert rewards == [0.0, 0.0, 0.0, 1.0]
    assert (stats.errors, stats.no_answer, stats.correct, stats.crashes) == (2, 1, 1, 0)


def test_totals_accumulate(hook_pool):
    before = hook_pool.totals
    hook_pool.score([("a", "a"), ("", "b")])
    after = hook_pool.totals
    assert (after.total - before.total, after.correct - before.correct,
            after.no_answer - before.no_answer) == (2, 1, 1)


def test_empty_batch_and_bad_items(hook_pool):
    rewards, stats = hook_pool.score([])
    assert rewards == [] and (stats.total, stats.correct, stats.errors) == (0, 0, 0)
    with pytest.raises(TypeError, match=r"items\[1\]"):
        hook_pool.score([("a", "a"), ("only response",)])
    with pytest.raises(TypeError, match=r"items\[0\]"):
        hook_pool.score([("a", 3)])


def test_close_stops_workers_and_rejects_further_use():
    p = VerifierPool(num_workers=1, timeout_s=1.0, score_fn=misbehaving_score)
    assert p.score([("a", "a")])[0] == [1.0]
    procs = [w.proc for w in p._workers]
    with p:
        pass  # __exit__ closes
    assert p.closed and all(not proc.is_alive() for proc in procs)
    p.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        p.score([("a", "a")])


def test_constructor_rejects_bad_limits():
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(num_workers=1, timeout_s=0)


EXIT_SCRIPT = """
import sys, threading, time
from delta_megatron.reward import VerifierPool
from tests.reward.hooks import misbehaving_score

if __name__ == "__main__":
    pool = VerifierPool(num_workers=2, timeout_s=600, score_fn=misbehaving_score)
    assert pool.score([("a", "a")])[0] == [1.0]
    threading.Thread(target=pool.score, args=([("STUBBORN", "x"), ("STUBBORN", "y")],),
                     daemon=True).start()
    time.sleep(0.5)  # both workers now hang, ignoring SIGTERM (multiprocessing's own exit cleanup)
    print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
    # exit without close(): the atexit finalizer must kill the hanging workers
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped
    except FileNotFoundError:
        return False


def test_interpreter_exit_kills_hanging_workers(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit_with_pool.py"
    script.write_text(EXIT_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


def test_a_score_call_aborted_mid_batch_leaves_the_pool_usable(hook_pool, monkeypatch):
    import delta_megatron.reward.verifier_pool as vp

    calls = {"n": 0}
    real_wait = vp.mp_wait

    def interrupted_wait(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while workers were busy
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(vp, "mp_wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        hook_pool.score([("SLEEP", "x"), ("a", "a")])
    monkeypatch.setattr(vp, "mp_wait", real_wait)
    t0 = time.monotonic()
    rewards, stats = hook_pool.score([("b", "b"), ("c", "d"), ("e", "e")])
    assert rewards == [1.0, 0.0, 1.0] and (stats.timeouts, stats.crashes) == (0, 0)
    assert time.monotonic() - t0 < 5.0  # the sleeping worker (3600 s) was replaced, not waited for


def test_failures_are_logged_with_the_first_reason(hook_pool, caplog):
    with caplog.at_level("WARNING", logger="delta_megatron.reward.verifier_pool"):
        hook_pool.score([("a", "a"), ("RAISE", "x")])
    assert "0 timeouts, 0 crashes, 1 errors in 2 samples" in caplog.text
    assert "items[1]: error: RuntimeError: verifier bug" in caplog.text
