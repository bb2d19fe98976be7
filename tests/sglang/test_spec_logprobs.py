"""Output logprobs with `FastDVLMSpeculative` (`logprobs` / `top_logprobs`, SGLang's return_logprob).

Each committed token's logprob comes from the verify pass's logits at its position (after AR's
adjustments and the grammar mask), as SGLang's AR sampler computes it from the decode step's
logits. The two forwards differ in shape (a verify block against a one-token step), so values
agree to float32 noise, not bit for bit: measured on the demo model on this CPU, at most 1.6e-5
(greedy, with a regex and with penalties); the tolerance is 1e-4. Prompt logprobs come from the
causal context pass, the same EXTEND forward as AR's prefill (`spec_scheduler.record_prompt_logprobs`);
logprobs of given token ids (`token_ids_logprob`, /v1/score) from both.
"""

from __future__ import annotations

import random

import pytest

pytestmark = [pytest.mark.sglang]

from sglang_helpers import demo_prompts, generate  # noqa: E402

ATOL = 1e-4  # float32 verify-block vs AR-step logits (measured <= 1.6e-5 on the demo model)


# ---- the arithmetic -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_logprob_rows_are_log_softmax_at_the_temperature_packed_per_position(seed):
    import torch

    from fast_dvlm_sglang.sglang_plugin.speculative import SpecState, logprob_rows, logprob_tensors

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    states = [SpecState(top_logprobs=rng.choice([None, 0, 1, 5]), temperature=rng.choice([0.0, 0.7, 1.3]),
                        token_ids_logprob=rng.choice([None, (3,), (49, 0, 7, 7)])) for _ in range(4)]
    logits = [torch.randn(rng.randint(1, 6), 50, generator=gen) * 4 for _ in states]
    tokens = [torch.randint(0, 50, (x.shape[0],), generator=gen) for x in logits]
    tensors = [logprob_tensors(x, s, t) if s.top_logprobs is not None else None
               for x, s, t in zip(logits, states, tokens)]
    rows = logprob_rows(tensors, states)
    for x, s, t, row in zip(logits, states, tokens, rows):
        if s.top_logprobs is None:
            assert row == ()
            continue
        want = torch.log_softmax(x / (s.temperature or 1.0), dim=-1)
        assert len(row) == x.shape[0]
        for j, (value, top_values, top_ids, given) in enumerate(row):
            assert value == pytest.approx(float(want[j, t[j]]), abs=1e-6)
            assert len(top_values) == len(top_ids) == s.top_logprobs
            ranked = want[j].topk(s.top_logprobs) if s.top_logprobs else None
            if ranked is not None:
                assert top_ids == ranked.indices.tolist()
                assert top_values == pytest.approx(ranked.values.tolist(), abs=1e-6)
            assert given == pytest.approx([float(want[j, i]) for i in s.token_ids_logprob or ()], abs=1e-6)


# ---- through the servers (demo model) -------------------------------------------------------------
PROMPTS_SEED = 531  # the held-out demo prompts these tests send (`demo_prompts`)


def _assert_logprobs_close(got: dict, want: dict, where) -> None:
    assert got["output_ids"] == want["output_ids"], where
    g, w = got["meta_info"], want["meta_info"]
    assert [t for _, t, _ in g["output_token_logprobs"]] == got["output_ids"]
    assert [t for _, t, _ in w["output_token_logprobs"]] == want["output_ids"]
    for j, ((gv, _, _), (wv, _, _)) in enumerate(zip(g["output_token_logprobs"], w["output_token_logprobs"])):
        assert gv == pytest.approx(wv, abs=ATOL), (where, j)
    for j, (gt, wt) in enumerate(zip(g["output_top_logprobs"], w["output_top_logprobs"])):
        assert [v for v, _, _ in gt] == pytest.approx([v for v, _, _ in wt], abs=ATOL), (where, j)
        values = [v for v, _, _ in wt]
        for k, ((_, gi, _), (_, wi, _)) in enumerate(zip(gt, wt)):
            neighbours = [values[m] for m in (k - 1, k + 1) if 0 <= m < len(values)]
            if all(abs(values[k] - v) > 2 * ATOL for v in neighbours):  # ids swap only inside a tie
                assert gi == wi, (where, j, k)


@pytest.mark.parametrize("options", [{}, {"regex": r"[A-Z][A-Za-z0-9 ,:'-]*[.?!]( [A-Z][A-Za-z0-9 ,:'-]*[.?!])*"},
                                     {"frequency_penalty": 0.5, "presence_penalty": 0.2, "logit_bias": {"13": -1.5}}],
                         ids=["greedy", "regex", "penalties_bias"])
def test_logprobs_equal_ars_for_8_concurrent_requests(demo_spec_and_ar, options):
    import concurrent.futures as cf

    import httpx

    spec, ar = demo_spec_and_ar

    def run(server, job, **extra):
        text, url = job
        body = {"text": text, "return_logprob": True, "top_logprobs_num": 3,
                "sampling_params": {"max_new_tokens": 40, "temperature": 0, **options, **extra}}
        if url:
            body["image_data"] = url
        r = httpx.post(server.base_url + "/generate", json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    jobs = demo_prompts(PROMPTS_SEED)
    # Whole-block drafts, pinned: the logprobs of accepted drafts are what is checked, whatever
    # this shared server's acceptance estimate learned from earlier tests (after a run of JSON
    # requests, whose drafts miss, new requests start on AR steps: `draft_length.workload`).
    pin = {"custom_params": {"draft_length": 31}}
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: run(spec, j, **pin), jobs))
    for i, (g, job) in enumerate(zip(got, jobs)):
        _assert_logprobs_close(g, run(ar, job), (options, i))
    assert sum(len(g["output_ids"]) for g in got) > 2 * sum(g["meta_info"]["dllm_nfe"][-1] for g in got)


def test_chat_logprobs_whole_and_streamed_equal_ars(demo_spec_and_ar):
    """OpenAI chat `logprobs` + `top_logprobs`, whole and streamed: the same tokens and logprobs
    as AR's answer the same way (SGLang's stream leaves out the stop token's entry, for AR too),
    and the streamed entries are the whole answer's."""
    spec, ar = demo_spec_and_ar
    messages = [{"role": "user", "content": "Is there a red square?"}]
    kw = dict(model="default", messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)

    def whole(server):
        return server.client().chat.completions.create(**kw).choices[0].logprobs.content

    def streamed(server):
        return [t for c in server.client().chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]

    full = whole(spec)
    for ours, theirs in ((full, whole(ar)), (streamed(spec), streamed(ar))):
        # SGLang's stream attaches a step's logprobs to a chunk only when the step adds text: AR's
        # stop token comes alone (no text) and its entry is dropped; spec's may come in one chunk
        # with the tokens before it (an AR run, accepted drafts), and then it is kept: the
        # whole answer's last entry.
        if len(ours) == len(theirs) + 1 and ours is not full:
            assert (ours[-1].token, ours[-1].logprob) == (full[-1].token, full[-1].logprob)
            ours = ours[:-1]
        assert [t.token for t in ours] == [t.token for t in theirs]
        for o, t in zip(ours, theirs):
            assert o.logprob == pytest.approx(t.logprob, abs=ATOL)
            assert [a.logprob for a in o.top_logprobs] == pytest.approx([a.logprob for a in t.top_logprobs], abs=ATOL)
    stream = streamed(spec)
    assert [(t.token, t.logprob) for t in stream] == [(t.token, t.logprob) for t in full[:len(stream)]]
    assert len(full) - len(stream) in (0, 1)


def test_sampled_logprobs_are_the_temperature_distributions(demo_spec_and_ar):
    """Seeded sampling at temperature 0.7: asking for logprobs changes nothing drawn; each drawn
    token's logprob is its entry among the top alternatives (the same temperature distribution;
    its arithmetic: the unit test above)."""
    spec, _ = demo_spec_and_ar
    text, url = demo_prompts(PROMPTS_SEED)[0]
    body = generate(spec, text, image=url, max_new_tokens=24, temperature=0.7, sampling_seed=5)
    import httpx

    r = httpx.post(spec.base_url + "/generate", timeout=300, json={
        "text": text, **({"image_data": url} if url else {}), "return_logprob": True, "top_logprobs_num": 5,
        "sampling_params": {"max_new_tokens": 24, "temperature": 0.7, "sampling_seed": 5}})
    r.raise_for_status()
    again = r.json()
    assert again["output_ids"] == body["output_ids"]  # asking for logprobs changes nothing drawn
    assert all(value <= 0.0 for value, _, _ in again["meta_info"]["output_token_logprobs"])
    for (value, token, _), top in zip(again["meta_info"]["output_token_logprobs"],
                                      again["meta_info"]["output_top_logprobs"]):
        assert top[0][0] >= value - 1e-6 and [v for v, _, _ in top] == sorted((v for v, _, _ in top), reverse=True)
        if token in [t for _, t, _ in top]:
            assert value == pytest.approx(next(v for v, t, _ in top if t == token), abs=1e-6)


def test_prompt_logprobs_equal_ars_with_images_and_through_echo(demo_spec_and_ar):
    """Prompt logprobs (`logprob_start_len`, completions' `echo`): spec's causal context pass and
    AR's prefill are the same EXTEND forward of the prompt, so every value agrees to float32
    noise, an image prompt's included; 8 requests at once, starts 0 and mid-prompt."""
    import concurrent.futures as cf

    import httpx

    spec, ar = demo_spec_and_ar

    def run(server, job, start):
        text, url = job
        body = {"text": text, "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 2,
                "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        if url:
            body["image_data"] = url
        r = httpx.post(server.base_url + "/generate", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["meta_info"]

    jobs = [(job, 0 if i % 2 else 7) for i, job in enumerate(demo_prompts(PROMPTS_SEED))]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda js: run(spec, *js), jobs))
    for i, (g, (job, start)) in enumerate(zip(got, jobs)):
        w = run(ar, job, start)
        assert [t for _, t, _ in g["input_token_logprobs"]] == [t for _, t, _ in w["input_token_logprobs"]], i
        assert g["input_token_logprobs"][0][0] is None and w["input_token_logprobs"][0][0] is None
        assert [v for v, _, _ in g["input_token_logprobs"][1:]] == pytest.approx(
            [v for v, _, _ in w["input_token_logprobs"][1:]], abs=ATOL), i
        for j, (gt, wt) in enumerate(zip(g["input_top_logprobs"][1:], w["input_top_logprobs"][1:])):
            assert [v for v, _, _ in gt] == pytest.approx([v for v, _, _ in wt], abs=ATOL), (i, j)
    kw = dict(model="default", prompt="There is a red square at the top left of a", max_tokens=4, temperature=0,
              logprobs=2, echo=True)
    ours, theirs = (server.client().completions.create(**kw).choices[0] for server in (spec, ar))
    assert ours.text == theirs.text and ours.logprobs.tokens == theirs.logprobs.tokens
    assert ours.logprobs.token_logprobs[0] is None and theirs.logprobs.token_logprobs[0] is None
    assert ours.logprobs.token_logprobs[1:] == pytest.approx(theirs.logprobs.token_logprobs[1:], abs=ATOL)
    assert spec.healthy()


def test_token_ids_logprob_and_score_equal_ars(demo_spec_and_ar):
    """`token_ids_logprob` (the given ids scored at every prompt and output position) and SGLang's
    /v1/score (label ids scored after each item, read from the first output position) give AR's
    values; the output positions include accepted drafts (whole blocks pinned)."""
    import httpx

    spec, ar = demo_spec_and_ar
    text, url = demo_prompts(PROMPTS_SEED)[1]
    given = [13, 220, 264, 3, 0]

    def run(server, **extra):
        return generate(server, text, image=url, max_new_tokens=24, **extra,
                        request={"return_logprob": True, "token_ids_logprob": given, "logprob_start_len": 0})

    ours, theirs = run(spec, custom_params={"draft_length": 31}), run(ar)
    assert ours["output_ids"] == theirs["output_ids"]
    assert ours["meta_info"]["dllm_nfe"][-1] < len(ours["output_ids"])  # drafts were accepted
    for key in ("output_token_ids_logprobs", "input_token_ids_logprobs"):
        g, w = ours["meta_info"][key], theirs["meta_info"][key]
        assert len(g) == len(w) > 0, key
        for j, (gp, wp) in enumerate(zip(g, w)):
            if wp is None:
                assert gp is None, (key, j)
                continue
            assert [t for _, t, _ in gp] == [t for _, t, _ in wp] == given, (key, j)
            assert [v for v, _, _ in gp] == pytest.approx([v for v, _, _ in wp], abs=ATOL), (key, j)
    body = {"model": "default", "query": "Is there a red square? Answer:", "items": [" yes", " no", " maybe"],
            "label_token_ids": given[:3], "apply_softmax": True}
    scores = [httpx.post(server.base_url + "/v1/score", json=body, timeout=300) for server in (spec, ar)]
    assert all(r.status_code == 200 for r in scores), [r.text[:300] for r in scores]
    got, want = (r.json()["scores"] for r in scores)
    assert len(got) == 3 and all(len(row) == 3 for row in got)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=ATOL)
    assert spec.healthy()
