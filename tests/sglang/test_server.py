"""The real server (`fast-dvlm serve`) with the real openai client, against the reference decoders.

Token-exact comparisons use SGLang's native /generate (it returns output ids) on the same
rendered prompt + image; the OpenAI chat answer must equal that text. Both decode every MDM block
whole and cut it at max_tokens, so budgets inside a block are compared too.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from sglang_helpers import image_url  # noqa: E402

from fast_dvlm_sglang.server_process import ServeProcess  # noqa: E402

API_KEY = "test-key"
MAX_TOKENS = 64
QUESTION = "What shape is in the image?"


def _messages(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def servers(tiny_checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    # new layout + tied embeddings served AR; old layout + untied served MDM (batched, with a key).
    # AR without SGLang's overlap scheduler, as dLLM servers always run: with it, one decode step
    # runs past an answer's end and caches its last token, which spec's seed never has.
    ar = ServeProcess(tiny_checkpoints["new"], "ar", logs / "ar.log", max_running=4,
                      sglang_args=["--disable-overlap-schedule"])
    mdm = ServeProcess(tiny_checkpoints["old"], "mdm", logs / "mdm.log", max_running=8, api_key=API_KEY,
                       sglang_args=["--chunked-prefill-size", "48"])
    try:
        ar.wait_ready()
        mdm.wait_ready()
        yield {"ar": ar, "mdm": mdm}
    finally:
        ar.stop()
        mdm.stop()


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat, render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    cache = {}

    def result(layout, algorithm, url, max_tokens=MAX_TOKENS, eos_token_ids=None):
        """The reference's `GenerationResult` and the rendered prompt text."""
        key = (layout, algorithm, url, max_tokens, eos_token_ids)
        if key not in cache:
            path = tiny_checkpoints[layout]
            if (layout, "model") not in cache:
                cache[(layout, "model")] = (FastDVLMForConditionalGeneration.from_pretrained(path).eval(),
                                            load_processor(path))
            model, proc = cache[(layout, "model")]
            enc = encode_chat(proc, _messages(url))
            out = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                           GenerationConfig(algorithm=algorithm, max_new_tokens=max_tokens,
                                            eos_token_ids=eos_token_ids))
            cache[key] = (out, render_chat(proc, _messages(url), add_generation_prompt=True))
        return cache[key]

    def ref(layout, algorithm, url, max_tokens=MAX_TOKENS):
        out, text = result(layout, algorithm, url, max_tokens)
        return out.token_ids, text

    ref.result = result
    return ref


def _native(server, text, url, max_tokens=MAX_TOKENS):
    import httpx

    r = httpx.post(server.base_url + "/generate", headers=server.headers, timeout=120, json={
        "text": text, "image_data": url, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}})
    r.raise_for_status()
    body = r.json()
    return body.get("output_ids") or body["meta_info"]["output_ids"], body["text"]


def _chat(server, url, **kw):
    return server.client().chat.completions.create(model=server.model, messages=_messages(url),
                                                   max_tokens=MAX_TOKENS, temperature=0, **kw)


@pytest.mark.parametrize("algorithm,layout", [("ar", "new"), ("mdm", "old")])
def test_answer_equals_reference(servers, references, algorithm, layout):
    server, url = servers[algorithm], image_url()
    ref_ids, prompt_text = references(layout, algorithm, url)
    ids, text = _native(server, prompt_text, url)
    assert ids == ref_ids
    chat = _chat(server, url)
    assert chat.choices[0].message.content == text
    assert chat.usage.completion_tokens == len(ref_ids)
    assert chat.usage.prompt_tokens_details.image_tokens > 0


@pytest.mark.parametrize("max_tokens", [5, 33, 50])
def test_mdm_budget_inside_a_block_equals_reference(servers, references, max_tokens):
    """max_tokens not a multiple of the block size (32): the server denoises the last block whole
    and cuts it, and the reference must decode the same tokens (not a shortened last block)."""
    server = servers["mdm"]
    looks = [("red", "ellipse"), ("green", "rectangle"), ("blue", "ellipse"), ("black", "rectangle")]
    for color, shape in looks:
        url = image_url(color, shape)
        ref_ids, prompt_text = references("old", "mdm", url, max_tokens)
        assert _native(server, prompt_text, url, max_tokens)[0] == ref_ids, (color, shape)


def test_mdm_counts_forwards_as_the_reference_and_stops_denoising_where_it_does(servers, references,
                                                                               tiny_checkpoints):
    """`meta_info["dllm_nfe"]` of an MDM answer, per output token, ends at the reference decoder's
    NFE for the same answer: every denoising forward and every block re-encoding after the
    prefill, denoising stopped once a block's filled prefix holds a stop token or reaches
    max_tokens (budgets inside a block, at a block's first token (33), stop_token_ids taken from
    the answer itself at several places)."""
    import httpx

    server = servers["mdm"]
    eos = _eos_ids(tiny_checkpoints["old"])

    def native(text, url, n, **sp):
        r = httpx.post(server.base_url + "/generate", headers=server.headers, timeout=120, json={
            "text": text, "image_data": url, "sampling_params": {"max_new_tokens": n, "temperature": 0, **sp}})
        r.raise_for_status()
        return r.json()

    saved = 0
    for color, shape in [("red", "ellipse"), ("blue", "rectangle")]:
        url = image_url(color, shape)
        for n in (5, 33, 64):
            want, text = references.result("old", "mdm", url, n)
            body = native(text, url, n)
            nfe = body["meta_info"]["dllm_nfe"]
            assert body["output_ids"] == want.token_ids, (color, n)
            assert len(nfe) == len(want.token_ids) and nfe == sorted(nfe), (color, n)
            assert nfe[-1] == want.nfe, (color, n, nfe[-1], want.nfe)
        raw = references.result("old", "mdm", url, 64)[0].token_ids
        for t in sorted({raw[2], raw[20], raw[40]}):
            want, text = references.result("old", "mdm", url, 64, eos_token_ids=tuple(sorted(eos | {t})))
            body = native(text, url, 64, stop_token_ids=[t])
            assert body["output_ids"] == want.token_ids, (color, t)
            assert body["meta_info"]["dllm_nfe"][-1] == want.nfe, (color, t)
            assert body["meta_info"]["finish_reason"]["type"] == "stop"
            saved += references.result("old", "mdm", url, 64)[0].nfe - want.nfe
    assert saved > 0  # the stops cut answers short: fewer forwards than the uncut answers'


def test_mdm_logit_bias_equals_the_reference_with_it(servers, references, tiny_checkpoints):
    """MDM applies `logit_bias` at every position of every denoising step and to each block's
    first token, as the reference decoder does: a bias banning two tokens of the unbiased answer
    and favouring a third gives the reference's biased answer, which differs from the plain one."""
    import httpx

    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, SamplingParams, generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    server = servers["mdm"]
    path = tiny_checkpoints["old"]
    model, proc = FastDVLMForConditionalGeneration.from_pretrained(path).eval(), load_processor(path)
    for color in ("red", "green"):
        url = image_url(color, "ellipse")
        plain, prompt_text = references("old", "mdm", url, 40)
        bias = {plain[0]: -100.0, plain[3]: -100.0, 17: 4.0}
        enc = encode_chat(proc, _messages(url))
        want = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw), GenerationConfig(
            algorithm="mdm", max_new_tokens=40, sampling=SamplingParams(logit_bias=tuple(bias.items())))).token_ids
        assert want != plain and plain[0] not in want and plain[3] not in want
        r = httpx.post(server.base_url + "/generate", headers=server.headers, timeout=120, json={
            "text": prompt_text, "image_data": url, "sampling_params": {
                "max_new_tokens": 40, "temperature": 0, "logit_bias": {str(k): v for k, v in bias.items()}}})
        r.raise_for_status()
        assert r.json()["output_ids"] == want, color


@pytest.mark.parametrize("algorithm", ["ar", "mdm"])
def test_stream_equals_non_stream(servers, algorithm):
    server, url = servers[algorithm], image_url("blue", "rectangle")
    whole = _chat(server, url).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in _chat(server, url, stream=True) if c.choices]
    assert "".join(parts) == whole


def test_concurrent_requests_get_solo_answers(servers, references):
    server = servers["mdm"]
    colors = ["red", "green", "blue", "black", "yellow", "purple", "orange", "gray"]
    urls = [image_url(c, "ellipse" if i % 2 else "rectangle") for i, c in enumerate(colors)]
    solo = [references("old", "mdm", u) for u in urls]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: _native(server, a[1][1], a[0])[0], zip(urls, solo)))
    assert got == [s[0] for s in solo]


def _post(server, body, raw=None, key=API_KEY):
    import httpx

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.base_url + "/v1/chat/completions", headers=headers, timeout=60,
                      content=raw if raw is not None else json.dumps(body))


BAD = {
    "broken_base64": lambda m: {"model": m, "messages": _messages("data:image/png;base64,@@not-base64@@")},
    "not_an_image": lambda m: {"model": m, "messages": _messages("data:image/png;base64,aGVsbG8gd29ybGQ=")},
    "negative_max_tokens": lambda m: {"model": m, "messages": _messages(image_url()), "max_tokens": -5},
    "unknown_model": lambda m: {"model": "no-such-model", "messages": _messages(image_url())},
    "prompt_too_long": lambda m: {"model": m, "messages": [{"role": "user", "content": "circle " * 5000}]},
}


@pytest.mark.parametrize("case", [*BAD, "malformed_json"])
def test_bad_request_is_4xx_and_server_stays_healthy(servers, case):
    server = servers["mdm"]
    if case == "malformed_json":
        r = _post(server, None, raw=b'{"model": "x", "messages": [')
    else:
        r = _post(server, BAD[case](server.model))
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    err = body.get("error", body)
    assert isinstance(err, dict) and err.get("message"), body
    assert server.healthy()


@pytest.mark.parametrize("algorithm", ["ar", "mdm"])
def test_empty_prompt_is_refused_and_the_server_lives(servers, algorithm):
    """An empty text tokenizes to 0 tokens (no BOS) and, reaching the scheduler through /generate,
    killed the server whatever the algorithm (AR: SGLang's attention reshapes 0 query rows): 400,
    streamed or not, alone or in a batch."""
    import httpx

    server = servers[algorithm]
    headers = {"Authorization": f"Bearer {API_KEY}"} if algorithm == "mdm" else {}
    ours, sglangs = "prompt is empty", "Prompt cannot be empty"  # SGLang's completions handler checks too
    for path, body, needle in [
            ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}}, ours),
            ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}, "stream": True}, ours),
            ("/generate", {"text": ["a circle", ""], "sampling_params": {"max_new_tokens": 4}}, ours),
            ("/v1/completions", {"model": server.model, "prompt": "", "max_tokens": 4}, sglangs),
            ("/v1/completions", {"model": server.model, "prompt": "", "max_tokens": 4, "stream": True}, sglangs)]:
        r = httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 400 and needle in r.text, (path, body, r.status_code, r.text[:300])
        assert server.healthy(), (path, body)
    one_token = httpx.post(server.base_url + "/generate", headers=headers, timeout=60,
                           json={"text": "a", "sampling_params": {"max_new_tokens": 4}})
    assert one_token.status_code == 200, one_token.text[:300]


MDM_REFUSED = {
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
                    "constrained decoding"),
    "regex": ({"regex": "[a-z]+"}, "constrained decoding"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "min_tokens": ({"min_tokens": 3}, "min_new_tokens"),
    "frequency_penalty": ({"frequency_penalty": 0.5}, "frequency_penalty"),
    "repetition_penalty": ({"repetition_penalty": 1.3}, "repetition_penalty"),
    "return_hidden_states": ({"return_hidden_states": True}, "return_hidden_states"),
}


@pytest.mark.parametrize("case", list(MDM_REFUSED))
def test_mdm_refuses_what_it_cannot_apply(servers, case):
    """MDM unmasks by confidence, not left to right: a grammar, logprobs, min_new_tokens or a
    penalty has no sampling step to apply at, and a token no row that produced it alone (hidden
    states), so it is a 400 naming the option (not a silently unconstrained answer, or one
    without the states asked for); neutral values (penalty 0, repetition 1) pass."""
    server = servers["mdm"]
    extra, needle = MDM_REFUSED[case]
    r = _post(server, {"model": server.model, "messages": _messages(image_url()), "max_tokens": 8, **extra})
    assert r.status_code == 400, r.text[:300]
    message = r.json().get("error", r.json())["message"]
    assert needle in message and "mdm" in message, message
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 0.7}
    assert _post(server, {"model": server.model, "messages": _messages(image_url()), "max_tokens": 8,
                          **neutral}).status_code == 200
    assert server.healthy()


@pytest.mark.parametrize("algorithm", ["ar", "mdm"])
def test_n_choices(servers, algorithm):
    """`n > 1` is SGLang's own fan-out into n requests (after a max_new_tokens=0 warm-up that caches
    the prompt), for every algorithm: greedy choices are all the n=1 answer."""
    server = servers[algorithm]
    client = server.client()
    one = client.chat.completions.create(model=server.model, messages=_messages(image_url()), max_tokens=40,
                                         temperature=0)
    r = client.chat.completions.create(model=server.model, messages=_messages(image_url()), n=3,
                                       max_tokens=40, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {one.choices[0].message.content}
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert server.healthy()


def test_api_key_enforced(servers):
    server = servers["mdm"]
    body = {"model": server.model, "messages": _messages(image_url()), "max_tokens": 32}
    assert _post(server, body, key=None).status_code == 401
    assert _post(server, body, key="wrong").status_code == 401
    assert _post(server, body).status_code == 200


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_prompt_logprobs_equal_reference(servers, tiny_checkpoints, with_image):
    """Model parity through the engine: SGLang's causal prefill (our model class, its weight
    loading and M-RoPE positions) gives the reference model's log-probabilities at every prompt
    position, in float32. (Blocks over a cached prefix are checked token for token above.)"""
    import json

    import httpx
    import torch
    from sglang_helpers import reference_log_probs

    from fast_dvlm_sglang.processing import encode_chat, render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    server = servers["ar"]
    url = image_url("green", "rectangle") if with_image else None
    messages = _messages(url) if with_image else [
        {"role": "user", "content": "There is a green triangle at the top right. What colour is it?"}]
    path = tiny_checkpoints["new"]
    config, proc = json.loads((path / "config.json").read_text()), load_processor(path)
    enc = encode_chat(proc, messages)
    body = {"text": render_chat(proc, messages, add_generation_prompt=True), "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 5,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    if url:
        body["image_data"] = url
    r = httpx.post(server.base_url + "/generate", json=body, timeout=120)
    r.raise_for_status()
    meta = r.json()["meta_info"]
    served = meta["input_token_logprobs"]  # [(logprob, token id, text)], the first has no logprob
    ids = torch.tensor([enc.input_ids])
    # SGLang replaces image pad ids by a per-image hash value inside the engine: compare the rest.
    text_pos = ids[0] != config["image_token_id"]
    merge = config["vision_config"]["spatial_merge_size"]
    assert int((~text_pos).sum()) == (0 if url is None else int(enc.image_grid_thw.prod(-1).sum()) // merge**2)
    assert [t[1] for t, keep in zip(served, text_pos.tolist()) if keep] == ids[0, text_pos].tolist()

    logp = reference_log_probs(path, enc.input_ids, enc.pixel_values, enc.image_grid_thw)
    expected = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    got = torch.tensor([t[0] for t in served[1:]], dtype=torch.float64)
    torch.testing.assert_close(got[text_pos[1:]], expected[text_pos[1:]], atol=2e-4, rtol=0)
    top_expected = logp[:-1].topk(5, dim=-1).values
    top_got = torch.tensor([[t[0] for t in row] for row in meta["input_top_logprobs"][1:]], dtype=torch.float64)
    torch.testing.assert_close(top_got, top_expected, atol=2e-4, rtol=0)


# ---- the radix (prefix) cache: a five-turn conversation with images --------------------------------
# Contents unique to this test, so no other test's prompts sit in the tree past the shared prefix.
FIVE_TURNS = [
    [{"type": "image_url", "image_url": {"url": image_url("teal", "ellipse", size=84)}},
     {"type": "text", "text": "What shape is in this picture?"}],
    "And what color is it?",
    [{"type": "image_url", "image_url": {"url": image_url("navy", "rectangle", size=84)}},
     {"type": "image_url", "image_url": {"url": image_url("olive", "ellipse", size=56)}},
     {"type": "text", "text": "And in these two?"}],
    "the blue square is big " * 6 + "Which one is bigger?",
    "Say it once more.",
]
TURN_TOKENS = 24


def _converse(server, reference, vision_images=None):
    """The five turns through native /generate (the rendered chat, its images); each answer is
    checked by `reference(messages, output_ids)` and becomes the next turn's history. Returns per
    turn: (prompt ids, output ids, cached tokens, images the vision tower encoded)."""
    from sglang_helpers import generate

    from fast_dvlm_sglang.processing import encode_chat, render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    proc = load_processor(server.model)
    messages, urls, turns = [], [], []
    for content in FIVE_TURNS:
        messages.append({"role": "user", "content": content})
        urls += [p["image_url"]["url"] for p in content if p["type"] == "image_url"] if isinstance(content, list) else []
        before = vision_images() if vision_images else 0
        body = generate(server, render_chat(proc, messages, add_generation_prompt=True), image=list(urls) or None,
                        max_new_tokens=TURN_TOKENS)
        reference(messages, body["output_ids"])
        encoded = (vision_images() - before) if vision_images else None
        turns.append((list(encode_chat(proc, messages).input_ids), body["output_ids"],
                      body["meta_info"]["cached_tokens"], encoded))
        messages.append({"role": "assistant", "content": body["text"]})
    return turns


def _counter(server, name: str) -> float:
    from sglang_helpers import prometheus_value

    try:
        return prometheus_value(server, name)
    except KeyError:  # not created before the first increment
        return 0.0


def _common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _check_turn_hits(turns, answer_cached: bool):
    """Turn t > 1 finds the previous turn's prompt in the cache, and (`answer_cached`) its answer
    too, up to where the re-rendered history stops matching (the last answer token may have no
    KV: no forward ever reads it); it never claims a token it does not share."""
    # (turn 1 may find the chat template's opening in the tree: other requests share it)
    for (prev_ids, prev_out, _, _), (ids, _, cached, _) in zip(turns, turns[1:]):
        shared = _common_prefix(ids, prev_ids + prev_out)
        assert cached <= min(shared, len(ids) - 1)
        assert cached >= min(_common_prefix(ids, prev_ids), len(ids) - 1)
        if answer_cached:
            assert cached >= min(shared - 1, len(ids) - 1)


def test_five_turn_conversation_hits_the_prefix_cache(servers, spec_server_tiny, tiny_checkpoints, references):
    """Radix cache on (the default) for all three algorithms: every turn's answer equals the
    reference decoder's (which has no cache), the history is found in the cache, an image already
    in the cache is not encoded again, and spec computes the same prompt tokens as AR."""
    from tie_aware_server import ReferenceTieCheck

    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    def exact(layout, algorithm):
        model = FastDVLMForConditionalGeneration.from_pretrained(tiny_checkpoints[layout]).eval()
        proc = load_processor(tiny_checkpoints[layout])

        def check(messages, output_ids):
            enc = encode_chat(proc, messages)
            want = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                            GenerationConfig(algorithm=algorithm, max_new_tokens=TURN_TOKENS)).token_ids
            assert output_ids == want, (algorithm, len(messages))
        return check, model, proc

    ar_check, model, proc = exact("new", "ar")
    mdm_check, _, _ = exact("old", "mdm")
    ties = ReferenceTieCheck(model, proc, tiny_checkpoints["new"])

    def spec_check(messages, output_ids):
        enc = encode_chat(proc, messages)
        want = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                        GenerationConfig(algorithm="ar", max_new_tokens=TURN_TOKENS)).token_ids
        ties.check(messages, want, output_ids, f"turn {len(messages)}")

    ar = _converse(servers["ar"], ar_check)
    mdm = _converse(servers["mdm"], mdm_check)
    spec = _converse(spec_server_tiny, spec_check,
                     vision_images=lambda: _counter(spec_server_tiny, "fast_dvlm:vision_encoder_images_total"))
    _check_turn_hits(ar, answer_cached=True)
    _check_turn_hits(spec, answer_cached=True)
    _check_turn_hits(mdm, answer_cached=False)  # its last block's KV is bidirectional: not cached
    # The vision tower runs once per new image: turn 1 brings one, turn 3 two.
    assert [t[3] for t in spec] == [1, 0, 2, 0, 0]
    # Same conversation (spec answers as AR does) -> the same prompt tokens computed from turn 2
    # on (turn 1 may hit other tests' requests), give or take the last answer token, whose KV
    # spec has when a round committed it as an accepted draft (not as its seed).
    if [t[1] for t in spec] == [t[1] for t in ar]:
        for (ids, _, cached_ar, _), (_, _, cached_spec, _) in zip(ar[1:], spec[1:]):
            assert 0 <= cached_spec - cached_ar <= 1, (len(ids), cached_ar, cached_spec)


# ---- one stop rule for the three algorithms -----------------------------------------------------
def _eos_ids(checkpoint) -> set[int]:
    """SGLang's EOS set for a checkpoint: config + generation_config eos ids, and the tokenizer's."""
    from fast_dvlm_sglang.tokenizer import load_tokenizer

    ids = set()
    for name in ("config.json", "generation_config.json"):
        path = checkpoint / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids |= set(value if isinstance(value, list) else [] if value is None else [value])
    tok = load_tokenizer(checkpoint)
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _sglang_stop(raw, eos, stop_ids, ignore_eos, max_new):
    """SGLang's AR rule (`Req._check_token_based_finish`): unless ignore_eos, the first token in
    stop_token_ids or the EOS set ends the answer (kept); else max_new_tokens."""
    for i, t in enumerate(raw[:max_new]):
        if not ignore_eos and (t in stop_ids or t in eos):
            return raw[: i + 1], {"type": "stop", "matched": t}
    return raw[:max_new], {"type": "length", "length": max_new}


@pytest.mark.parametrize("algorithm", ["ar", "mdm", "spec"])
def test_stops_are_decided_by_sglangs_rule(servers, spec_server_tiny, tiny_checkpoints, algorithm):
    """EOS ids, stop_token_ids, ignore_eos and stop strings end an mdm or spec answer exactly where
    SGLang's AR rule ends the same tokens, on /generate and on the OpenAI endpoints. (A stop
    never changes the tokens before it, greedy: so each algorithm's own answer with every stop
    disabled is the ground truth its stopped answers are cut from.)"""
    from sglang_helpers import generate

    server = spec_server_tiny if algorithm == "spec" else servers[algorithm]
    checkpoint = tiny_checkpoints["old" if algorithm == "mdm" else "new"]
    eos, n = _eos_ids(checkpoint), 40
    prompt = "the blue square is big. What shape is in the image?"
    raw = generate(server, prompt, max_new_tokens=n, ignore_eos=True)["output_ids"]
    assert len(raw) == n
    picks = sorted({raw[3], raw[n // 2], raw[-1]})
    cases = [dict(), dict(ignore_eos=True, stop_token_ids=picks)] + [dict(stop_token_ids=[t]) for t in picks]
    for case in cases:
        want, reason = _sglang_stop(raw, eos, set(case.get("stop_token_ids", [])), case.get("ignore_eos", False), n)
        body = generate(server, prompt, max_new_tokens=n, **case)
        assert body["output_ids"] == want, case
        assert body["meta_info"]["finish_reason"] == reason, case

    # A stop string: the text is cut before it, the reason is "stop"; same on /v1/completions.
    from fast_dvlm_sglang.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    full = generate(server, prompt, max_new_tokens=n, ignore_eos=True)["text"]
    stop = tok.decode(raw[n // 2: n // 2 + 2], skip_special_tokens=True).strip() or full[-3:]
    assert stop and stop in full
    expected_text = full[: full.index(stop)]
    body = generate(server, prompt, max_new_tokens=n, ignore_eos=True, stop=[stop])
    assert body["text"] == expected_text and body["meta_info"]["finish_reason"]["type"] == "stop"
    client = server.client()
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected_text and done.choices[0].finish_reason == "stop"
    t = picks[0]
    want, _ = _sglang_stop(raw, eos, {t}, False, n)
    done = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"stop_token_ids": [t]})
    assert done.usage.completion_tokens == len(want) and done.choices[0].finish_reason == "stop"
