"""Fault corpus, metrics files: a torn last line (kill or full disk mid-write) is dropped on resume and
skipped by readers; every complete record of a step before the resume point is kept byte for byte."""

from __future__ import annotations

import json

import pytest

from delta_megatron.tracking import MetricsLogger, read_metrics, repair_jsonl


def _lines(steps):
    return [json.dumps({"step": s, "loss": 0.5 + s}) + "\n" for s in steps]


# what a crash can leave after the complete records of steps 0..2
TORN = {
    "half a record": '{"step": 3, "lo',
    "half a record, newline": '{"step": 3, "lo\n',
    "zero bytes (ext4 after a crash)": "\0" * 40,
    "a non-object": "[1, 2]\n",
    "invalid UTF-8": b"\xff\xfe{".decode("latin-1"),
}


@pytest.mark.parametrize("tail", list(TORN.values()), ids=list(TORN))
@pytest.mark.parametrize("resume_step", [2, 3, 5])
def test_resume_drops_torn_tail_and_redone_steps(tmp_path, tail, resume_step):
    path = tmp_path / "metrics.jsonl"
    good = _lines(range(3))
    with open(path, "w", encoding="latin-1") as fh:
        fh.write("".join(good) + tail)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(_lines(range(3))) + '{"step": 3, "samp')

    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=resume_step, companions=("samples.jsonl",))
    logger.log(resume_step, {"loss": 9.0})
    logger.close()

    kept = good[:resume_step]  # steps the resumed run does not redo, unchanged
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert rows[:-1] == kept
    assert json.loads(rows[-1])["step"] == resume_step and json.loads(rows[-1])["loss"] == 9.0
    assert samples.read_text() == "".join(_lines(range(3))[:resume_step])
    assert [r["step"] for r in read_metrics(path)] == [*range(min(resume_step, 3)), resume_step]


def test_readers_skip_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_lines(range(2))) + '{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(path)] == [0, 1]  # a run still writing, or killed
    path.write_text(_lines([0])[0] + "garbage\n" + _lines([1])[0])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_repair_reports_what_it_dropped(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(_lines(range(4))) + "{torn")
    assert repair_jsonl(path, 2) == 3  # steps 2, 3 and the torn line
    assert "dropped 1 unreadable line(s) (line 5" in caplog.text
    assert repair_jsonl(tmp_path / "absent.jsonl", 0) == 0
