"""`fast-dvlm bench serve` and `bench online` against real servers (tiny sizes; what is checked is
the bookkeeping, not the speed): a valid report, one row per configuration and concurrency, NFE
from our servers' own counters, spec's acceptance histogram, AR as every row's baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


def _bench(*argv, timeout=900):
    done = subprocess.run([sys.executable, "-m", "fast_dvlm_sglang.cli", "bench", *argv, "--quiet"],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_bench_online_against_our_spec_server(demo_spec_and_ar, tmp_path):
    from fast_dvlm_sglang.benchmarks.serving_metrics import check_report

    spec, _ar = demo_spec_and_ar
    out = tmp_path / "online.json"
    done = _bench("online", "--base-url", spec.base_url, "--algorithm", "spec", "--concurrency", "1,3",
                  "--requests", "6", "--max-new-tokens", "48", "--out", str(out))
    report = json.loads(out.read_text())
    assert check_report(report) == [] and report["settings"]["metrics"] is True
    assert [r["batch_size"] for r in report["summary"]] == [1, 3]
    for row in report["summary"]:
        assert row["failed"] == 0 and row["output_tokens"] > 0
        rounds = sum(row["acceptance_histogram"].values())
        # NFE from the server's counters: 2 per drafting round, 1 per AR step, so rounds <= NFE <= 2 rounds
        assert rounds <= row["nfe"] <= 2 * rounds
        assert row["tokens_per_nfe"] == pytest.approx(row["output_tokens"] / row["nfe"])
        assert row["accuracy"] is not None and row["ttft_ms"]["p50"] > 0
    assert "| spec | bf16 | 3 |" in done.stdout and (tmp_path / "online.png").stat().st_size > 0


def test_sglang_client_image_load_against_our_spec_server(demo_spec_and_ar, tmp_path):
    """SGLang's own benchmark client, its image dataset (random 360p PNGs, chat API): the client
    builds prompts with the model's processor, which it loads from the served model (here the
    checkpoint's path) without this package, with `trust_remote_code=True`: the checkpoint's
    config.json names its config class (`checkpoint.with_auto_config`). Offline; every request
    succeeds."""
    import os

    spec, _ar = demo_spec_and_ar
    done = subprocess.run(
        [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai-chat", "--base-url", spec.base_url,
         "--model", spec.model, "--dataset-name", "image", "--image-count", "1", "--image-resolution", "360p",
         "--image-format", "png", "--random-input-len", "32", "--random-output-len", "24", "--num-prompts", "4",
         "--max-concurrency", "2", "--disable-tqdm"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Successful requests:                     4" in done.stdout, done.stdout[-2000:]
    assert spec.healthy()


def test_bench_serve_starts_each_configuration(tiny_checkpoints, tmp_path):
    from fast_dvlm_sglang.benchmarks.serving_metrics import check_report

    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"the blue square is big. What is {i} + 1?"}) + "\n"
                               for i in range(4)))
    out = tmp_path / "serve.json"
    _bench("serve", "--model", str(tiny_checkpoints["old"]), "--algorithms", "ar,mdm", "--concurrency", "1,2",
           "--requests", "4", "--max-new-tokens", "40", "--dataset", str(dataset), "--out", str(out))
    report = json.loads(out.read_text())
    assert check_report(report) == []
    rows = {(r["algorithm"], r["batch_size"]): r for r in report["summary"]}
    assert set(rows) == {("ar", 1), ("ar", 2), ("mdm", 1), ("mdm", 2)}
    for (_alg, c), row in rows.items():
        assert row["failed"] == 0 and row["server_healthy_after"]
        assert row["ratio_to_ar"] == pytest.approx(row["output_tokens_per_s"] / rows[("ar", c)]["output_tokens_per_s"])
        assert row["nfe"] is not None and row["nfe"] > 0  # MDM: the server's fast_dvlm:mdm_forwards_total
    assert rows[("ar", 1)]["answers_equal_ar"] == 1.0
    # the same requests at both concurrencies: MDM's NFE is a property of the answers, not the batch
    assert rows[("mdm", 1)]["output_tokens"] == rows[("mdm", 2)]["output_tokens"]
    assert rows[("mdm", 1)]["nfe"] == rows[("mdm", 2)]["nfe"]
    assert rows[("mdm", 1)]["peak_memory_kind"] == "rss" and rows[("mdm", 1)]["peak_memory_bytes"] > 0
