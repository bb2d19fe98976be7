"""The KV pool under load, through the real server: mdm and spec with a pool far smaller than
the concurrent prompts need (SGLang's dLLM scheduler used to admit a prompt slice that could
never finish, stall every request and crash on its idle leak check; `kv_pressure.py`).

Ten concurrent prompts (~3x the pool). Every request completes with its solo answer (the same server, one request at a time), images,
streams and aborts included; a prompt that can never fit gets a 400 naming the limit; afterwards
the server is healthy and every KV slot is free again or held by the radix tree alone. KV page
size 4 (a page shared by committed and rolled-back slots), chunked prefill at 128 tokens (every
prompt in several context passes), the radix cache on (evicting under pressure)."""

from __future__ import annotations

import concurrent.futures as cf
import random

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from sglang_helpers import image_url, kv_tokens_in_use, wait_for  # noqa: E402

POOL = 1024  # --max-total-tokens: ~3 of the prompts below at once
WORDS = "a red circle on the left the blue square is big what shape is in the image".split()


@pytest.fixture(scope="module", params=["spec", "mdm"])
def small_pool_server(request, tiny_checkpoints, tmp_path_factory):
    from fast_dvlm_sglang.server_process import ServeProcess

    log = tmp_path_factory.mktemp("kv_logs") / f"{request.param}.log"
    server = ServeProcess(tiny_checkpoints["new"], request.param, log, max_running=16,
                          sglang_args=["--max-total-tokens", str(POOL), "--page-size", "4", "--chunked-prefill-size", "128",
                                       "--enable-metrics"])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _model(server) -> str:
    return server.client().models.list().data[0].id


def _chat(server, messages, max_tokens, stream=False):
    client = server.client(timeout=600)
    model = _model(server)
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def _drop_after_first_chunk(server, messages):
    import httpx

    body = {"model": _model(server), "messages": messages, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return


def test_many_long_prompts_through_a_small_pool(small_pool_server):
    import httpx

    server = small_pool_server
    total = httpx.get(server.base_url + "/server_info", timeout=30).json()["max_total_num_tokens"]
    assert total == POOL
    rng = random.Random(7)
    jobs = []
    for i in range(10):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(250, 330)))
        content = [{"type": "text", "text": f"{i}: {text}"}]
        if i % 4 == 1:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url(rng.choice(["red", "blue"]))}})
        jobs.append(([{"role": "user", "content": content}], rng.randint(16, 36), i % 3 == 2))

    solo = [_chat(server, msgs, n) for msgs, n, _ in jobs]

    def run(job):
        msgs, n, stream = job
        return _chat(server, msgs, n, stream=stream)

    with cf.ThreadPoolExecutor(16) as pool:
        dropped = [pool.submit(_drop_after_first_chunk, server, jobs[k][0]) for k in (0, 5)]
        together = list(pool.map(run, jobs))
        for f in dropped:
            f.result()
    assert together == solo
    assert all(finish in ("stop", "length") for _, finish in together)

    # A prompt that fits SGLang's length check but leaves no room for one block can never run:
    # refused, naming the limit.
    r = httpx.post(server.base_url + "/generate", timeout=60,
                   json={"input_ids": [7] * (POOL - 10), "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400 and "--max-total-tokens" in r.text, r.text
    # Streamed, the same refusal comes as a 400 before any event (the HTTP process checks it).
    with httpx.stream("POST", server.base_url + "/generate", timeout=60,
                      json={"input_ids": [7] * (POOL - 10), "sampling_params": {"max_new_tokens": 4},
                            "stream": True}) as r:
        first = r.read()
    assert r.status_code == 400 and b"--max-total-tokens" in first and not first.startswith(b"data:"), first

    assert server.healthy()
    # Every slot is free or held by the radix tree alone (evictable: no request holds it).
    assert wait_for(lambda: kv_tokens_in_use(server) == 0)


# mdm only, and small: the deterministic regression test of the refused-match bug is
# test_spec_scheduler.py::test_a_request_refused_after_its_prefix_matched_is_matched_afresh (this
# load hit it only on some timings; CI cost 261 s at 12 requests of 300 tokens). This is the
# end-to-end check that shared prefixes through a small pool stay correct.
@pytest.mark.parametrize("small_pool_server", ["mdm"], indirect=True)
def test_prompts_sharing_prefixes_through_a_small_pool(small_pool_server):
    """Three long shared prefixes (cached by the solo runs, then evicted by each other), 8
    requests at once with room for max_tokens answers reserved: SGLang's adder refuses some
    incoming requests after their prefix was matched (it reserves each admitted request's
    max_new_tokens; `kv_pressure.admissible` reserves a block), and those must be matched and
    locked afresh when admitted (`kv_pressure._undo_refused_match`). Every answer is its solo
    answer; afterwards every slot is free or evictable and the server is past SGLang's idle
    leak check."""

    server = small_pool_server
    rng = random.Random(11)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(230)) for _ in range(3)]
    jobs = [[{"role": "user", "content": f"{prefixes[i % 3]} question {i}: "
              + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}] for i in range(8)]
    solo = [_chat(server, msgs, 160) for msgs in jobs]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda msgs: _chat(server, msgs, 160), jobs))
    assert together == solo
    assert server.healthy()
    assert wait_for(lambda: kv_tokens_in_use(server) == 0)
    assert server.healthy()  # past SGLang's idle leak check
