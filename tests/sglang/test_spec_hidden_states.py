"""Hidden states with `FastDVLMSpeculative` (`return_hidden_states`, served with SGLang's
`--enable-return-hidden-states`), against SGLang's AR server on the demo model.

AR returns one entry with the prompt's rows, then one row per decode step: the hidden state of
the step's input, which produced the next token. Spec returns the same: the prompt's rows from
the causal context pass, then each committed token's row from the verify position (or AR decode
step) that produced it (`spec_scheduler.record_prompt_hidden_states` / `record_hidden_states`).
The forwards differ in shape (a verify block against a one-token step), so values agree to
float32 noise: measured at most 3.5e-6 on this CPU; the tolerance is 1e-4, as for logprobs.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytestmark = [pytest.mark.sglang]

from sglang_helpers import demo_prompts, generate  # noqa: E402

ATOL = 1e-4  # float32 verify-block vs AR-step hidden states (measured <= 3.5e-6 on the demo model)


def _generate(server, job, **params):
    text, url = job
    return generate(server, text, image=url, request={"return_hidden_states": True}, **{"max_new_tokens": 40, **params})


def _assert_rows_close(got, want, where, prompt_entry: bool = False) -> None:
    """Entry by entry; with `prompt_entry` the first holds the rows of the prompt positions each
    server encoded, past the prefix its radix cache matched (the two caches saw different
    traffic, so the shared prompt tail is compared)."""
    import torch

    assert len(got) == len(want), where
    for j, (g, w) in enumerate(zip(got, want)):
        g, w = torch.tensor(g), torch.tensor(w)
        if prompt_entry and j == 0:
            tail = min(len(g), len(w))
            g, w = g[-tail:], w[-tail:]
        assert g.shape == w.shape, (where, j)
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, j=j: f"{where} entry {j}: {m}")


# Each case its own prompts (split seed), so the prompts' entries hold more than a cached prompt's
# last row.
CASES = {
    "adaptive": (11, {}),
    "whole_blocks": (12, {"custom_params": {"draft_length": 31}}),
    "ar_steps": (13, {"custom_params": {"draft_length": 0}}),
    "stops_inside_runs": (14, {"custom_params": {"draft_length": 31}, "stop": ["circle", "square"],
                               "max_new_tokens": 13}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_equal_ars_for_8_concurrent_requests(demo_spec_and_ar, case):
    """Eight prompts with images at once on spec: every entry equals AR's (the prompt's rows, one
    row per output token after the first), with accepted drafts, AR steps, and stops that end a
    round inside its accepted drafts (the rows after the stop are not returned, as for AR)."""
    spec, ar = demo_spec_and_ar
    seed, params = CASES[case]
    jobs = demo_prompts(seed)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: _generate(spec, job, **params), jobs))
    ar_params = {k: v for k, v in params.items() if k != "custom_params"}
    for i, (g, job) in enumerate(zip(got, jobs)):
        w = _generate(ar, job, **ar_params)
        assert g["output_ids"] == w["output_ids"], (case, i)
        hidden = g["meta_info"]["hidden_states"]
        assert len(hidden) == len(g["output_ids"]) and len(hidden[0]) > 1, (case, i)  # the prompt's rows first
        _assert_rows_close(hidden, w["meta_info"]["hidden_states"], (case, i), prompt_entry=True)
    tokens = sum(len(g["output_ids"]) for g in got)
    nfe = sum(g["meta_info"]["dllm_nfe"][-1] for g in got)
    if case == "whole_blocks":
        assert tokens > 2 * nfe  # the rows of accepted drafts are among those compared
    if case == "ar_steps":
        assert all(g["meta_info"]["dllm_draft_length"][1:] == [0] * (len(g["output_ids"]) - 1) for g in got)


def _sse_hidden_states(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                hs = (choice.get("delta") or {}).get("hidden_states") or choice.get("hidden_states")
                if hs:
                    out.append(hs)
    return out


@pytest.mark.parametrize("mode", [True, "last"], ids=["full", "last"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_hidden_states_equal_ars(demo_spec_and_ar, mode, stream):
    """Chat and completions return the last output token's row (SGLang's OpenAI layer keeps the
    last entry; "last" asks the scheduler for that one only), whole or streamed: spec's equals AR's."""
    import httpx

    from fast_dvlm_sglang.benchmarks.load import openai_messages
    from fast_dvlm_sglang.demo import shapes

    spec, ar = demo_spec_and_ar
    sample = shapes.make_split(15 + (mode == "last") + 2 * stream, 1)[0]
    for path, body in (("/v1/chat/completions", {"messages": openai_messages(sample.prompt_messages)}),
                       ("/v1/completions", {"prompt": "Shapes: a red circle and a blue"})):
        full = {"model": "default", "max_tokens": 30, "temperature": 0, "return_hidden_states": mode,
                "stream": stream, **body}
        rows = []
        for server in (spec, ar):
            if stream:
                with httpx.stream("POST", server.base_url + path, json=full, timeout=300) as r:
                    assert r.status_code == 200
                    rows.append(_sse_hidden_states(r))
            else:
                r = httpx.post(server.base_url + path, json=full, timeout=300)
                assert r.status_code == 200, r.text[:300]
                rows.append([r.json()["choices"][0]["hidden_states"]])
        assert len(rows[0]) == len(rows[1]) == 1 and len(rows[0][0]) == 128, (path, [len(x) for x in rows])
        _assert_rows_close(rows[0], rows[1], (path, mode, stream))
