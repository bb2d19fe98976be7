"""The FP8 demo model (`fast-dvlm quantize`) through the real SGLang server on CPU, against the
reference FP8 decoders: SGLang's compressed-tensors W8A8 FP8 scheme with our CPU hooks
(`sglang_plugin/fp8_linear_method.py`) must compute what `quantize/fp8.py` computes.

The checkpoint is written by the quantizer's own environment (`.venv`, which has llmcompressor;
`make test` builds both environments)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.many_servers]

from sglang_helpers import generate  # noqa: E402
from test_spec_server import Reference, _demo_prompts  # noqa: E402

from fast_dvlm_sglang.server_process import ServeProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUANTIZER = REPO / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def fp8_demo(tmp_path_factory) -> Path:
    assert QUANTIZER.is_file(), f"{QUANTIZER} missing: `make venv` builds the quantizer's environment"
    out = tmp_path_factory.mktemp("fp8") / "demo-fp8"
    subprocess.run([str(QUANTIZER), "-m", "fast_dvlm_sglang.cli", "quantize", "--model", "demo", "--out", str(out),
                    "--calib-samples", "16", "--json"], check=True, capture_output=True, timeout=900)
    return out


@pytest.fixture(scope="module")
def fp8_servers(fp8_demo, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fp8_logs")
    servers = {alg: ServeProcess(fp8_demo, alg, logs / f"{alg}.log", max_running=8) for alg in ("ar", "mdm", "spec")}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers, Reference(fp8_demo)
    finally:
        for server in servers.values():
            server.stop()


def test_cpu_scheme_is_the_reference_computation():
    """SGLang's real W8A8 FP8 scheme object, weights created, loaded and post-processed as its
    loader does, then `apply_weights` through our hook: exactly `fp8_linear`."""
    from compressed_tensors.quantization import QuantizationArgs
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8 import (
        CompressedTensorsW8A8Fp8,
    )

    from fast_dvlm_sglang.quantize.fp8 import fp8_linear, quantize_per_channel
    from fast_dvlm_sglang.sglang_plugin import fp8_linear_method

    weight_args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    scheme = CompressedTensorsW8A8Fp8(weight_quant=weight_args, is_static_input_scheme=False)
    layer = torch.nn.Module()
    scheme.create_weights(layer, input_size_per_partition=48, output_partition_sizes=[16, 8, 8], input_size=48,
                          output_size=32, params_dtype=torch.float32, weight_loader=None)
    w = torch.randn(32, 48)
    q, s = quantize_per_channel(w)
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(s)
    scheme.process_weights_after_loading(layer)
    x, bias = torch.randn(5, 48), torch.randn(32)
    got = fp8_linear_method.apply_weights(CompressedTensorsW8A8Fp8.apply_weights, scheme, layer, x, bias)
    assert torch.equal(got, fp8_linear(x, q, s, bias))


def test_fp8_demo_is_served_as_the_reference_fp8_decoder(fp8_servers):
    """Greedy, prompts with images, 8 at once: the FP8 server's AR answers are the reference FP8
    model's (up to a near tie), and spec's equal them too."""
    servers, ref = fp8_servers
    convs = _demo_prompts()[:8]
    import concurrent.futures as cf

    agree = {"ar": 0, "spec": 0}
    for alg in agree:
        server = servers[alg]
        with cf.ThreadPoolExecutor(len(convs)) as pool:
            bodies = list(pool.map(lambda c, s=server: generate(s, ref.text(c[0]), image=c[1], max_new_tokens=c[2]),
                                   convs))
        for i, (body, (msgs, _url, n)) in enumerate(zip(bodies, convs)):
            want = ref.ar(msgs, n)
            agree[alg] += ref.tie_check.check(msgs, want, body["output_ids"], f"fp8 {alg} request {i}")
    assert agree["ar"] >= 7 and agree["spec"] >= 7, agree


def test_fp8_demo_mdm_is_the_reference_fp8_mdm_decoder(fp8_servers):
    """MDM (block-bidirectional denoising steps through the FP8 linears), 4 prompts at once:
    token for token the reference FP8 model's MDM answers, in as many forwards (the demo's answers
    end with EOS inside a block: the server stops denoising there, as the reference does)."""
    import concurrent.futures as cf

    servers, ref = fp8_servers
    convs = _demo_prompts()[:4]
    with cf.ThreadPoolExecutor(len(convs)) as pool:
        bodies = list(pool.map(lambda c: generate(servers["mdm"], ref.text(c[0]), image=c[1], max_new_tokens=c[2]),
                               convs))
    for i, (body, (msgs, _url, n)) in enumerate(zip(bodies, convs)):
        want = ref.run(msgs, n, algorithm="mdm")
        assert body["output_ids"] == want.token_ids, f"request {i}"
        assert body["meta_info"]["dllm_nfe"][-1] == want.nfe, f"request {i}"


def _reference_logprobs(ref, messages, output_ids: list[int]) -> torch.Tensor:
    """Log-probabilities the reference model gives the answer's tokens (teacher-forced)."""
    from fast_dvlm_sglang.attention_masks import causal_mask

    p = ref.tie_check.prompt(messages)
    ids = torch.tensor([list(p.input_ids) + list(output_ids)])
    with torch.no_grad():
        h = ref.model.embed(ids, p.pixel_values, p.image_grid_thw)
        logits = ref.model(h, ref.model.rope_positions(ids, p.image_grid_thw), causal_mask(ids.shape[1]))
    lp = torch.log_softmax(logits[0, len(p.input_ids) - 1:-1].float(), dim=-1)
    return lp[torch.arange(len(output_ids)), torch.tensor(output_ids)]


def test_fp8_server_computes_fp8_not_the_source(fp8_servers):
    """The server really runs W8A8 FP8 (not dequantized weights with float activations, nor the
    source): the log-probabilities of its answers are the reference FP8 model's to float32
    precision, and measurably not the source model's (FP8 moves them by ~1e-2)."""
    from fast_dvlm_sglang.demo import DEMO_CHECKPOINT

    servers, ref = fp8_servers
    source = Reference(DEMO_CHECKPOINT)
    to_fp8, to_source = [], []
    for msgs, url, n in _demo_prompts()[:4]:
        import httpx

        r = httpx.post(servers["ar"].base_url + "/generate", timeout=120, json={
            "text": ref.text(msgs), "image_data": url, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": max(n, 8)}})
        r.raise_for_status()
        body = r.json()
        got = torch.tensor([t[0] for t in body["meta_info"]["output_token_logprobs"]])
        to_fp8.append(float((got - _reference_logprobs(ref, msgs, body["output_ids"])).abs().max()))
        to_source.append(float((got - _reference_logprobs(source, msgs, body["output_ids"])).abs().max()))
    assert max(to_fp8) < 2e-3, to_fp8  # float32, different summation orders
    assert max(to_source) > 10 * max(to_fp8), (to_source, to_fp8)
