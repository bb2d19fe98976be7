"""Structured outputs with `FastDVLMSpeculative` (`structured_output.py`).

The walk and the rollback against SGLang's real xgrammar matcher object (`XGrammarGrammar`) on
the demo tokenizer: every mask the walk fills is the mask a fresh matcher gives after the same
tokens, and after any round's commit the matcher stands exactly where a matcher fed the
committed output stands. Then through the real servers (demo model, CPU): spec == SGLang's AR
with the same grammar (json_schema, regex, ebnf, structural_tag; images; 16 concurrent), JSON
answers validate against their schema, streaming, a regex that forces the end mid-block, a
grammar that forbids what the unconstrained answer drafts, aborts mid-answer with the KV pool
returned, and a grammar queue that actually drains under dLLM scheduling.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re

import pytest

pytestmark = [pytest.mark.sglang]

from sglang_helpers import generate, kv_tokens_in_use, wait_for  # noqa: E402

from fast_dvlm_sglang.demo import DEMO_CHECKPOINT  # noqa: E402
from fast_dvlm_sglang.sglang_plugin import structured_output  # noqa: E402

CHOICE = r"(yes|no|maybe)"
COUNT = r"There (is one|are (two|three|four)) shapes?\."
SHAPES_SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "color": {"type": "string", "enum": ["red", "green", "blue", "yellow"]},
        "count": {"type": "integer", "enum": [0, 1, 2, 3, 4]},
        "present": {"type": "boolean"},
    },
    "required": ["shape", "color", "count", "present"],
    "additionalProperties": False,
}
ANSWER_EBNF = 'root ::= ("Yes" | "No") ", there " ("is" | "are") " " [a-z ]{1,30} "."'


# ---- the walk against SGLang's matcher ------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler():
    import xgrammar as xgr

    from fast_dvlm_sglang.tokenizer import load_processor

    tok = load_processor(DEMO_CHECKPOINT).tokenizer
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    return xgr.GrammarCompiler(info), len(tok)


def _matcher(compiler, pattern: str):
    import xgrammar as xgr
    from sglang.srt.constrained.xgrammar_backend import MAX_ROLLBACK_TOKENS, XGrammarGrammar

    comp, vocab = compiler
    ctx = comp.compile_regex(pattern)
    return XGrammarGrammar(xgr.GrammarMatcher(ctx, max_rollback_tokens=MAX_ROLLBACK_TOKENS), vocab, ctx, None)


def _mask_after(compiler, pattern: str, tokens: list[int]):
    """The mask of a fresh matcher fed `tokens`, and whether it terminated."""
    g = _matcher(compiler, pattern)
    for t in tokens:
        g.accept_token(t)
    if g.is_terminated():  # xgrammar refuses to fill a terminated matcher's mask
        return None, True
    mask = structured_output.allocate(g, 1, g.vocab_size)
    g.fill_vocab_mask(mask, 0)
    return mask[0].clone(), False


def _allowed(mask_row, vocab: int) -> list[int]:
    return [t for t in range(vocab) if structured_output.allows(mask_row[None], 0, t)]


def test_allows_reads_every_bit_of_xgrammars_bitmask(compiler):
    g = _matcher(compiler, r"[a-z]+")
    mask = structured_output.allocate(g, 1, g.vocab_size)
    g.fill_vocab_mask(mask, 0)
    bits = [(int(mask[0, t // 32]) & 0xFFFFFFFF) >> (t % 32) & 1 for t in range(g.vocab_size)]
    assert [structured_output.allows(mask, 0, t) for t in range(g.vocab_size)] == [bool(b) for b in bits]
    assert 0 < sum(bits) < g.vocab_size


def test_walk_skips_forbidden_candidates_and_fills_each_positions_mask(compiler):
    g = _matcher(compiler, CHOICE)
    vocab = g.vocab_size
    first_allowed = _allowed(_mask_after(compiler, CHOICE, [])[0], vocab)
    forbidden = next(t for t in range(vocab) if t not in first_allowed)
    mask = structured_output.allocate(g, 8, vocab)
    drafts, terminated = structured_output.walk(g, [[forbidden, first_allowed[-1]]] + [list(range(vocab))] * 4,
                                                width=5, mask=mask, start=2)
    assert drafts[0] == first_allowed[-1]
    for j in range(len(drafts) + (0 if terminated else 1)):
        want, _ = _mask_after(compiler, CHOICE, drafts[:j])
        assert mask[2 + j].equal(want), j
    assert mask[0].eq(-1).all() and mask[1].eq(-1).all()  # other rows: every token allowed


def _stop_ids(compiler) -> set[int]:
    from fast_dvlm_sglang.tokenizer import load_processor

    return {load_processor(DEMO_CHECKPOINT).tokenizer.eos_token_id}


@pytest.mark.parametrize("seed", range(4))
def test_only_allowed_finds_the_single_allowed_token(seed):
    import torch

    rng = random.Random(seed)
    vocab = rng.choice([40, 64, 200, 512])
    words = -(-vocab // 32)
    for bits in (0, 1, 1, 1, 2, 7):
        tokens = rng.sample(range(vocab), bits)
        row = 0
        for t in tokens:
            row |= 1 << t
        mask = torch.tensor([[((row >> (32 * w)) & 0xFFFFFFFF) - (1 << 32) * (((row >> (32 * w)) >> 31) & 1)
                              for w in range(words)]], dtype=torch.int32)
        assert [t for t in range(vocab) if structured_output.allows(mask, 0, t)] == sorted(tokens)
        assert structured_output.only_allowed(mask, 0) == (tokens[0] if bits == 1 else None)


def test_walk_takes_a_forced_token_the_candidates_miss(compiler):
    """Where the grammar allows one token only, the draft is that token whatever the draft pass
    proposed (the verify pass can choose nothing else): with no candidates at all the walk runs
    through exactly the grammar's forced tokens."""
    pattern = r"qzxj(circle|square)"
    fresh, forced = _matcher(compiler, pattern), []
    one = structured_output.allocate(fresh, 1, fresh.vocab_size)
    while True:
        fresh.fill_vocab_mask(one, 0)
        token = structured_output.only_allowed(one, 0)
        if token is None:
            break
        fresh.accept_token(token)
        forced.append(token)
    assert len(forced) >= 2  # the literal's tokens
    g = _matcher(compiler, pattern)
    mask = structured_output.allocate(g, 16, g.vocab_size)
    drafts, terminated = structured_output.walk(g, [[]] * 15, width=16, mask=mask, start=0)
    assert drafts == forced and not terminated


def test_walk_stops_where_no_candidate_is_allowed(compiler):
    g = _matcher(compiler, CHOICE)
    vocab = g.vocab_size
    allowed = _allowed(_mask_after(compiler, CHOICE, [])[0], vocab)
    forbidden = [t for t in range(vocab) if t not in allowed][:3]
    mask = structured_output.allocate(g, 4, vocab)
    drafts, terminated = structured_output.walk(g, [forbidden, list(range(vocab))], width=3, mask=mask, start=0)
    assert drafts == [] and not terminated
    assert mask[0].equal(_mask_after(compiler, CHOICE, [])[0])
    assert mask[1].eq(-1).all()  # never reached
    assert structured_output.acceptable_drafts(0, False) == 0


def test_a_terminating_draft_is_never_accepted_as_a_draft(compiler):
    """`(yes|no|maybe)` then EOS: a walk through a whole answer and its stop token ends there, and
    the round may accept the drafts before the stop only (the stop comes as the verify's seed)."""
    g = _matcher(compiler, CHOICE)
    vocab = g.vocab_size
    answer = _greedy_path(compiler, CHOICE, "no")
    eos = sorted(_stop_ids(compiler))
    mask = structured_output.allocate(g, 16, vocab)
    drafts, terminated = structured_output.walk(g, [[t] for t in answer] + [eos] + [[0]] * 4,
                                                width=len(answer) + 4, mask=mask, start=0)
    assert drafts == answer + eos[:1] and terminated
    assert structured_output.acceptable_drafts(len(drafts), terminated) == len(answer)
    structured_output.commit(g, len(drafts), len(answer), eos[0])  # the verify's seed: the stop
    assert g.is_terminated()


def _greedy_path(compiler, pattern: str, text: str) -> list[int]:
    """`text`'s tokens, checked to be a path of `pattern`'s matcher."""
    from fast_dvlm_sglang.tokenizer import load_processor

    ids = load_processor(DEMO_CHECKPOINT).tokenizer.encode(text, add_special_tokens=False)
    g = _matcher(compiler, pattern)
    for t in ids:
        g.accept_token(t)
    return ids


def _random_path(compiler, pattern: str, prefix: list[int], n: int, rng) -> list[int]:
    """Up to `n` random allowed tokens after `prefix` (a grammatical draft), stopping at the end."""
    g = _matcher(compiler, pattern)
    for t in prefix:
        g.accept_token(t)
    path = []
    mask = structured_output.allocate(g, 1, g.vocab_size)
    while len(path) < n and not g.is_terminated():
        g.fill_vocab_mask(mask, 0)
        t = rng.choice(_allowed(mask[0], g.vocab_size))
        g.accept_token(t)
        path.append(t)
    return path


@pytest.mark.parametrize("seed", range(6))
def test_rounds_of_walks_and_commits_keep_the_matcher_on_the_committed_output(compiler, seed):
    """Random rounds: random candidate lists (grammatical or not), a random accepted count up to
    the walk, a random allowed seed: after every commit the matcher's mask and termination equal
    those of a fresh matcher fed the committed output (the rollback invariant), and the masks
    the walk filled are a fresh matcher's after the drafts before each position."""
    pattern = r"[a-c]{2,6}(x|yy)[0-9]{1,8}"
    rng = random.Random(seed)
    g = _matcher(compiler, pattern)
    vocab = g.vocab_size
    committed: list[int] = []
    walks: list[int] = []
    for _round in range(12):
        if g.is_terminated():
            break
        width = rng.randint(1, 9)
        # Candidates: random tokens, most positions also offering a grammatical draft
        path = _random_path(compiler, pattern, committed, width - 1, rng)
        candidates = []
        for j in range(width - 1):
            pool = rng.sample(range(vocab), 3)
            if j < len(path) and rng.random() < 0.85:
                pool.insert(rng.randint(0, 3), path[j])
            candidates.append(pool)
        mask = structured_output.allocate(g, width, vocab)
        drafts, terminated = structured_output.walk(g, candidates, width, mask, 0)
        for j in range(len(drafts) + (0 if terminated else 1)):
            want, _ = _mask_after(compiler, pattern, committed + drafts[:j])
            assert mask[j].equal(want), (seed, _round, j)
        k = rng.randint(0, structured_output.acceptable_drafts(len(drafts), terminated))
        seed_token = rng.choice(_allowed(mask[k], vocab))
        structured_output.commit(g, len(drafts), k, seed_token)
        committed += drafts[:k] + [seed_token]
        walks.append(len(drafts))
        want, done = _mask_after(compiler, pattern, committed)
        assert g.is_terminated() == done
        if not done:
            got = structured_output.allocate(g, 1, vocab)
            g.fill_vocab_mask(got, 0)
            assert got[0].equal(want), (seed, _round)
    assert committed and max(walks) > 1  # rollbacks of real walks were exercised


def test_commit_refuses_more_accepted_drafts_than_walked(compiler):
    g = _matcher(compiler, CHOICE)
    with pytest.raises(ValueError, match="accepted 2 drafts, the grammar walked 1"):
        structured_output.commit(g, 1, 2, 0)


# ---- through the servers (demo model) --------------------------------------------------------------
DESCRIBE = (r"There (is one shape|are (two|three|four) shapes) on a (black|white) background\."
            r"( (Top left|Top|Top right|Left|Center|Right|Bottom left|Bottom|Bottom right): [a-z ]+\.){9}")
STRUCTURAL_TAG = json.dumps({"type": "structural_tag", "triggers": ["<json>"], "structures": [
    {"begin": "<json>", "schema": SHAPES_SCHEMA, "end": "</json>"}]})


@pytest.fixture(scope="module")
def servers(demo_spec_and_ar):
    return demo_spec_and_ar


@pytest.fixture(scope="module")
def prompts():
    """Demo conversations (most with an image) rendered as the server's chat template renders them."""
    from fast_dvlm_sglang.demo import shapes
    from fast_dvlm_sglang.processing import render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    proc = load_processor(DEMO_CHECKPOINT)
    out = []
    for sample in shapes.make_split(2468, 64):
        url = _png_url(sample.image) if sample.image is not None else None
        out.append((_openai_messages(sample.prompt_messages, url),
                    render_chat(proc, sample.prompt_messages, add_generation_prompt=True), url, sample.kind))
    return out


def _openai_messages(messages, url):
    """The conversation with its image as an OpenAI `image_url` part."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": url}} if p["type"] == "image" else p for p in content]
        out.append({**m, "content": content})
    return out


def _png_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _option(i: int, kind: str) -> dict:
    """A grammar for request i: the description regex for descriptions, else one of the others."""
    if kind == "describe" and i % 2 == 0:
        return {"regex": DESCRIBE}
    return [{"json_schema": json.dumps(SHAPES_SCHEMA)}, {"regex": COUNT}, {"regex": CHOICE}, {"ebnf": ANSWER_EBNF},
            {"structural_tag": STRUCTURAL_TAG}][i % 5]


def _conforms(text: str, option: dict) -> bool:
    import jsonschema

    if "json_schema" in option:
        try:
            jsonschema.validate(json.loads(text), json.loads(option["json_schema"]))
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if "regex" in option:
        return re.fullmatch(option["regex"], text) is not None
    if "ebnf" in option:
        return re.fullmatch(r'(Yes|No), there (is|are) [a-z ]{1,30}\.', text) is not None
    return True  # structural_tag: free text until its trigger


def test_constrained_spec_equals_ar_for_16_concurrent_requests(servers, prompts):
    """json_schema, regex, ebnf and structural_tag requests (images on most), 16 at once on the
    spec server: each answer is SGLang AR's answer under the same grammar, token for token, and
    conforms to it; the in-distribution description regex keeps speculation paying off."""
    spec, ar = servers
    jobs = [(text, url, _option(i, kind), 64 if kind == "describe" else 24)
            for i, (_msgs, text, url, kind) in enumerate(prompts[:16])]
    assert {next(iter(o)) for _, _, o, _ in jobs} == {"json_schema", "regex", "ebnf", "structural_tag"}

    def run(server, job):
        text, url, option, n = job
        return generate(server, text, image=url, max_new_tokens=n, **option)

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: run(spec, j), jobs))
    want = [run(ar, j) for j in jobs]
    tokens = nfe = 0
    for i, (g, w, job) in enumerate(zip(got, want, jobs)):
        assert g["output_ids"] == w["output_ids"], (i, job[2], g["text"], w["text"])
        if g["meta_info"]["finish_reason"]["type"] == "stop":
            assert _conforms(g["text"], job[2]), (i, job[2], g["text"])
        if job[2].get("regex") == DESCRIBE:
            tokens += len(g["output_ids"])
            nfe += g["meta_info"]["dllm_nfe"][-1]
    assert tokens / nfe > 1.5, (tokens, nfe)


SENTENCES = r"[A-Z][A-Za-z0-9 ,:'-]*[.?!]( [A-Z][A-Za-z0-9 ,:'-]*[.?!])*"


def test_drafted_stops_of_a_permissive_grammar_end_answers_where_ars_end(servers):
    """A regex every demo answer matches: drafts run through whole sentences and often through the
    answer's stop token, which terminates the matcher mid-walk; the round must roll that back and
    let the verify pass choose the stop (the bench's conversations, where a commit that skipped
    the terminated matcher once ended two answers mid-word). 24 requests, 16 at once, each
    pinned to whole-block drafts (`draft_length: 31`): the adaptive policy's widths depend on the
    batch each round meets, and shorter drafts would seldom reach a stop, which is what is tested
    here (the policy under grammars: the test above)."""
    from fast_dvlm_sglang.demo import shapes
    from fast_dvlm_sglang.processing import render_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    spec, ar = servers
    proc = load_processor(DEMO_CHECKPOINT)
    jobs = [(render_chat(proc, s.prompt_messages, add_generation_prompt=True),
             _png_url(s.image) if s.image is not None else None) for s in shapes.make_split(97, 24)]
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: generate(spec, j[0], image=j[1], max_new_tokens=160, regex=SENTENCES,
                                               custom_params={"draft_length": 31}), jobs))
    for i, (g, (text, url)) in enumerate(zip(got, jobs)):
        want = generate(ar, text, image=url, max_new_tokens=160, regex=SENTENCES)
        assert g["output_ids"] == want["output_ids"], (i, g["text"], want["text"])
        assert g["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"], i
        if want["meta_info"]["finish_reason"]["type"] == "stop":
            assert re.fullmatch(SENTENCES, g["text"]), (i, g["text"])
    assert sum(len(g["output_ids"]) for g in got) > 3 * sum(g["meta_info"]["dllm_nfe"][-1] for g in got)


def test_json_answers_validate_for_50_mixed_requests_16_concurrent(servers, prompts):
    """OpenAI chat with `response_format: json_schema`, 50 requests (images on most), 16 at once:
    every answer parses, validates against the schema and ends by the grammar, not the length."""
    import jsonschema

    spec, _ = servers
    client = spec.client(timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "shapes", "schema": SHAPES_SCHEMA}}

    def run(conv):
        return client.chat.completions.create(model="default", messages=conv[0], max_tokens=160, temperature=0,
                                              response_format=fmt)

    convs = [prompts[i % len(prompts)] for i in range(50)]
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, convs))
    assert sum(c[2] is not None for c in convs) > 25
    for a in answers:
        assert a.choices[0].finish_reason == "stop", a.choices[0].message.content
        jsonschema.validate(json.loads(a.choices[0].message.content), SHAPES_SCHEMA)


def test_streamed_json_equals_the_whole_answer(servers, prompts):
    spec, _ = servers
    client = spec.client(timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "shapes", "schema": SHAPES_SCHEMA}}
    for msgs, _text, _url, _kind in prompts[:3]:
        whole = client.chat.completions.create(model="default", messages=msgs, max_tokens=160, temperature=0,
                                               response_format=fmt).choices[0].message.content
        chunks = client.chat.completions.create(model="default", messages=msgs, max_tokens=160, temperature=0,
                                                response_format=fmt, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole
        jsonschema_ok = json.loads(streamed)
        assert set(jsonschema_ok) == set(SHAPES_SCHEMA["required"])


def test_a_regex_that_forces_the_end_mid_block(servers, prompts):
    """`(yes|no|maybe)`: the answer ends at its EOS a few tokens into the first block, as AR's."""
    spec, ar = servers
    for _msgs, text, url, _kind in prompts[:4]:
        got = generate(spec, text, image=url, max_new_tokens=64, regex=CHOICE)
        want = generate(ar, text, image=url, max_new_tokens=64, regex=CHOICE)
        assert got["output_ids"] == want["output_ids"]
        assert got["text"] in ("yes", "no", "maybe") and got["meta_info"]["finish_reason"]["type"] == "stop"
        assert len(got["output_ids"]) < 8


def test_a_grammar_that_forbids_the_drafted_answer(servers, prompts):
    """The unconstrained answer's first word, then words it never drafts: every draft the model
    proposes after the first word is forbidden; the answer is still AR's."""
    spec, ar = servers
    for _msgs, text, url, _kind in prompts[:4]:
        plain = generate(spec, text, image=url, max_new_tokens=32)["text"]
        first = plain.split(" ")[0]
        regex = re.escape(first) + r" (zebra|quokka)( [a-z]+){0,3}\."
        got = generate(spec, text, image=url, max_new_tokens=32, regex=regex)
        want = generate(ar, text, image=url, max_new_tokens=32, regex=regex)
        assert got["output_ids"] == want["output_ids"], (plain, got["text"], want["text"])
        assert got["text"].startswith(first + " ") and got["text"] != plain
        if got["meta_info"]["finish_reason"]["type"] == "stop":
            assert re.fullmatch(regex, got["text"])




def test_aborts_mid_answer_and_bad_grammars_leave_the_pool_whole(servers, prompts):
    """Grammar requests dropped by the client after their first chunk, and grammars that do not
    compile (an error answer, not a hang): the KV pool returns to its size and a known request is
    answered the same afterwards."""
    import httpx

    spec, _ = servers
    _msgs, text, url, _kind = prompts[0]
    before = generate(spec, text, image=url, max_new_tokens=160, json_schema=json.dumps(SHAPES_SCHEMA))

    def drop(i):
        body = {"text": prompts[i][1], "stream": True, "image_data": prompts[i][2],
                "sampling_params": {"max_new_tokens": 64, "temperature": 0, **_option(i, prompts[i][3])}}
        with httpx.stream("POST", spec.base_url + "/generate", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(drop, range(8)))
    for bad in ({"regex": "([a-"}, {"json_schema": "{not json"}):
        r = httpx.post(spec.base_url + "/generate", timeout=120,
                       json={"text": text, "sampling_params": {"max_new_tokens": 8, **bad}})
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text[:300])
    assert wait_for(lambda: kv_tokens_in_use(spec) == 0, timeout=120), kv_tokens_in_use(spec)
    after = generate(spec, text, image=url, max_new_tokens=160, json_schema=json.dumps(SHAPES_SCHEMA))
    assert after["output_ids"] == before["output_ids"]
    assert spec.healthy()


_CUDA_KERNEL_CHECK = r"""
import torch
from sglang.kernels.ops.grammar.bitmask_ops import apply_token_bitmask_inplace_triton
from xgrammar import apply_token_bitmask_inplace
from fast_dvlm_sglang.sglang_plugin import structured_output

class Rows:  # a matcher stand-in: fills row i with a random bitmask (what walk() fills)
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
    def allocate_vocab_mask(self, vocab_size, batch_size, device):
        from sglang.srt.constrained.xgrammar_backend import _allocate_token_bitmask
        return _allocate_token_bitmask(vocab_size, batch_size)
    def fill_vocab_mask(self, mask, i):
        mask[i] = torch.randint(-2**31, 2**31 - 1, (mask.shape[1],), dtype=torch.int32, generator=self.gen)

for seed, (rows, vocab) in enumerate([(1, 40), (7, 300), (33, 512), (64, 1000)]):
    g = Rows(seed)
    logits = torch.randn(rows, vocab, generator=g.gen)
    mask = structured_output.allocate(g, rows, vocab)  # the round's mask: one row per verify position
    for i in range(0, rows, 2):
        g.fill_vocab_mask(mask, i)  # the other rows stay all-allowed
    cpu, cuda_path = logits.clone(), logits.clone()
    apply_token_bitmask_inplace(cpu, mask, backend="cpu")
    apply_token_bitmask_inplace_triton(cuda_path, mask)  # what XGrammarGrammar.apply_vocab_mask runs on CUDA
    assert torch.equal(cpu, cuda_path), (rows, vocab)
    assert not torch.isinf(cpu[1::2]).any()
print("ok")
"""


def test_the_round_mask_suits_sglangs_cuda_mask_kernel():
    """On CUDA, `structured_output.apply` reaches SGLang's Triton bitmask kernel
    (`XGrammarGrammar.apply_vocab_mask`), which asserts one mask row per logits row and a mask no
    wider than the logits. Run under Triton's interpreter on the CPU: masks shaped as a round
    builds them (one row per verify position, all-allowed rows between) give exactly the CPU
    path's result, for odd row counts and vocabulary widths."""
    import inspect
    import os
    import subprocess
    import sys

    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammar

    assert "apply_token_bitmask_inplace_triton(logits, vocab_mask)" in inspect.getsource(XGrammarGrammar.apply_vocab_mask)
    out = subprocess.run([sys.executable, "-c", _CUDA_KERNEL_CHECK], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
