"""The benchmark suite's arithmetic, report schema and CLI (`fast-dvlm bench`), without timing
anything that matters: metric definitions on constructed timings, percentiles against numpy,
Prometheus parsing, the forward benchmark's bookkeeping on a tiny random model (CPU), and the
errors a user gets for bad flags and datasets."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fast_dvlm_sglang.benchmarks import prometheus
from fast_dvlm_sglang.benchmarks.load import DatasetError, jsonl_requests
from fast_dvlm_sglang.benchmarks.serving_metrics import (
    SCHEMA,
    RequestRecord,
    RunMeasurement,
    add_ratios,
    check_report,
    environment,
    markdown_table,
    percentile,
    summarize,
)


# ---- percentiles and per-request metrics ----------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_percentile_is_numpys_linear_interpolation(seed):
    rng = random.Random(seed)
    xs = [rng.uniform(-5, 50) for _ in range(rng.randint(1, 40))]
    for q in (0, 1, 25, 50, 90, 99, 100, rng.uniform(0, 100)):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_request_timings():
    r = RequestRecord(start=10.0, end=11.0, first_content=10.2, chunk_times=(10.2, 10.3, 10.6, 11.0),
                      output_tokens=9)
    assert r.e2e == pytest.approx(1.0) and r.ttft == pytest.approx(0.2)
    assert r.itls == pytest.approx([0.1, 0.3, 0.4])  # per chunk: a chunk may carry several tokens
    assert r.tpot == pytest.approx(0.8 / 8)
    assert RequestRecord(start=0, end=1, first_content=0.5, output_tokens=1).tpot is None
    assert RequestRecord(start=0, end=1, error="boom").ttft is None


def _records(n_ok=4, tokens=10, failed=1):
    recs = [RequestRecord(start=i, end=i + 2.0, first_content=i + 0.5, chunk_times=(i + 0.5, i + 1.0, i + 2.0),
                          output_tokens=tokens + i, prompt_tokens=100) for i in range(n_ok)]
    return recs + [RequestRecord(start=0, end=1, error="HTTP 500")] * failed


def test_summary_row_arithmetic():
    recs = _records()
    ar = summarize(recs, RunMeasurement(duration=5.0), algorithm="ar", precision="bf16", concurrency=4)
    tokens = 10 + 11 + 12 + 13
    assert ar["output_tokens"] == tokens and ar["failed"] == 1 and ar["requests"] == 5
    assert ar["output_tokens_per_s"] == pytest.approx(tokens / 5.0)
    assert ar["nfe"] == tokens - 4  # one decode step per token after the first
    assert ar["tokens_per_nfe"] == pytest.approx(tokens / (tokens - 4))
    assert ar["nfe_per_s"] == pytest.approx((tokens - 4) / 5.0)
    assert ar["ttft_ms"]["p50"] == pytest.approx(500.0) and ar["e2e_latency_ms"]["p99"] == pytest.approx(2000.0)
    assert ar["itl_ms"]["mean"] == pytest.approx(750.0)
    assert ar["output_tokens_per_s_per_request"]["mean"] == pytest.approx(sum(t / 2.0 for t in (10, 11, 12, 13)) / 4)
    spec = summarize(recs, RunMeasurement(duration=2.5, nfe=20, round_tokens={1: 6, 3: 2, 7: 2}),
                     algorithm="spec", precision="bf16", concurrency=4)
    assert spec["tokens_per_nfe"] == pytest.approx(tokens / 20)
    assert spec["acceptance_histogram"] == {"1": 6, "3": 2, "7": 2}
    assert spec["mean_tokens_per_round"] == pytest.approx((6 + 6 + 14) / 10)
    mdm = summarize(recs, RunMeasurement(duration=2.5), algorithm="mdm", precision="bf16", concurrency=4)
    assert mdm["nfe"] is None and mdm["tokens_per_nfe"] is None  # no server count: no number, never a guess
    with pytest.raises(ValueError):
        summarize(recs, RunMeasurement(duration=0.0), algorithm="ar", precision="bf16", concurrency=1)


def test_ratio_to_ar_is_per_precision_and_concurrency():
    def row(alg, prec, c, tps):
        return {"algorithm": alg, "precision": prec, "batch_size": c, "output_tokens_per_s": tps}

    rows = add_ratios([row("ar", "bf16", 1, 50.0), row("spec", "bf16", 1, 150.0), row("ar", "bf16", 16, 400.0),
                       row("spec", "bf16", 16, 600.0), row("spec", "fp8", 1, 200.0), row("mdm", "bf16", 4, 9.0)])
    assert [r["ratio_to_ar"] for r in rows] == [1.0, 3.0, 1.0, 1.5, None, None]


def _valid_report():
    rows = [summarize(_records(), RunMeasurement(duration=5.0), algorithm=a, precision="bf16", concurrency=4)
            for a in ("ar", "spec")]
    rows[1]["nfe"], rows[1]["tokens_per_nfe"] = 10, 4.6
    return {"schema": SCHEMA, "kind": "serve", "environment": environment(), "settings": {"model": "demo"},
            "summary": add_ratios(rows)}


def test_report_schema():
    report = _valid_report()
    assert check_report(report) == []
    assert report["environment"]["device"] and report["environment"]["torch"]
    json.dumps(report)  # serialisable as written
    table = markdown_table(report["summary"])
    assert table.count("\n") == 4 and "| spec | bf16 | 4 |" in table
    bad = json.loads(json.dumps(report))
    del bad["summary"][1]["tokens_per_nfe"]
    bad["summary"][0]["ratio_to_ar"] = 2.0
    bad["schema"] = "other"
    problems = check_report(bad)
    assert any("schema" in p for p in problems) and any("lacks tokens_per_nfe" in p for p in problems)
    assert any("AR row" in p for p in problems)
    neg = json.loads(json.dumps(report))
    neg["summary"][1]["output_tokens_per_s"] = -1
    assert any("output_tokens_per_s" in p for p in check_report(neg))
    assert check_report({**report, "summary": []}) == ["summary must be a non-empty list"]


# ---- Prometheus ------------------------------------------------------------------------------------
PROM = """# HELP fast_dvlm:spec_forwards_total forwards
# TYPE fast_dvlm:spec_forwards_total counter
fast_dvlm:spec_forwards_total 30.0
fast_dvlm:spec_forwards_total 12.0
fast_dvlm:spec_round_tokens_bucket{le="1.0"} 5.0
fast_dvlm:spec_round_tokens_bucket{le="2.0"} 5.0
fast_dvlm:spec_round_tokens_bucket{le="3.0"} 9.0
fast_dvlm:spec_round_tokens_bucket{le="+Inf"} 9.0
sglang:num_requests_total{model_name="x"} 3
"""


def test_prometheus_counters_and_histograms_differenced():
    before = prometheus.parse(PROM)
    assert prometheus.counter(before, prometheus.SPEC_FORWARDS) == 42.0  # multiprocess series summed
    after = prometheus.parse(PROM.replace("30.0", "40.0").replace('le="3.0"} 9.0', 'le="3.0"} 11.0')
                             .replace('le="+Inf"} 9.0', 'le="+Inf"} 11.0'))
    d = prometheus.delta(before, after)
    assert prometheus.counter(d, prometheus.SPEC_FORWARDS) == 10.0
    assert prometheus.histogram_counts(before, prometheus.ROUND_TOKENS) == {1: 5, 3: 4}
    assert prometheus.histogram_counts(d, prometheus.ROUND_TOKENS) == {3: 2}
    assert prometheus.counter(d, prometheus.MDM_FORWARDS) is None


# ---- datasets and the CLI ------------------------------------------------------------------------------
def test_jsonl_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, '
                    '"answer": "y"}\n')
    reqs = jsonl_requests(path, None, 64)
    assert [r.max_tokens for r in reqs] == [64, 5] and reqs[1].answer == "y"
    assert reqs[0].messages == [{"role": "user", "content": "hi"}]
    assert len(jsonl_requests(path, 1, 64)) == 1
    for text, needle in [("{oops\n", ":1: not JSON"), ('{"prompt": ""}\n', "needs a non-empty"),
                         ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens"), ("[1]\n", "expected an object"),
                         ("\n", "no requests")]:
        path.write_text(text)
        with pytest.raises(DatasetError, match=needle):
            jsonl_requests(path, None, 64)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", *argv], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv,needle", [
    ((), "serve,online,forward"),
    (("serve", "--concurrency", "0"), "every value must be >= 1"),
    (("serve", "--concurrency", "1,x"), "not a comma-separated list of integers"),
    (("serve", "--algorithms", "ar,beam"), "beam not in"),
    (("serve", "--precisions", "int4"), "int4 not in"),
    (("serve", "--dataset", "/no/such.jsonl"), "no such file"),
    (("serve", "--model", "/no/such/model"), "no such checkpoint directory"),
    (("online",), "--base-url"),
    (("forward",), "--random-weights"),
    (("cost-table", "--config", "tiny"), "--random-weights is required"),
    (("cost-table", "--refit", "/no/such.json"), "not a cost-table report"),
    (("cost-table", "--widths", "0,4"), "every value must be >= 1"),
])
def test_cli_errors_are_one_line(argv, needle):
    done = _cli(*argv)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], done.stderr


# ---- the forward benchmark on a tiny random model (CPU) ------------------------------------------------
def test_static_cache_forward_equals_the_dense_cache():
    """The benchmark's preallocated cache (attention reads context + new in place) gives the logits
    the reference's dense cache gives for the same context K/V, draft and verify shapes."""
    from fast_dvlm_sglang.attention_masks import block_bidirectional_mask, causal_mask
    from fast_dvlm_sglang.benchmarks.forward import StaticKVCache, build_model, model_config
    from fast_dvlm_sglang.kv_cache import DenseKVCache

    cfg = model_config("tiny")
    model = build_model(cfg, "bf16", torch.device("cpu"), torch.float32)
    t = cfg.text
    for bidirectional, new in ((True, 8), (False, 8), (False, 1)):
        static = StaticKVCache(t.num_hidden_layers, 2, t.num_key_value_heads, t.head_dim, 12, new, torch.float32, "cpu")
        dense = DenseKVCache(t.num_hidden_layers)
        for layer in range(t.num_hidden_layers):
            dense.append(layer, *(x.clone() for x in static.read(layer)))
        ids = torch.randint(0, 500, (2, new))
        pos = (torch.arange(new) + 12).view(1, 1, -1).expand(3, 2, -1)
        mask = (block_bidirectional_mask if bidirectional else causal_mask)(new, 12)
        embeds = model.model.language_model.embed_tokens(ids)
        with torch.inference_mode():
            a = model(embeds, pos, mask, static, write_cache=not bidirectional)
            b = model(embeds, pos, mask, dense, write_cache=not bidirectional)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_transformers_twin_holds_our_weights():
    """The baseline model is transformers' Qwen2.5-VL with our weights: same logits on a text
    prompt (float32), so its generate is the AR baseline of the very model we time."""
    from fast_dvlm_sglang.attention_masks import causal_mask
    from fast_dvlm_sglang.benchmarks.forward import build_model, model_config, transformers_twin

    cfg = model_config("tiny")
    model = build_model(cfg, "bf16", torch.device("cpu"), torch.float32)
    hf = transformers_twin(model, cfg, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 500, (1, 17))
    with torch.inference_mode():
        ours = model(model.embed(ids), model.rope_positions(ids), causal_mask(17))
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_forward_bench_report(tmp_path):
    """`fast-dvlm bench forward --config tiny` end to end on CPU: every forward timed, the roofline
    and projections computed from those times as documented, a valid report with its files."""
    done = subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", "forward", "--config", "tiny",
                           "--random-weights", "--precisions", "bf16,fp8", "--contexts", "16,40",
                           "--batch-sizes", "1,3", "--block-size", "8", "--reps", "2", "--baseline-new-tokens", "4",
                           "--quiet", "--out", str(tmp_path / "f.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "f.json").read_text())
    assert check_report(report) == [] and report["kind"] == "forward"
    assert (tmp_path / "f.md").is_file() and (tmp_path / "f.png").stat().st_size > 0
    fwd = report["forwards"]
    assert len(fwd) == 2 * 2 * 2 * 3
    bw = report["settings"]["copy_bandwidth_GBps"] * 1e9
    for r in fwd:
        assert r["ms"] > 0 and r["roofline_ms"] == pytest.approx(r["bytes"] / bw * 1e3)
        assert r["tokens"] == r["batch_size"] * (1 if r["forward"] == "ar_step" else 8)
    one = {r["forward"]: r["ms"] / 1e3 for r in fwd if (r["precision"], r["context"], r["batch_size"]) == ("bf16", 40, 3)}
    spec = [r for r in report["summary"] if (r["precision"], r["context"], r["batch_size"]) == ("bf16", 40, 3)
            and r["variant"] == "spec (paper 2.63)"][0]
    assert spec["projected"] and spec["output_tokens_per_s"] == pytest.approx(
        3 * 2.63 / ((one["draft_block"] + one["verify_block"]) / 2))
    assert spec["ratio_to_ar"] == pytest.approx(spec["output_tokens_per_s"] / (3 / one["ar_step"]))
    assert set(report["transformers_eager_ar_tokens_per_s"]) == {"16", "40"}
    assert all(v > 0 for v in report["transformers_eager_ar_tokens_per_s"].values())


def test_a_failing_path_falls_back_and_is_recorded(monkeypatch):
    """A timed path that raises (a kernel that does not compile on the GPU at hand) is replaced by
    the first fallback that works, which stays for the later cells and is named in the state; a
    cell no path can run is recorded as failed, not timed."""
    from fast_dvlm_sglang.benchmarks import forward

    cfg = forward.model_config("tiny")
    model = forward.build_model(cfg, "fp8", torch.device("cpu"), torch.float32)
    calls = []

    def fake_time(model_, cfg_, shape, batch, context, *, graphs, reps, dtype):
        calls.append(dict(model_.bench_paths, graphs=graphs))
        if model_.bench_paths["fp8_gemm"] == "triton":
            raise RuntimeError("PassManager::run failed\nlong compiler log")
        return 0.5

    monkeypatch.setattr(forward, "time_forward", fake_time)
    state = {"attention": "triton", "fp8_gemm": "triton", "graphs": True}
    shape = forward.forward_shapes(8)[0]
    assert forward.time_forward_robust(model, cfg, shape, 1, 16, state=state, reps=1, dtype=torch.float32) == 0.5
    assert state["fp8_gemm"] == "scaled_mm" and state["attention"] == "triton" and state["graphs"] is True
    assert state["fallbacks"][0]["error"] == "RuntimeError: PassManager::run failed"
    assert calls[1] == {"attention": "sdpa", "fp8_gemm": "triton", "graphs": True}  # tried first, still failing
    calls.clear()
    assert forward.time_forward_robust(model, cfg, shape, 2, 16, state=state, reps=1, dtype=torch.float32) == 0.5
    assert len(calls) == 1  # the fallback stays

    monkeypatch.setattr(forward, "time_forward", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    assert forward.time_forward_robust(model, cfg, shape, 4, 16, state=state, reps=1, dtype=torch.float32) is None
    assert state["failed"] == [{"at": "ar_step B=4 C=16", "error": "ValueError: no"}]
    assert model.bench_paths == {"attention": "triton", "fp8_gemm": "scaled_mm"}  # the state's paths again


def test_path_check_compares_the_triton_attention_with_sdpa():
    """`check_paths` (run on the GPU before timing) on CPU through Triton's interpreter: the kernel's
    logits equal SDPA's to float32 rounding, and a broken kernel would show (a planted error in
    the oracle's path moves the number)."""
    from fast_dvlm_sglang.benchmarks import forward

    cfg = forward.model_config("tiny")
    model = forward.build_model(cfg, "bf16", torch.device("cpu"), torch.float32)
    forward.set_paths(model, attention="triton", fp8_gemm="triton")
    got = forward.check_paths(model, cfg, 12, 8, torch.float32)
    for name in ("draft", "verify"):
        assert got[name]["rel_l2"] < 1e-5 and got[name]["argmax_agree"] == 1.0
    assert model.bench_paths == {"attention": "triton", "fp8_gemm": "triton"}
    forward.set_paths(model, attention="sdpa", fp8_gemm="triton")
    assert forward.check_paths(model, cfg, 12, 8, torch.float32)["draft"]["rel_l2"] == 0.0  # same path: no difference


# ---- the draft policy's cost table (`fast-dvlm bench cost-table`) ---------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_cost_fit_recovers_a_known_cost(seed):
    """Times made from known coefficients (plus 1% noise) fit back to them; the fit is a valid
    `forward_cost` table whose predictions are the times."""
    from fast_dvlm_sglang.benchmarks.cost_table import FEATURES, features, fit_cost
    from fast_dvlm_sglang.decoding.draft_policy import ForwardCost

    rng = np.random.default_rng(seed)
    true = dict(zip(FEATURES, (rng.uniform(1e-3, 1e-2), rng.uniform(0, 1e-4), rng.uniform(1e-6, 1e-4),
                               rng.uniform(1e-10, 1e-8))))
    table = [{"context": c, "batch_size": b, "width": w,
              "seconds": float(np.dot(features(b, w, c), [true[n] for n in FEATURES])) * rng.uniform(0.99, 1.01)}
             for c in (512, 4096) for b in (1, 2, 4, 8, 16, 32, 64) for w in (1, 2, 4, 8, 16, 32)]
    fit = fit_cost(table)
    for name in ("base", "per_token", "per_pair"):
        assert fit[name] == pytest.approx(true[name], rel=0.1)
    assert fit["residual"] < 0.02 and fit["ratio_residual"] < 0.03
    cost = ForwardCost.load(fit)
    assert cost.seconds(64 * 32, 64, 64 * 32 * (4096 + 32)) == pytest.approx(table[-1]["seconds"], rel=0.03)


@pytest.mark.parametrize("seed", range(12))
def test_cost_fit_of_noisy_tiny_timings_is_always_loadable(seed):
    """A tiny model's forwards on a loaded CI machine time as noise around a constant, sometimes
    falling with size: whatever positive times come in, the fit is the best non-negative one over
    the supports the server can load (never worse than a constant), and `ForwardCost` loads it.
    CI once got base = per_token = 0 from a greedy drop-the-most-negative fit, and the bench died."""
    from fast_dvlm_sglang.benchmarks.cost_table import FEATURES, features, fit_cost
    from fast_dvlm_sglang.decoding.draft_policy import ForwardCost

    rng = np.random.default_rng(seed)
    shape = seed % 3  # noise around a constant / cost only per row / times falling with size
    table = []
    for c in (16, 40):
        for b in (1, 3):
            for w in (1, 4):
                t = {0: 1e-3, 1: 1e-4 * b, 2: 1e-3 / (b * w)}[shape]
                table.append({"context": c, "batch_size": b, "width": w, "seconds": t * rng.uniform(0.5, 1.5)})
    fit = fit_cost(table)
    cost = ForwardCost.load(fit)
    assert all(fit[n] >= 0 for n in FEATURES) and cost.base + cost.per_token > 0

    def rel_sq(vec):
        return sum((float(np.dot(features(r["batch_size"], r["width"], r["context"]), vec)) / r["seconds"] - 1) ** 2
                   for r in table)

    constant = len(table) / sum(1 / r["seconds"] for r in table)  # least squares of a constant, relative error
    best_constant = min(rel_sq([constant * f, 0, 0, 0]) for f in np.linspace(0.5, 2, 61))
    assert rel_sq([fit[n] for n in FEATURES]) <= best_constant + 1e-12


def test_implied_draft_lengths_follow_acceptance_and_cost():
    """Where a forward costs the same whatever its width (memory-bound), a request that never
    accepts keeps AR steps and one that always accepts drafts the whole block; where every token
    costs as much as the forward's base (compute-bound), long drafts lose at any acceptance below
    1 at a large batch. The policy never picks a round it expects to lose to AR."""
    from fast_dvlm_sglang.benchmarks.cost_table import implied_widths

    flat = implied_widths({"base": 0.01, "per_row": 0.0, "per_token": 1e-9, "per_pair": 0.0}, [1, 64], [512],
                          grid=(0.0, 0.99))
    by = {(r["batch_size"], r["acceptance"]): r for r in flat}
    assert by[(1, 0.0)]["draft_lengths"] == [0] and by[(1, 0.0)]["speedup_vs_ar"] == 1.0
    assert by[(1, 0.99)]["draft_lengths"] == [31] and by[(1, 0.99)]["speedup_vs_ar"] > 10
    steep = implied_widths({"base": 1e-4, "per_row": 0.0, "per_token": 1e-4, "per_pair": 0.0}, [64], [512],
                           grid=(0.5, 0.9))
    assert all(max(r["draft_lengths"]) < 31 for r in steep)
    assert all(r["speedup_vs_ar"] >= 1.0 for r in flat + steep)


def test_cost_table_report_and_refit(tmp_path):
    """`fast-dvlm bench cost-table --config tiny` end to end on CPU: an AR step per (context, batch)
    and a draft and a verify per wider width, the cells their means, a fit the server can load,
    the implied draft lengths for every (context, batch, acceptance); `--refit` rebuilds the same
    fit from the forwards."""
    from fast_dvlm_sglang.decoding.draft_policy import ForwardCost

    out = tmp_path / "cost.json"
    done = _cli("cost-table", "--config", "tiny", "--random-weights", "--contexts", "16,40", "--batch-sizes", "1,3",
                "--widths", "1,4", "--reps", "2", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "forward_cost" and report["environment"]["device"]
    assert sorted((r["context"], r["batch_size"], r["width"], r["forward"]) for r in report["forwards"]) == sorted(
        [(c, b, 1, "ar_step") for c in (16, 40) for b in (1, 3)]
        + [(c, b, 4, f) for c in (16, 40) for b in (1, 3) for f in ("draft", "verify")])
    for cell in report["cells"]:
        ms = [r["ms"] for r in report["forwards"]
              if (r["context"], r["batch_size"], r["width"]) == (cell["context"], cell["batch_size"], cell["width"])]
        assert cell["seconds"] == pytest.approx(sum(ms) / len(ms) / 1e3)
    assert ForwardCost.load(str(out)).base == report["fit"]["base"]
    assert len(report["implied"]) == 2 * 2 * 8 and (tmp_path / "cost.md").read_text().count("| 40 |") == 4  # both tables
    again = _cli("cost-table", "--refit", str(out), "--out", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["fit"] == report["fit"]


def test_profile_categories_follow_the_innermost_frame():
    """A stack belongs to the category of its innermost frame that has one: our AROUND hooks wrap
    SGLang's scheduler functions, so a frame of ours high up must not claim SGLang's work."""
    from fast_dvlm_sglang.benchmarks.profile_server import classify, summarize_collapsed

    hook = "around (fast_dvlm_sglang/sglang_plugin/hooks.py:10)"
    stacks = {
        f"main (x.py:1);{hook};prepare_for_extend (sglang/srt/managers/schedule_batch.py:5)": 3,
        f"main (x.py:1);{hook};run (fast_dvlm_sglang/sglang_plugin/speculative.py:9);"
        "forward (sglang/srt/model_executor/model_runner.py:2);apply (sglang/srt/layers/linear.py:7)": 5,
        f"main (x.py:1);{hook};extend_attention (fast_dvlm_sglang/sglang_plugin/cpu_attention.py:55)": 2,
        f"main (x.py:1);{hook};choose (fast_dvlm_sglang/sglang_plugin/draft_length.py:3)": 1,
        "select (selectors.py:1)": 1,
    }
    assert [classify(s) for s in stacks] == ["sglang scheduling", "model forward (other)", "attention",
                                             "our round (host)", "other"]
    # except under the image tower: its linears are the vision encoder's cost
    tower = (f"main (x.py:1);{hook};get_image_feature (fast_dvlm_sglang/sglang_plugin/model.py:290);"
             "forward (sglang/srt/models/qwen2_5_vl.py:300)")
    assert classify(tower + ";apply (sglang/srt/layers/linear.py:7)") == "vision encoder"
    assert classify(tower + ";forward (sglang/srt/layers/attention/vision.py:9)") == "vision encoder"
    text = "\n".join(f"{s} {n}" for s, n in stacks.items()) + "\nnot a sample line\n"
    summary = summarize_collapsed(text)
    assert summary["busy_samples"] == 12
    assert summary["share"]["model forward (other)"] == pytest.approx(5 / 12)
    assert summary["top_self"][0] == {"frame": "apply (sglang/srt/layers/linear.py:7)", "share": pytest.approx(5 / 12)}



def _cost_file(ar_steps: dict, rounds: dict, context: int = 64) -> dict:
    return {"ar": [{"concurrency": c, "draft_length": None, "context": context, "round_s": s}
                   for c, s in ar_steps.items()],
            "spec": [{"concurrency": c, "draft_length": k, "context": context, "round_s": s}
                     for (c, k), s in rounds.items()]}


@pytest.mark.parametrize("seed", range(10))
def test_decode_lead_is_committed_tokens_per_unit_of_ar_time(seed):
    """lead(c, k) = committed(k) * ar_step(c) / round(c, k), the best over k; a round whose cost
    grows with concurrency exactly as the AR step's keeps its lead at every concurrency, one whose
    cost grows faster loses it."""
    from fast_dvlm_sglang.benchmarks.batching_bound import decode_leads

    rng = random.Random(seed)
    committed = {0: 1.0, 3: rng.uniform(1, 4), 31: rng.uniform(4, 32)}
    ar = {1: rng.uniform(0.005, 0.02)}
    ar[16] = ar[1] * rng.uniform(1.0, 4.0)
    mult = {0: rng.uniform(1, 1.5), 3: rng.uniform(1.5, 3), 31: rng.uniform(2, 5)}
    same = decode_leads(_cost_file(ar, {(c, k): ar[c] * mult[k] for c in ar for k in mult}), committed)[64]
    for k in mult:
        assert same[1]["lead"][k] == pytest.approx(committed[k] / mult[k], rel=1e-12)
        assert same[16]["lead"][k] == pytest.approx(same[1]["lead"][k], rel=1e-12)
    best = max(mult, key=lambda k: committed[k] / mult[k])
    assert same[1]["best_k"] == best and same[1]["best"] == pytest.approx(committed[best] / mult[best])
    # per-token work: at 16 in flight a round of k drafts costs (k + 1) times more per request than at 1
    steeper = {(c, k): ar[c] * mult[k] * (1 + (c > 1) * 0.05 * k) for c in ar for k in mult}
    worse = decode_leads(_cost_file(ar, steeper), committed)[64]
    assert worse[16]["lead"][0] == pytest.approx(worse[1]["lead"][0])
    assert worse[16]["lead"][31] < worse[1]["lead"][31]


def test_decode_leads_skip_cells_without_a_measurement(tmp_path, capsys):
    from fast_dvlm_sglang.benchmarks.batching_bound import committed_per_round, decode_leads, main

    acceptance = {"acceptance": {"demo": {"native": {"4": {"draft_len": 3, "mean_committed_per_round": 3.5},
                                                     "32": {"draft_len": 31, "mean_committed_per_round": 20.0}}}}}
    committed = committed_per_round(acceptance)
    assert committed == {0: 1.0, 3: 3.5, 31: 20.0}
    cost = _cost_file({1: 0.01}, {(1, 31): 0.02, (1, 7): 0.02, (4, 31): 0.05})  # k=7: no acceptance; c=4: no AR
    assert decode_leads(cost, committed) == {64: {1: {"ar_step_s": 0.01, "lead": {31: 10.0}, "best_k": 31,
                                                      "best": 10.0}}}
    (tmp_path / "cost.json").write_text(json.dumps(cost))
    (tmp_path / "acc.json").write_text(json.dumps(acceptance))
    assert main(["--cost", str(tmp_path / "cost.json"), "--acceptance", str(tmp_path / "acc.json"),
                 "--out", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["leads"]["64"]["1"]["best"] == 10.0
    assert main(["--cost", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

def test_gpu_suite_dry_run_on_cpu(tmp_path):
    """`benchmarks/gpu.sh` (the one command a lent GPU machine runs) end to end on a CPU
    (GPU_SH_DRY_RUN: tiny model and grids, kernel tests collected only): every step runs, a
    forward report and a cost table loadable by the server come out where GPU_OUT says."""
    from pathlib import Path

    from fast_dvlm_sglang.decoding.draft_policy import ForwardCost

    script = Path(__file__).parents[1] / "benchmarks" / "gpu.sh"
    env = {**__import__("os").environ, "GPU_SH_DRY_RUN": "1", "GPU_OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "gpu.sh: every step passed" in done.stdout
    for step in ("attention-tests", "fp8-gemm-tests", "fp8-reference-tests", "forward", "cost-table", "kernels"):
        assert f"== gpu.sh: {step} rc=0" in done.stdout, step
    assert check_report(json.loads((tmp_path / "bench_forward_cpu_tiny.json").read_text())) == []
    assert ForwardCost.load(str(tmp_path / "forward_cost_cpu_tiny.json")).base >= 0
