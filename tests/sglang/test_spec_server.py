"""`fast-dvlm serve --algorithm spec` through the real server and the openai client.

Greedy speculative answers must equal the reference AR greedy answers token for token, or part
from them only at a near tie of the reference's top-2 logits (`tie_aware_server.py`; compared
through SGLang's native /generate, which returns output ids) for 16 concurrent requests with
mixed prompt lengths, images and max_tokens (any max_tokens: a round commits a variable number of
tokens, so there is no block-size rounding). Also: streaming, the OpenAI chat path, seeded
sampling, a stop token inside an accepted run, refused features, and the reported tokens/NFE
(`meta_info["dllm_nfe"]`, `meta_info["dllm_spec_round"]`, see `spec_scheduler.py`).

The tiny model is random (few drafts are accepted); the demo model
(`fast_dvlm_sglang/demo/checkpoint`, trained with the recipe) is where speculation pays off.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from sglang_helpers import generate, image_url, kv_tokens_in_use, prometheus_value, wait_for  # noqa: E402
from tie_aware_server import ReferenceTieCheck  # noqa: E402

from fast_dvlm_sglang.demo import DEMO_CHECKPOINT  # noqa: E402
from fast_dvlm_sglang.server_process import ServeProcess  # noqa: E402

MAX_TOKENS = [1, 2, 7, 31, 32, 33, 64, 17, 5, 48, 3, 64, 40, 9, 25, 63]  # 16 requests
SHAPES = ["ellipse", "rectangle"]
COLORS = ["red", "green", "blue", "black", "yellow", "purple", "orange", "gray"]


def _tiny_prompts():
    """16 conversations: every other one with an image (two sizes), text of varied length."""
    convs = []
    for i, n in enumerate(MAX_TOKENS):
        text = "What shape is in the image?" if i % 4 < 2 else "the blue square is big " * (1 + i % 7)
        if i % 2 == 0:
            url = image_url(COLORS[i % 8], SHAPES[i % 3 % 2], size=56 if i % 3 else 112)
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
            convs.append(([{"role": "user", "content": content}], url, n))
        else:
            convs.append(([{"role": "user", "content": text}], None, n))
    return convs


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _demo_prompts():
    from fast_dvlm_sglang.demo import shapes

    convs = []
    for sample, n in zip(shapes.make_split(4321, len(MAX_TOKENS)), MAX_TOKENS):
        convs.append((sample.prompt_messages, _png_url(sample.image) if sample.image is not None else None, n))
    return convs


class Reference:
    """AR greedy answers of the reference PyTorch model (the oracle) and the rendered prompts."""

    def __init__(self, path):
        from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
        from fast_dvlm_sglang.tokenizer import load_processor

        self.model = FastDVLMForConditionalGeneration.from_pretrained(path).eval()
        self.proc = load_processor(path)
        self.tie_check = ReferenceTieCheck(self.model, self.proc, path)

    def text(self, messages) -> str:
        from fast_dvlm_sglang.processing import render_chat

        return render_chat(self.proc, messages, add_generation_prompt=True)

    def run(self, messages, max_new_tokens: int, algorithm: str = "ar", draft_policy=None, eos_token_ids=None,
            **sampling):
        from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, SamplingParams
        from fast_dvlm_sglang.decoding import generate as ref_generate
        from fast_dvlm_sglang.processing import encode_chat

        enc = encode_chat(self.proc, messages)
        return ref_generate(self.model, Prompt.from_encoded(enc),
                            GenerationConfig(algorithm=algorithm, max_new_tokens=max_new_tokens,
                                             sampling=SamplingParams(**sampling), draft_policy=draft_policy,
                                             eos_token_ids=eos_token_ids))

    def ar(self, messages, max_new_tokens: int) -> list[int]:
        return self.run(messages, max_new_tokens).token_ids


@pytest.fixture(scope="module")
def tiny_ref(tiny_checkpoints):
    return Reference(tiny_checkpoints["new"])


def _check_metrics(meta: dict, n_tokens: int, block_size: int = 32) -> tuple[int, int]:
    """The per-token round / NFE / draft-length channels are consistent; returns (tokens, NFE)."""
    rounds, nfe, drafted = meta["dllm_spec_round"], meta["dllm_nfe"], meta["dllm_draft_length"]
    steps = meta["dllm_ar_steps"]
    assert len(rounds) == len(nfe) == len(drafted) == len(steps) == n_tokens == meta["completion_tokens"]
    assert rounds == sorted(rounds) and rounds[0] == 0  # the first token: the context pass's, streamed at once
    assert nfe[0] == 0 and drafted[0] == 0 and steps[0] == 0
    # a round is two forwards (draft + verify) and commits at most its draft length + 1 tokens, or
    # it drafts nothing and runs s AR steps (1, or an AR run) in s forwards, committing at most s
    last = (0, 0)
    for r, f, k, s in zip(rounds, nfe, drafted, steps):
        if r != last[0]:
            assert r == last[0] + 1 and 0 <= k < block_size and (k > 0) == (s == 0) and 0 <= s <= block_size
            assert f == last[1] + (2 if k > 0 else s)
            last = (r, f)
            assert rounds.count(r) <= (k + 1 if k > 0 else s)
        assert (f, k, s) == (last[1], drafted[rounds.index(r)], steps[rounds.index(r)])
    return n_tokens, nfe[-1]


def _concurrent_equals_ar(server, ref, convs):
    """16 concurrent native requests; each answer equals its AR reference (up to a near tie).
    Returns stats (`tied`: the requests that parted from AR at a near tie)."""
    expected = [ref.ar(msgs, n) for msgs, _, n in convs]

    def one(conv):
        msgs, url, n = conv
        return generate(server, ref.text(msgs), image=url, max_new_tokens=n)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(convs)) as pool:
        bodies = list(pool.map(one, convs))
    seconds = time.perf_counter() - start
    tokens, nfe, tied = 0, [], []
    for i, (body, want, (msgs, url, n)) in enumerate(zip(bodies, expected, convs)):
        if not ref.tie_check.check(msgs, want, body["output_ids"], f"request {i} (max {n}, image {url is not None})"):
            tied.append(i)
        t, f = _check_metrics(body["meta_info"], len(body["output_ids"]))
        tokens, nfe = tokens + t, nfe + [f]
    return {"tokens": tokens, "nfe": nfe, "tokens_per_nfe": tokens / sum(nfe), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tied": tied}


def test_tiny_greedy_equals_ar_for_16_concurrent_requests(spec_server_tiny, tiny_ref):
    stats = _concurrent_equals_ar(spec_server_tiny, tiny_ref, _tiny_prompts())
    print(f"\ntiny spec: {json.dumps(stats)}")


def test_openai_chat_and_stream_equal_native(spec_server_tiny, tiny_ref):
    msgs, url, _ = _tiny_prompts()[0]
    n = 40
    body = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=n)
    tiny_ref.tie_check.check(msgs, tiny_ref.ar(msgs, n), body["output_ids"], "openai chat prompt")
    client = spec_server_tiny.client()
    chat = client.chat.completions.create(model=spec_server_tiny.model, messages=msgs, max_tokens=n, temperature=0)
    assert chat.choices[0].message.content == body["text"]
    assert chat.usage.completion_tokens == len(body["output_ids"])
    # SGLang's `return_meta_info` extension carries the NFE through the OpenAI API too. Compared
    # with the draft length pinned on both sides: unpinned, each round's width is the adaptive
    # policy's, seeded from the server's workload prior, which every request moves (and the
    # 16-concurrent test before this one, batched as timing allows). The same prompt then can take
    # other widths a request later: a CI run saw NFE [0, 2, 10, ...] then [0, 8, 8, ...], same text.
    pin = {"draft_length": 31}
    pinned = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=n, custom_params=pin)
    chat = client.chat.completions.create(model=spec_server_tiny.model, messages=msgs, max_tokens=n, temperature=0,
                                          extra_body={"return_meta_info": True, "custom_params": pin})
    meta = chat.choices[0].model_extra["meta_info"]
    assert chat.choices[0].message.content == pinned["text"]
    assert meta["dllm_nfe"] == pinned["meta_info"]["dllm_nfe"]
    assert meta["dllm_spec_round"] == pinned["meta_info"]["dllm_spec_round"]
    _check_metrics(meta, chat.usage.completion_tokens)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=spec_server_tiny.model, messages=msgs, max_tokens=n, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == body["text"] and len(parts) > 1


def test_native_stream_reports_nfe(spec_server_tiny, tiny_ref):
    import httpx

    msgs, _, _ = _tiny_prompts()[1]
    n = 50
    body = {"text": tiny_ref.text(msgs), "stream": True, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
    chunks = []
    with httpx.stream("POST", spec_server_tiny.base_url + "/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert len(chunks) > 1
    last = chunks[-1]
    tiny_ref.tie_check.check(msgs, tiny_ref.ar(msgs, n), last["output_ids"], "native stream prompt")
    _check_metrics(last["meta_info"], len(last["output_ids"]))


def test_ar_runs_where_drafts_miss_one_request_at_a_time(spec_server_tiny, tiny_ref):
    """The random tiny model drafts badly: one request at a time the default policy falls back to
    AR runs (rounds of several AR steps, `meta_info["dllm_ar_steps"]` > 1, one forward per token),
    and the answers are AR's (up to a near tie); a stop token inside a run ends the answer there."""
    runs = 0
    for i, (msgs, url, _) in enumerate(_tiny_prompts()[:4]):
        want = tiny_ref.ar(msgs, 48)
        body = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=48)
        if not tiny_ref.tie_check.check(msgs, want, body["output_ids"], f"AR runs, prompt {i}"):
            continue
        _check_metrics(body["meta_info"], len(body["output_ids"]))
        steps, rounds = body["meta_info"]["dllm_ar_steps"], body["meta_info"]["dllm_spec_round"]
        in_runs = [j for j in range(1, len(steps)) if steps[j] > 1 and rounds[j] == rounds[j - 1]]
        runs += bool(in_runs)
        fresh = [j for j in in_runs if want[j] not in want[:j]]
        if fresh:  # a token committed inside a run (not its first), seen for the first time: stop there
            j = fresh[0]
            stopped = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=48,
                               stop_token_ids=[want[j]])
            assert stopped["output_ids"] == want[:j + 1]
            assert stopped["meta_info"]["finish_reason"]["type"] == "stop"
    assert runs >= 3, runs


def test_stop_token_inside_accepted_run(spec_server_tiny, tiny_ref):
    """A stop token that the round commits as an accepted draft (not the round's first token)
    ends the answer right there: output = AR answer up to and including the stop token."""
    full = {"custom_params": {"draft_length": 31}}  # whole blocks: the random tiny model drafts badly
    for msgs, url, _ in _tiny_prompts():
        body = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=64, **full)
        ids, rounds = body["output_ids"], body["meta_info"]["dllm_spec_round"]
        # an accepted draft: same round as the token before it, and the first time it appears
        cands = [j for j in range(1, len(ids)) if rounds[j] == rounds[j - 1] and ids[j] not in ids[:j]]
        if cands:
            break
    else:
        pytest.fail("the random tiny model accepted no draft token on these prompts: pick other prompts")
    j = cands[0]
    stopped = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=64,
                       stop_token_ids=[ids[j]], **full)
    assert stopped["output_ids"] == ids[: j + 1]
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"
    assert stopped["meta_info"]["completion_tokens"] == j + 1


def test_sampling_same_seed_same_output(spec_server_tiny, tiny_ref):
    """Seeded sampling: the same seed gives the same answer, alone or among other traffic."""
    msgs = [{"role": "user", "content": "the blue square is big"}]
    text = tiny_ref.text(msgs)

    def sample(seed):
        return generate(spec_server_tiny, text, max_new_tokens=48, temperature=0.9, top_p=0.95,
                        sampling_seed=seed, ignore_eos=True)["output_ids"]

    solo = sample(11)
    with cf.ThreadPoolExecutor(6) as pool:
        batched = list(pool.map(sample, [11, 12, 11, 13, 11, 14]))
    assert batched[0] == batched[2] == batched[4] == solo
    assert len({tuple(b) for b in batched}) > 1  # other seeds: other answers
    greedy = generate(spec_server_tiny, text, max_new_tokens=48, ignore_eos=True)["output_ids"]
    assert solo != greedy



def test_n_choices_are_independent_requests(spec_server_tiny, tiny_ref):
    """`n > 1` is SGLang's own fan-out (a max_new_tokens=0 warm-up that caches the prompt, then n
    copies of the request): each choice is its own request, with its own state and generator.
    Greedy: every choice is the AR answer. Seeded: choice k is the answer seed + k gives alone
    (`parallel_sampling.py`; SGLang sends the copies one SamplingParams, seed included), through
    /generate and the OpenAI chat API, streamed or not. Unseeded: each choice draws its own seed.
    The KV pool gets every slot back (free or evictable)."""
    import httpx

    msgs, url, _ = _tiny_prompts()[1]
    text, n = tiny_ref.text(msgs), 24

    def native(count, **sampling):
        body = {"text": text, "image_data": url, "sampling_params": {"max_new_tokens": n, "n": count, **sampling}}
        r = httpx.post(spec_server_tiny.base_url + "/generate", json=body, timeout=300)
        r.raise_for_status()
        out = r.json()
        assert isinstance(out, list) and len(out) == count, out
        return [o["output_ids"] for o in out]

    want = tiny_ref.ar(msgs, n)
    for i, got in enumerate(native(3, temperature=0)):
        tiny_ref.tie_check.check(msgs, want, got, f"greedy choice {i}")
    sampled = {"temperature": 0.9, "top_p": 0.95, "ignore_eos": True}
    solo = {seed: generate(spec_server_tiny, text, image=url, max_new_tokens=n, sampling_seed=seed,
                           **sampled)["output_ids"] for seed in (5, 6, 7)}
    assert len({tuple(c) for c in solo.values()}) > 1, solo  # the seeds sample apart
    assert native(3, sampling_seed=5, **sampled) == [solo[5], solo[6], solo[7]]
    unseeded = native(4, **sampled)
    assert len({tuple(c) for c in unseeded}) > 1, unseeded

    client = spec_server_tiny.client()
    chat = client.chat.completions.create(model=spec_server_tiny.model, messages=msgs, max_tokens=n,
                                          temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=spec_server_tiny.model, messages=msgs, max_tokens=n,
                                                temperature=0, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {0: chat.choices[0].message.content, 1: chat.choices[1].message.content}
    seeded = dict(model=spec_server_tiny.model, messages=msgs, max_tokens=n, temperature=0.9, top_p=0.95,
                  extra_body={"ignore_eos": True})
    alone = [client.chat.completions.create(**seeded, seed=s).choices[0].message.content for s in (5, 6)]
    assert alone[0] != alone[1], alone
    chat = client.chat.completions.create(**seeded, seed=5, n=2)
    assert [c.message.content for c in chat.choices] == alone
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**seeded, seed=5, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == alone
    assert wait_for(lambda: kv_tokens_in_use(spec_server_tiny) == 0), kv_tokens_in_use(spec_server_tiny)
    assert spec_server_tiny.healthy()


def test_prometheus_counters_add_up_to_the_responses(spec_server_tiny, tiny_ref):
    """`/metrics` (--enable-metrics) counts what the responses report: tokens, forwards (NFE),
    rounds and accepted drafts; the per-round histogram has one sample per round."""
    names = ["fast_dvlm:spec_tokens_total", "fast_dvlm:spec_forwards_total", "fast_dvlm:spec_rounds_total",
             "fast_dvlm:spec_accepted_drafts_total", "fast_dvlm:spec_round_tokens_count",
             "fast_dvlm:spec_ar_run_length_sum", "fast_dvlm:spec_ar_run_length_count"]

    def read():
        return [prometheus_value(spec_server_tiny, n) for n in names]

    before = read()
    tokens = nfe = rounds = 0
    for msgs, url, n in _tiny_prompts()[:6]:
        meta = generate(spec_server_tiny, tiny_ref.text(msgs), image=url, max_new_tokens=n)["meta_info"]
        tokens += meta["completion_tokens"]
        nfe += meta["dllm_nfe"][-1]
        rounds += meta["dllm_spec_round"][-1]
    delta = [a - b for a, b in zip(read(), before)]
    assert delta[:3] == [tokens, nfe, rounds]
    # each emitted token is a round's seed, an accepted draft, a step of an AR run after its
    # first or a request's final token; every round drafted or ran AR steps
    ar_run_steps = delta[5] - delta[6]
    assert tokens - rounds - 6 - ar_run_steps <= delta[3] <= 31 * rounds and delta[4] == rounds
    assert delta[6] <= rounds
    assert prometheus_value(spec_server_tiny, "fast_dvlm:spec_draft_length_count") >= rounds


def test_output_logprobs_are_served(spec_server_tiny):
    import httpx

    body = {"model": spec_server_tiny.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2}
    r = httpx.post(spec_server_tiny.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text[:300]
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] and all(len(t["top_logprobs"]) == 2 for t in content)
    assert spec_server_tiny.healthy()


# ---- prompt logprobs: the causal context pass's, through SGLang's bookkeeping ----------------------
def _prompt_ids(n: int, salt: int) -> list[int]:
    """n text token ids of the tiny vocabulary (ids below 100: no special token), unique per salt so
    no other test's prompt is a cached prefix of it."""
    return [3 + (salt * 7919 + i * 104729) % 97 for i in range(n)]


def _generate_ids(server, ids, max_new_tokens=3, **extra):
    import httpx

    r = httpx.post(server.base_url + "/generate", timeout=300, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}, **extra})
    assert r.status_code == 200, r.text[:300]
    return r.json()


@pytest.mark.parametrize("start", [0, 37, 129])
def test_prompt_logprobs_equal_reference_across_chunks(spec_server_tiny, tiny_checkpoints, start):
    """A 130-token prompt through a server that prefills 48 tokens at a time: the context pass runs
    in three chunks, each adding its logprobs from `start` on (start 129: the last token only)."""
    from sglang_helpers import assert_prompt_logprobs, reference_log_probs

    ids = _prompt_ids(130, salt=start)
    logp = reference_log_probs(tiny_checkpoints["new"], ids)
    plain = _generate_ids(spec_server_tiny, ids)
    body = _generate_ids(spec_server_tiny, ids, return_logprob=True, logprob_start_len=start, top_logprobs_num=3)
    assert body["output_ids"] == plain["output_ids"]  # asking for logprobs changes no answer
    assert_prompt_logprobs(body["meta_info"], ids, logp, start, top=3)
    first = body["meta_info"]["output_token_logprobs"][0]  # the seed's, from the same pass's last row
    assert first[1] == body["output_ids"][0] and first[0] == pytest.approx(float(logp[-1, first[1]]), abs=2e-4)
    assert spec_server_tiny.healthy()


def test_prompt_logprobs_over_a_cached_prefix_and_in_a_mixed_batch(spec_server_tiny, tiny_checkpoints):
    """Eight requests at once, with a prompt cached before: prompt logprobs from 0, from inside and
    from past the cached prefix, output logprobs only, and none. Each equals the reference and
    its own answer alone (the batch's values are one flat list; each request takes its share)."""
    from sglang_helpers import assert_prompt_logprobs, reference_log_probs

    ids = _prompt_ids(100, salt=1000)
    _generate_ids(spec_server_tiny, ids[:80])  # caches 80 tokens
    logp = reference_log_probs(tiny_checkpoints["new"], ids)
    asks = [{"logprob_start_len": 0}, {"logprob_start_len": 50}, {"logprob_start_len": 90}, {},
            None, {"logprob_start_len": 5, "top_logprobs_num": 2}, None, {"logprob_start_len": 99}]
    alone = _generate_ids(spec_server_tiny, ids, max_new_tokens=6)["output_ids"]
    with cf.ThreadPoolExecutor(len(asks)) as pool:
        bodies = list(pool.map(lambda ask: _generate_ids(
            spec_server_tiny, ids, 6, **({} if ask is None else {"return_logprob": True, **ask})), asks))
    for ask, body in zip(asks, bodies):
        assert body["output_ids"] == alone
        meta = body["meta_info"]
        if ask is None:
            assert "input_token_logprobs" not in meta or not meta["input_token_logprobs"]
            continue
        assert len(meta["output_token_logprobs"]) == len(alone)
        if "logprob_start_len" in ask:
            assert_prompt_logprobs(meta, ids, logp, ask["logprob_start_len"], top=ask.get("top_logprobs_num", 0))
        else:
            assert meta["input_token_logprobs"] == []
    assert spec_server_tiny.healthy()


def test_completions_echo_returns_prompt_logprobs(spec_server_tiny, tiny_checkpoints):
    """OpenAI completions with `echo` (what lm-eval's loglikelihood tasks send): the prompt's
    tokens and their logprobs, then the completion's."""
    from openai import OpenAI
    from sglang_helpers import reference_log_probs

    from fast_dvlm_sglang.tokenizer import load_tokenizer

    prompt = "the blue square is big and the red circle is small " * 3
    ids = load_tokenizer(tiny_checkpoints["new"])(prompt)["input_ids"]
    logp = reference_log_probs(tiny_checkpoints["new"], ids)
    client = OpenAI(base_url=spec_server_tiny.base_url + "/v1", api_key="none")
    r = client.completions.create(model=spec_server_tiny.model, prompt=prompt, max_tokens=4, temperature=0,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + r.usage.completion_tokens
    got = lp.token_logprobs[1:len(ids)]
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert got == pytest.approx(want, abs=2e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert spec_server_tiny.healthy()


# ---- hidden states (return_hidden_states; the server runs --enable-return-hidden-states) -----------
def _hidden_body(ids, max_new_tokens, draft_length=None, **extra):
    params = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if draft_length is not None:
        params["custom_params"] = {"draft_length": draft_length}
    return {"input_ids": ids, "sampling_params": params, **extra}


def _assert_hidden_states(hidden, ids, output_ids, ref, cached: int = 0) -> None:
    """SGLang's layout (as its AR server returns them): one entry with a row per prompt position
    past the `cached` prefix, then one row per output token after the first, the position of its
    input (the token before it): `ref` is the reference over the prompt and the output."""
    import torch

    assert len(hidden) == len(output_ids)
    torch.testing.assert_close(torch.tensor(hidden[0]), ref[cached:len(ids)], atol=HIDDEN_ATOL, rtol=0)
    if len(output_ids) > 1:
        torch.testing.assert_close(torch.tensor(hidden[1:]), ref[len(ids):len(ids) + len(output_ids) - 1],
                                   atol=HIDDEN_ATOL, rtol=0)


# The reference in float32 against the server's float32 forwards (a verify block, a decode step, a
# chunked context pass): measured at most 2.0e-5 on the tiny model (5.5e-6 over the prompt).
HIDDEN_ATOL = 1e-4


@pytest.mark.parametrize("draft_length", [None, 0, 31], ids=["adaptive", "ar_steps", "full_blocks"])
def test_hidden_states_equal_reference_across_chunks(spec_server_tiny, tiny_checkpoints, draft_length):
    """A 130-token prompt in three context-pass chunks, then rounds (the adaptive policy's, AR
    steps as decode forwards, whole-block drafts): every chunk's rows in the prompt's entry (SGLang's
    AR prefill would keep the last chunk's only), then each output token's row from the verify row
    or decode step that produced it; asking changes no answer."""
    import httpx
    from sglang_helpers import reference_hidden_states

    ids = _prompt_ids(130, salt=3000 + (draft_length or 0) + (draft_length is None))
    url = spec_server_tiny.base_url + "/generate"
    body = httpx.post(url, json=_hidden_body(ids, 24, draft_length, return_hidden_states=True), timeout=300).json()
    plain = httpx.post(url, json=_hidden_body(ids, 24, draft_length), timeout=300).json()  # (the prompt is cached now)
    assert body["output_ids"] == plain["output_ids"]
    ref = reference_hidden_states(tiny_checkpoints["new"], ids + body["output_ids"])
    _assert_hidden_states(body["meta_info"]["hidden_states"], ids, body["output_ids"], ref)
    assert not plain["meta_info"].get("hidden_states")
    assert spec_server_tiny.healthy()


def test_hidden_states_over_a_cached_prefix_and_in_a_mixed_batch(spec_server_tiny, tiny_checkpoints):
    """Six prompts in one batch (one native /generate: they reach the scheduler together), sharing
    a cached 80-token prefix, hidden states asked by some, logprobs by others: each asking request
    gets the rows of its 20 tokens past the prefix and one per output token; the others get none;
    each answers as it does alone. One asks for logprobs from 0, so its prefix match stops at 0
    and the batch's rows are not one width per request."""
    import httpx
    from sglang_helpers import reference_hidden_states

    prefix = _prompt_ids(80, salt=4000)
    prompts = [prefix + _prompt_ids(20, salt=4001 + i) for i in range(6)]
    url = spec_server_tiny.base_url + "/generate"
    httpx.post(url, json=_hidden_body(prefix, 1), timeout=300).raise_for_status()  # caches the prefix
    hidden_asked = [True, False, True, False, True, True]
    logprobs_from = [None, None, 50, 0, None, 0]
    body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            "return_hidden_states": hidden_asked, "return_logprob": [s is not None for s in logprobs_from],
            "logprob_start_len": [-1 if s is None else s for s in logprobs_from]}
    r = httpx.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text[:300]
    for ids, asked, start, got in zip(prompts, hidden_asked, logprobs_from, r.json()):
        alone = httpx.post(url, json=_hidden_body(ids, 12), timeout=300).json()["output_ids"]
        assert got["output_ids"] == alone
        hidden = got["meta_info"].get("hidden_states")
        if not asked:
            assert not hidden
            continue
        cached = 80 if start is None else min(start, 80)  # the match stops at logprob_start_len
        _assert_hidden_states(hidden, ids, alone, reference_hidden_states(tiny_checkpoints["new"], ids + alone),
                              cached=cached)
    assert spec_server_tiny.healthy()


# ---- the demo model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_spec(tmp_path_factory):
    log = tmp_path_factory.mktemp("spec_logs") / "spec_demo.log"
    server = ServeProcess(DEMO_CHECKPOINT, "spec", log, max_running=16)
    try:
        server.wait_ready()
        yield server, Reference(DEMO_CHECKPOINT)
    finally:
        server.stop()


def _server_policy():
    """The policy the demo server runs (its default `--dllm-algorithm-config`: none)."""
    from fast_dvlm_sglang.sglang_plugin.draft_length import policy_from_config

    return policy_from_config({}, 32, "cpu")


def test_demo_greedy_equals_ar_for_16_concurrent_requests(demo_spec):
    """The adaptive policy at batch 16: greedy answers equal AR (up to a near tie) and the
    trained draft is accepted (far fewer forwards than AR)."""
    server, ref = demo_spec
    convs = _demo_prompts()
    stats = _concurrent_equals_ar(server, ref, convs)
    print(f"\ndemo spec: {json.dumps(stats)}")
    assert stats["tokens_per_nfe"] > 2.0


def _sglang_stop_ids(path, tokenizer) -> tuple[int, ...]:
    """What SGLang ends an answer on and what its min_new_tokens bans: the generation config's EOS
    ids, the model config's, and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    for name in ("config.json", "generation_config.json"):
        eos = json.loads((Path(path) / name).read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(i for i in ids if i is not None))


def test_demo_logit_adjustments_equal_ar_with_them(demo_spec):
    """Six concurrent requests: four with a bias that bans the unbiased answer's second token and
    a min_new_tokens past its unbiased end, two with frequency, presence and repetition penalties:
    spec through the server == the reference AR with the same adjustments, token for token, and
    the adjustments changed every answer."""
    server, ref = demo_spec
    stops = _sglang_stop_ids(DEMO_CHECKPOINT, ref.proc.tokenizer)
    convs = [c for c in _demo_prompts() if c[2] >= 7][:6]
    jobs, changed = [], []
    for i, (msgs, url, n) in enumerate(convs):
        plain = ref.run(msgs, n, eos_token_ids=stops).token_ids
        if i < 4:
            options = {"logit_bias": {str(plain[1]): -100.0}, "min_new_tokens": len(plain) + 3}
            ours = {"logit_bias": ((plain[1], -100.0),), "min_new_tokens": len(plain) + 3}
        else:  # the penalties, held past the answer's end so that they have repeats to count
            options = {"frequency_penalty": 0.6, "presence_penalty": 0.4, "repetition_penalty": 1.3,
                       "min_new_tokens": len(plain) + 6}
            ours = dict(options)
        want = ref.run(msgs, n + 8, eos_token_ids=stops, **ours).token_ids
        if i < 4:
            assert plain[1] not in want and len(want) >= len(plain) + 3
        changed.append(want != plain)
        jobs.append((msgs, url, n + 8, options, want))
    assert all(changed)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: generate(server, ref.text(j[0]), image=j[1], max_new_tokens=j[2], **j[3]),
                            jobs))
    for i, (body, job) in enumerate(zip(got, jobs)):
        assert body["output_ids"] == job[4], (i, job[3])


@pytest.mark.parametrize("k", [0, 1, 4, 8, 16, 31])
def test_demo_pinned_draft_length_is_the_reference_decoder(demo_spec, k):
    """`custom_params.draft_length: k`, 8 requests at once: greedy answers equal AR (up to a
    near tie), and every request runs the reference decoder's rounds of width k + 1 (same
    forwards); k = 0 is an AR step per token."""
    from fast_dvlm_sglang.decoding.draft_policy import DEFAULT_COSTS, DraftPolicy

    server, ref = demo_spec
    convs = _demo_prompts()[:8]
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"], fixed_width=k + 1)
    pin = {"custom_params": {"draft_length": k}}
    with cf.ThreadPoolExecutor(len(convs)) as pool:
        bodies = list(pool.map(lambda c: generate(server, ref.text(c[0]), image=c[1], max_new_tokens=c[2], **pin),
                               convs))
    for i, (body, (msgs, _url, n)) in enumerate(zip(bodies, convs)):
        want = ref.ar(msgs, n)
        if not ref.tie_check.check(msgs, want, body["output_ids"], f"k={k} request {i}"):
            continue  # parted at a near tie: forwards not comparable
        _check_metrics(body["meta_info"], len(body["output_ids"]))
        assert set(body["meta_info"]["dllm_draft_length"][1:]) <= set(range(k + 1))
        assert body["meta_info"]["dllm_nfe"][-1] == ref.run(msgs, n, "spec", draft_policy=policy).nfe, (k, i)
        if k == 0:
            assert body["meta_info"]["dllm_nfe"][-1] == len(body["output_ids"]) - 1


def test_sampling_equals_the_reference_decoder_with_the_same_seed(demo_spec):
    """Seeded sampling is the reference speculative decoder's running the server's policy, one
    request at a time (the policy then sees the same single row): same widths, same draws."""
    server, ref = demo_spec
    for (msgs, url, n), seed in zip(_demo_prompts()[:6], range(6)):
        want = ref.run(msgs, n, "spec", draft_policy=_server_policy(), temperature=0.8, top_p=0.9, seed=seed)
        got = generate(server, ref.text(msgs), image=url, max_new_tokens=n, temperature=0.8, top_p=0.9,
                       sampling_seed=seed)
        assert got["output_ids"] == want.token_ids, (seed, n)
        assert got["meta_info"]["dllm_nfe"][-1] == want.nfe


def test_seeded_sampling_with_logit_adjustments_is_the_reference_decoder(demo_spec):
    """Seeded sampling with min_p, logit_bias, min_new_tokens and the three penalties: the server's
    draws are the reference speculative decoder's with the same processors (same widths, same
    generator consumption), request by request."""
    server, ref = demo_spec
    stops = _sglang_stop_ids(DEMO_CHECKPOINT, ref.proc.tokenizer)
    options = [dict(min_p=0.05, logit_bias=((13, -100.0),)), dict(frequency_penalty=0.4, presence_penalty=0.3),
               dict(repetition_penalty=1.3, min_new_tokens=12), dict(min_p=0.1, frequency_penalty=0.2,
                                                                      logit_bias=((491, -2.0),))]
    for (msgs, url, n), seed, ours in zip(_demo_prompts()[:8], range(8), options * 2):
        n = max(n, 16)
        want = ref.run(msgs, n, "spec", draft_policy=_server_policy(), eos_token_ids=stops, temperature=0.8,
                       top_p=0.9, seed=seed, **ours)
        theirs = {k: ({str(t): b for t, b in v} if k == "logit_bias" else v) for k, v in ours.items()}
        got = generate(server, ref.text(msgs), image=url, max_new_tokens=n, temperature=0.8, top_p=0.9,
                       sampling_seed=seed, **theirs)
        assert got["output_ids"] == want.token_ids, (seed, ours)
        assert got["meta_info"]["dllm_nfe"][-1] == want.nfe, (seed, ours)


@pytest.mark.parametrize("k", [0, 4, 31])
def test_sampling_with_a_pinned_draft_length_is_the_reference_decoder(demo_spec, k):
    from fast_dvlm_sglang.decoding.draft_policy import DEFAULT_COSTS, DraftPolicy

    server, ref = demo_spec
    policy = DraftPolicy(block_size=32, cost=DEFAULT_COSTS["cpu"], fixed_width=k + 1)
    convs = _demo_prompts()[:4]
    with cf.ThreadPoolExecutor(len(convs)) as pool:  # batched: a pin makes the rounds batch-independent
        got = list(pool.map(lambda c: generate(server, ref.text(c[1][0]), image=c[1][1], max_new_tokens=c[1][2],
                                               temperature=0.8, top_p=0.9, sampling_seed=c[0],
                                               custom_params={"draft_length": k}), enumerate(convs)))
    for seed, ((msgs, _url, n), body) in enumerate(zip(convs, got)):
        want = ref.run(msgs, n, "spec", draft_policy=policy, temperature=0.8, top_p=0.9, seed=seed)
        assert body["output_ids"] == want.token_ids, (k, seed)
