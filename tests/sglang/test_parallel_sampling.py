"""`parallel_sampling.before_send_one_request` on SGLang's real SamplingParams, sent as SGLang's
fan-out sends them (n shallow copies of one tokenized request, then the next request). The
server-level check, through SGLang's real fan-out, is
`test_spec_server.py::test_n_choices_are_independent_requests`."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang

from fast_dvlm_sglang.config import ARCHITECTURE  # noqa: E402

OURS = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=[ARCHITECTURE])))
OTHER = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=["Qwen2ForCausalLM"])))


def _params(**kw):
    from sglang.srt.sampling.sampling_params import SamplingParams

    return SamplingParams(**{"max_new_tokens": 16, "temperature": 0.8, **kw})


def _fan_out(tokenizer_manager, params, n_sends):
    """The seeds the scheduler gets for n_sends copies of one tokenized request."""
    from fast_dvlm_sglang.sglang_plugin.parallel_sampling import before_send_one_request

    tokenized = SimpleNamespace(sampling_params=params, rid="x")
    seeds = []
    for _ in range(n_sends):
        sent = copy.copy(tokenized)  # SGLang: tokenized_obj = copy.copy(tokenized_objs[i])
        assert before_send_one_request(tokenizer_manager, sent) is None
        seeds.append(sent.sampling_params.sampling_seed)
        # every other field travels unchanged
        assert {f: getattr(sent.sampling_params, f) for f in params.__struct_fields__ if f != "sampling_seed"} \
            == {f: getattr(params, f) for f in params.__struct_fields__ if f != "sampling_seed"}
    return seeds


@pytest.fixture(autouse=True)
def _no_fan_outs_left():
    from fast_dvlm_sglang.sglang_plugin import parallel_sampling

    parallel_sampling._fan_outs.clear()
    yield
    assert parallel_sampling._fan_outs == {}  # every fan-out counted to its end and forgotten


@pytest.mark.parametrize("seed,want", [
    (0, [0, 1, 2, 3]), (7, [7, 8, 9, 10]), (-3, [-3, -2, -1, 0]),
    (2**63 - 2, [2**63 - 2, 2**63 - 1, -(2**63), -(2**63) + 1]),  # int64, as SGLang accepts seeds
])
def test_choice_k_samples_with_seed_plus_k(seed, want):
    params = _params(n=4, sampling_seed=seed)
    assert _fan_out(OURS, params, 4) == want
    assert params.sampling_seed == seed  # the shared object itself is never changed
    assert _fan_out(OURS, _params(n=4, sampling_seed=seed), 4) == want  # the same request again


def test_interleaved_fan_outs_count_apart():
    from fast_dvlm_sglang.sglang_plugin.parallel_sampling import before_send_one_request

    a, b = _params(n=2, sampling_seed=10), _params(n=3, sampling_seed=10)
    got = []
    for params in (a, b, a, b, b):  # two requests' copies sent in turns (their awaits interleave)
        sent = SimpleNamespace(sampling_params=params)
        before_send_one_request(OURS, sent)
        got.append(sent.sampling_params.sampling_seed)
    assert got == [10, 10, 11, 11, 12]


@pytest.mark.parametrize("case", ["unseeded", "n1", "warm-up", "other model"])
def test_everything_else_is_untouched(case):
    params = {"unseeded": _params(n=3), "n1": _params(sampling_seed=5),
              "warm-up": _params(n=3, sampling_seed=5, max_new_tokens=0),
              "other model": _params(n=3, sampling_seed=5)}[case]
    manager = OTHER if case == "other model" else OURS
    sends = 3 if case != "n1" else 2  # (n = 1 sent twice is two requests that share a params object)
    seeds = _fan_out(manager, params, sends)
    assert seeds == [params.sampling_seed] * sends


def test_fan_outs_cut_short_are_bounded(monkeypatch):
    from fast_dvlm_sglang.sglang_plugin import parallel_sampling

    monkeypatch.setattr(parallel_sampling, "MAX_FAN_OUTS", 4)
    kept = [_params(n=3, sampling_seed=s) for s in range(10)]
    for params in kept:  # each sends one copy and stops (its next send raised)
        parallel_sampling.before_send_one_request(OURS, SimpleNamespace(sampling_params=params))
    assert [p for p, _ in parallel_sampling._fan_outs.values()] == kept[-4:]
    parallel_sampling._fan_outs.clear()
