"""spec == AR in bfloat16 through the real servers (CPU): equal, or parting only at a near tie.

In bfloat16 the logits themselves are rounded to 8 significant bits, so a 32-token verify pass and
a 1-token AR step round differently far more often than in float32. Both servers here run
`fast-dvlm serve ... -- --dtype bfloat16` (arguments after `--` come last on SGLang's command
line, and its argparse keeps the last `--dtype`: checked on /server_info). The noise bound is
measured on the AR server itself (decode steps vs a causal extend over the same tokens); every
spec answer must equal AR's or part where AR's top-logprob gap is within it
(`fast_dvlm_sglang/server_parity.py`). The counts are printed and written to the log directory.
Set FAST_DVLM_NUMERICS_DTYPES=float32,bfloat16 to also run float32 (the other server tests already
compare float32 spec against the reference decoders).
"""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

from fast_dvlm_sglang.demo import DEMO_CHECKPOINT, shapes  # noqa: E402
from fast_dvlm_sglang.processing import render_chat  # noqa: E402
from fast_dvlm_sglang.server_parity import (  # noqa: E402
    ServerPrompt,
    answers,
    ar_answers,
    compare,
    measure_server_noise,
    tally,
)
from fast_dvlm_sglang.server_process import ServeProcess  # noqa: E402
from fast_dvlm_sglang.tokenizer import load_processor  # noqa: E402

DTYPES = os.environ.get("FAST_DVLM_NUMERICS_DTYPES", "bfloat16").split(",")
N_PROMPTS = 32
PROMPT_SEED, CALIBRATION_SEED = 4321, 777
MAX_TOKENS = [96, 64, 33, 96, 17, 80, 48, 64]


def _png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def demo_prompts(processor, seed: int, n: int, max_tokens=None) -> list[ServerPrompt]:
    out = []
    for i, s in enumerate(shapes.make_split(seed, n)):
        text = render_chat(processor, s.prompt_messages, add_generation_prompt=True)
        n_tokens = max_tokens[i % len(max_tokens)] if max_tokens else 64
        out.append(ServerPrompt(text, _png_url(s.image) if s.image is not None else None, n_tokens))
    return out


@pytest.fixture(scope="module", params=DTYPES)
def servers(request, tmp_path_factory):
    dtype = request.param
    logs = tmp_path_factory.mktemp(f"numerics_{dtype}")
    args = ["--dtype", dtype]
    ar = ServeProcess(DEMO_CHECKPOINT, "ar", logs / "ar.log", max_running=16, sglang_args=args)
    spec = ServeProcess(DEMO_CHECKPOINT, "spec", logs / "spec.log", max_running=16, sglang_args=args)
    try:
        ar.wait_ready(timeout=600)
        spec.wait_ready(timeout=600)
        yield dtype, ar, spec, logs
    finally:
        ar.stop()
        spec.stop()


def test_spec_equals_ar_up_to_near_ties(servers):
    dtype, ar, spec, logs = servers
    for server in (ar, spec):
        assert httpx.get(server.base_url + "/server_info", timeout=30).json()["dtype"] == dtype
    processor = load_processor(DEMO_CHECKPOINT)
    noise = measure_server_noise(ar, demo_prompts(processor, CALIBRATION_SEED, 4),
                                 lambda t: processor.tokenizer(t, add_special_tokens=False)["input_ids"],
                                 source=f"SGLang CPU {dtype}: decode steps vs causal extend")
    assert noise.unmatched == 0 and noise.positions > 50
    prompts = demo_prompts(processor, PROMPT_SEED, N_PROMPTS, MAX_TOKENS)
    ar_out = ar_answers(ar, prompts)
    spec_out = answers(spec, prompts)
    verdicts = compare(ar_out, spec_out, noise.bound)
    counts = tally(verdicts)
    gaps = sorted(e[0][0] - e[1][0] for a in ar_out for e in a.top_logprobs)
    report = {"dtype": dtype, "noise": noise.summary(), **counts,
              "ar_positions": len(gaps), "ar_positions_within_bound": sum(g <= noise.bound for g in gaps),
              "ar_median_top2_gap": gaps[len(gaps) // 2],
              "spec_tokens_per_nfe": sum(len(s.output_ids) for s in spec_out) / sum(s.nfe[-1] for s in spec_out)}
    (logs / "numerics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nnumerics {dtype}: {json.dumps(report)}")
    for i, v in enumerate(verdicts):
        if not v.equal:
            print(f"  prompt {i}: {v}")
    failures = [(i, str(v)) for i, v in enumerate(verdicts) if not v.ok]
    assert not failures, failures
    assert noise.bound < report["ar_median_top2_gap"] / 10  # the bound is far below a real gap


def test_ar_steps_are_ars_decode_steps_bit_for_bit(servers):
    """Spec's AR steps run SGLang's own decode forward (`sglang_plugin/decode_steps.py`), so a
    request pinned to AR steps (`custom_params: {draft_length: 0}`) gets AR's answer exactly, with
    no near-tie allowance even in bfloat16: one request at a time on both servers (the same
    batch shapes), both prefix caches flushed first and fed the same requests in the same order
    (the same cached prefixes), images included."""
    from fast_dvlm_sglang.server_parity import generate

    dtype, ar, spec, logs = servers
    processor = load_processor(DEMO_CHECKPOINT)
    prompts = demo_prompts(processor, PROMPT_SEED + 1, 8, MAX_TOKENS)
    for server in (ar, spec):
        assert httpx.post(server.base_url + "/flush_cache", timeout=60).status_code == 200
    for i, p in enumerate(prompts):
        body = {"text": p.text, "sampling_params": {"max_new_tokens": p.max_new_tokens, "temperature": 0}}
        if p.image is not None:
            body["image_data"] = p.image
        want = generate(ar, body)["output_ids"]
        body["sampling_params"]["custom_params"] = {"draft_length": 0}
        got = generate(spec, body)
        assert got["output_ids"] == want, (dtype, i)
        assert set(got["meta_info"]["dllm_draft_length"]) == {0}
        assert got["meta_info"]["dllm_nfe"][-1] == len(want) - 1  # one forward per token after the first
