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
    ar = ServeProcess(tiny_checkpoints["new"], "ar", logs / "ar.log", max_running=4)
    mdm = ServeProcess(tiny_checkpoints["old"], "mdm", logs / "mdm.log", max_running=8, api_key=API_KEY)
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

    def ref(layout, algorithm, url, max_tokens=MAX_TOKENS):
        key = (layout, algorithm, url, max_tokens)
        if key not in cache:
            path = tiny_checkpoints[layout]
            if (layout, "model") not in cache:
                cache[(layout, "model")] = (FastDVLMForConditionalGeneration.from_pretrained(path).eval(),
                                            load_processor(path))
            model, proc = cache[(layout, "model")]
            enc = encode_chat(proc, _messages(url))
            out = generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                           GenerationConfig(algorithm=algorithm, max_new_tokens=max_tokens))
            cache[key] = (out.token_ids, render_chat(proc, _messages(url), add_generation_prompt=True))
        return cache[key]

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
    "n_gt_1": lambda m: {"model": m, "messages": _messages(image_url()), "n": 3},
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
    import httpx
    import torch

    from fast_dvlm_sglang.attention_masks import causal_mask
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat, render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    server = servers["ar"]
    url = image_url("green", "rectangle") if with_image else None
    messages = _messages(url) if with_image else [
        {"role": "user", "content": "There is a green triangle at the top right. What colour is it?"}]
    path = tiny_checkpoints["new"]
    model, proc = FastDVLMForConditionalGeneration.from_pretrained(path).eval(), load_processor(path)
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
    text_pos = ids[0] != model.config.image_token_id
    assert int((~text_pos).sum()) == (0 if url is None else int(enc.image_grid_thw.prod(-1).sum()) // model.config.spatial_merge_size**2)
    assert [t[1] for t, keep in zip(served, text_pos.tolist()) if keep] == ids[0, text_pos].tolist()

    with torch.no_grad():
        emb = model.embed(ids, enc.pixel_values, enc.image_grid_thw)
        logits = model(emb, model.rope_positions(ids, enc.image_grid_thw), causal_mask(ids.shape[1]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    expected = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    got = torch.tensor([t[0] for t in served[1:]], dtype=torch.float64)
    torch.testing.assert_close(got[text_pos[1:]], expected[text_pos[1:]], atol=2e-4, rtol=0)
    top_expected = logp[:-1].topk(5, dim=-1).values
    top_got = torch.tensor([[t[0] for t in row] for row in meta["input_top_logprobs"][1:]], dtype=torch.float64)
    torch.testing.assert_close(top_got, top_expected, atol=2e-4, rtol=0)
