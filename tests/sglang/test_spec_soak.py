"""Soak: 200 random requests through `fast-dvlm serve --algorithm spec` (tiny model, chunked
prefill, radix cache on), some sampled, some with a regex (each answer must match it), some with
logit_bias / min_new_tokens / penalties / min_p, some streamed and dropped by the client
mid-answer (SGLang aborts them; half of those with a regex).

Afterwards the KV pool's free count plus the radix tree's evictable tokens equals the pool size:
SGLang's /v1/loads reports 0 tokens in use (`sglang_helpers.kv_tokens_in_use`, the scheduler's
snapshot of the same pool counts, published at once when it goes idle). SGLang's own idle invariant check
(`SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE`, on by default) would also have crashed the
scheduler on a leak, so the server must still be healthy. (SGLang's per-step *busy* check,
`SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY`, cannot be used with dLLM batching: it only counts
requests of the last batch, not dLLM requests waiting between rounds, and reports false leaks.)
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import re

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from sglang_helpers import generate, image_url, kv_tokens_in_use, wait_for  # noqa: E402
from tie_aware_server import ReferenceTieCheck  # noqa: E402

N_REQUESTS = 200
# Regexes every answer completes within 16 tokens (then only EOS is allowed).
GRAMMARS = [r"(yes|no|maybe)", r"[0-9]{1,3}", r"(red|blue) (circle|square)", r"[a-e]{2,4}\."]
WORDS = "a red circle on the left the blue square is big what shape is in the image".split()


def test_soak_200_requests_returns_every_kv_slot(spec_server_tiny, tiny_checkpoints):
    import httpx

    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt
    from fast_dvlm_sglang.decoding import generate as ref_generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat, render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    server = spec_server_tiny
    generate(server, "warm up", max_new_tokens=2)
    assert wait_for(lambda: kv_tokens_in_use(server) == 0), kv_tokens_in_use(server)

    proc = load_processor(tiny_checkpoints["new"])
    rng = random.Random(1234)
    jobs = []
    for i in range(N_REQUESTS):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        url = image_url(rng.choice(["red", "blue", "green"]), rng.choice(["ellipse", "rectangle"]),
                        size=rng.choice([56, 84])) if rng.random() < 0.3 else None
        content = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
        msgs = [{"role": "user", "content": content}]
        kind = rng.choices(["greedy", "sampled", "dropped", "grammar", "options"], weights=[10, 8, 2, 4, 3])[0]
        n = rng.randint(1, 12)
        n = 16 if kind == "grammar" else max(n, 4) if kind == "options" else n  # room for min_new_tokens
        jobs.append((i, msgs, render_chat(proc, msgs, add_generation_prompt=True), url, n, kind))

    def run(job):
        i, _, text, url, n, kind = job
        if kind == "dropped":  # stream, read one chunk, hang up: SGLang aborts the request
            grammar = {"regex": GRAMMARS[i % len(GRAMMARS)]} if i % 2 else {}
            body = {"text": text, "stream": True,
                    "sampling_params": {"max_new_tokens": 64, "temperature": 0, **grammar}}
            if url:
                body["image_data"] = url
            with httpx.stream("POST", server.base_url + "/generate", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
            return None
        sampling = {"temperature": 0.8, "sampling_seed": i} if kind == "sampled" else {}
        if kind == "grammar":  # a regex, greedy or sampled
            sampling = {"regex": GRAMMARS[i % len(GRAMMARS)], **({"temperature": 0.7} if i % 3 == 0 else {})}
        if kind == "options":
            sampling = [{"logit_bias": {"5": 3.0}, "min_new_tokens": 2},
                        {"frequency_penalty": 0.5, "presence_penalty": 0.2, "repetition_penalty": 1.2},
                        {"temperature": 0.9, "min_p": 0.1, "sampling_seed": i}][i % 3]
        return generate(server, text, image=url, max_new_tokens=n, **sampling)

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(run, jobs))

    model = FastDVLMForConditionalGeneration.from_pretrained(tiny_checkpoints["new"]).eval()
    tie_check = ReferenceTieCheck(model, proc, tiny_checkpoints["new"])  # AR's answer, or a near tie
    checked = 0
    for (i, msgs, _, _url, n, kind), body in zip(jobs, results):
        if kind == "dropped":
            continue
        if kind == "grammar":
            regex = GRAMMARS[i % len(GRAMMARS)]
            assert body["meta_info"]["finish_reason"]["type"] == "stop", (i, regex, body["text"])
            assert re.fullmatch(regex, body["text"]), (i, regex, body["text"])
            continue
        assert 1 <= body["meta_info"]["completion_tokens"] <= n
        if kind == "greedy":
            enc = encode_chat(proc, msgs)
            want = ref_generate(model, Prompt(enc.input_ids, enc.pixel_values, enc.image_grid_thw),
                                GenerationConfig(algorithm="ar", max_new_tokens=n)).token_ids
            tie_check.check(msgs, want, body["output_ids"], f"soak request {i}")
            checked += 1
    assert checked > 50

    assert wait_for(lambda: kv_tokens_in_use(server) == 0), kv_tokens_in_use(server)
    assert server.healthy()
    assert "memory leak" not in server.log.read_text().lower()
