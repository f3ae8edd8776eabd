"""The engines never generate past the model's context (``max_position_embeddings`` = 256 here): a
response is cut to the room left ("length"), and a prompt that fills the context is refused by name."""

from __future__ import annotations

import pytest

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout.embedded import EmbeddedEngine
from delta_megatron.rollout.engine import GenerateRequest, RolloutError, SamplingParams
from delta_megatron.rollout.sglang_engine import SGLangEngine
from tests.doubles.fake_sglang import FakeSGLangServer
from tests.rollout.tiny import EOS, PAD, greedy_reference, tiny_model

CONTEXT = 256
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def _prompt(n: int) -> list[int]:
    return [2 + (7 * i) % 40 for i in range(n)]


def _embedded():
    return EmbeddedEngine(tiny_model(0), PAD, EOS)


def _sglang(fake):
    cfg = SGLangConfig(request_timeout_s=60, max_retries=0, max_concurrency=2)
    return SGLangEngine(None, [fake.url], config=cfg, context_len=CONTEXT)


@pytest.fixture(scope="module")
def fake():
    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=120) as server:
        yield server


@pytest.mark.parametrize("kind", ["embedded", "sglang"])
@pytest.mark.parametrize("prompt_len,room", [(250, 6), (255, 1), (100, 10)])
def test_response_cut_at_the_context(kind, prompt_len, room, fake):
    engine = _embedded() if kind == "embedded" else _sglang(fake)
    prompt = _prompt(prompt_len)
    sample, = engine.generate([GenerateRequest("r", prompt, GREEDY)])
    reference = greedy_reference(tiny_model(0), prompt, room, {EOS})
    assert sample.response_ids == reference
    assert len(prompt) + len(sample.response_ids) <= CONTEXT
    assert sample.finish_reason == ("stop" if reference[-1] == EOS else "length")
    if kind == "sglang":
        assert fake.calls("/generate")[-1]["sampling_params"]["max_new_tokens"] == room


@pytest.mark.parametrize("kind", ["embedded", "sglang"])
def test_prompt_filling_the_context_is_refused(kind, fake):
    engine = _embedded() if kind == "embedded" else _sglang(fake)
    calls = len(fake.calls("/generate"))
    with pytest.raises(RolloutError, match=r"request 'long' has 256 prompt tokens, which leaves no room in "
                                           r"the model's context of 256 \(max_position_embeddings\)"):
        engine.generate([GenerateRequest("long", _prompt(CONTEXT), GREEDY)])
    assert len(fake.calls("/generate")) == calls  # nothing was sent
