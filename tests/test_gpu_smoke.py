"""`benchmarks/gpu_smoke.py` without a GPU: its flags, its checks and table on synthetic answers, and
the random-weights checkpoint builder (real 3B shapes on the meta device, a small one for real)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fast_dvlm_sglang.config import FastDVLMConfig
from fast_dvlm_sglang.random_checkpoint import make_random_checkpoint, random_config
from fast_dvlm_sglang.server_parity import Answer

_spec = importlib.util.spec_from_file_location("gpu_smoke", Path(__file__).parents[1] / "benchmarks" / "gpu_smoke.py")
gpu_smoke = sys.modules.setdefault("gpu_smoke", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_smoke)


def test_serve_flags():
    f = gpu_smoke.serve_flags
    assert f("ar", True, "cuda", "bfloat16") == (["--device", "cuda"], ["--dtype", "bfloat16"])
    assert f("ar", False, "cuda", "bfloat16") == (["--device", "cuda"], ["--dtype", "bfloat16", "--disable-cuda-graph"])
    assert f("mdm", False, "cuda", "bfloat16")[1][-1] == "--disable-cuda-graph"
    pin = ["--draft-length", "31"]  # whole blocks: eager and graph rounds comparable one to one
    assert f("spec", True, "cuda", "bfloat16") == (["--device", "cuda", "--spec-cuda-graph", *pin], ["--dtype", "bfloat16"])
    assert f("spec", False, "cuda", "bfloat16") == (["--device", "cuda", *pin], ["--dtype", "bfloat16"])
    assert f("spec", False, "cpu", "bfloat16") == (["--device", "cpu", *pin], ["--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="CUDA graphs"):
        f("ar", True, "cpu", "float32")


def _top(ids_gaps):
    """AR top-2 entries per position: (AR token, its logprob gap to token 99)."""
    return [[[-0.1, t, None], [-0.1 - g, 99, None]] for t, g in ids_gaps]


class _Noise:
    bound = 0.5

    def summary(self):
        return {"bound": self.bound}


def _run(algorithm, graphs, ids_list, nfe=None, top=None, error=None, model="m"):
    answers = [Answer(list(ids), {"dllm_nfe": nfe[i]} if nfe else {}, top[i] if top else None)
               for i, ids in enumerate(ids_list)]
    run = gpu_smoke.Run(model, algorithm, graphs, startup_s=10.0, seq=answers, batch=answers, seq_s=1.0, batch_s=0.5,
                        noise=_Noise() if algorithm == "ar" else None, error=error)
    return run


AR = [[1, 2, 3, 4], [5, 6, 7, 8]]
AR_TOP = [_top([(1, 5.0), (2, 0.25), (3, 5.0), (4, 5.0)]), _top([(5, 5.0), (6, 5.0), (7, 5.0), (8, 5.0)])]


def _runs(spec_eager, spec_graphs, nfe_eager, nfe_graphs, mdm_graphs=None, ar_graphs=AR):
    return [_run("ar", False, AR, top=AR_TOP), _run("ar", True, ar_graphs, top=AR_TOP),
            _run("mdm", False, AR), _run("mdm", True, mdm_graphs or AR),
            _run("spec", False, spec_eager, nfe=nfe_eager), _run("spec", True, spec_graphs, nfe=nfe_graphs)]


def test_evaluate_passes_equal_answers_and_near_ties():
    # request 0 of spec parts from AR at token 1, where AR's gap (0.25) is within the bound (0.5)
    tie = [[1, 99, 9, 9], [5, 6, 7, 8]]
    nfe = [[2, 2, 4, 4], [2, 2, 2, 3]]
    rows, failures = gpu_smoke.evaluate(_runs(tie, tie, nfe, nfe))
    assert failures == []
    spec = {r["config"]: r for r in rows}["spec graphs"]
    assert spec["parity_counts"]["seq"] == {**spec["parity_counts"]["seq"], "equal": 1, "ties": 1, "failures": 0}
    assert spec["graphs_vs_eager"] == "nfe 2/2 alike" and spec["tokens_per_nfe"] == pytest.approx(8 / 7)
    table = gpu_smoke.format_table(rows)
    assert "spec graphs" in table and "FAIL" not in table and "1/1/0" in table


def test_evaluate_rejects_real_divergences_nfe_changes_and_errors():
    wrong = [[1, 2, 99, 4], [5, 6, 7, 8]]  # token 2: AR's gap 5.0, far beyond the bound
    nfe = [[2, 2, 4, 4], [2, 2, 2, 3]]
    _, failures = gpu_smoke.evaluate(_runs(AR, wrong, nfe, nfe))
    assert [f.split(":")[0] for f in failures] == ["m spec graphs"] * 2  # one at a time, and batched
    assert "seq answers differ" in failures[0] and "#0: REAL DIVERGENCE" in failures[0]
    _, failures = gpu_smoke.evaluate(_runs(AR, AR, nfe, [[2, 2, 4, 4], [2, 4, 4, 5]]))
    assert failures == ["m spec graphs: accepted lengths differ with graphs on requests [1] (same answers)"]
    _, failures = gpu_smoke.evaluate(_runs(AR, AR, nfe, nfe, ar_graphs=wrong))
    assert [f.split(":")[0] for f in failures] == ["m ar graphs"] * 2
    runs = _runs(AR, AR, nfe, nfe)
    runs[5] = _run("spec", True, [], error="RuntimeError: server exited (1)")
    rows, failures = gpu_smoke.evaluate(runs)
    assert failures == ["m spec graphs: error: RuntimeError: server exited (1)"]
    assert "FAIL" in gpu_smoke.format_table(rows)


def test_mdm_graphs_differences_fail_only_when_strict():
    nfe = [[2, 2, 4, 4], [2, 2, 2, 3]]
    runs = _runs(AR, AR, nfe, nfe, mdm_graphs=[[1, 2, 3, 5], [5, 6, 7, 8]])
    rows, failures = gpu_smoke.evaluate(runs)
    assert failures == [] and {r["config"]: r for r in rows}["mdm graphs"]["graphs_vs_eager"] == "1/2 equal"
    assert len(gpu_smoke.evaluate(runs, strict_mdm=True)[1]) == 1


def test_random_3b_config_has_the_real_shapes():
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration

    raw = random_config()
    cfg = FastDVLMConfig.from_dict(raw)
    t = cfg.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size) == (36, 2048, 16, 2, 128, 11008, 151936)
    assert cfg.vision["depth"] == 32 and cfg.vision["hidden_size"] == 1280 and raw["torch_dtype"] == "bfloat16"
    with torch.device("meta"):
        n = sum(p.numel() for p in FastDVLMForConditionalGeneration(cfg).parameters())
    assert 3.6e9 < n < 3.9e9  # Qwen2.5-VL-3B: 3.75 B parameters


def test_small_random_checkpoint_loads_and_stays_in_the_tokenizer(tmp_path):
    from fast_dvlm_sglang.decoding import GenerationConfig, Prompt, generate
    from fast_dvlm_sglang.model import FastDVLMForConditionalGeneration
    from fast_dvlm_sglang.processing import encode_chat
    from fast_dvlm_sglang.tokenizer import load_processor

    path = make_random_checkpoint(tmp_path / "r", **gpu_smoke.SMALL_RANDOM)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 1024
    model = FastDVLMForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    proc = load_processor(path)
    n_real = len(proc.tokenizer)
    assert not model.lm_head.weight[n_real:].any() and model.lm_head.weight[:n_real].abs().sum() > 0
    enc = encode_chat(proc, [{"role": "user", "content": "Name three colours"}])
    out = generate(model, Prompt(enc.input_ids), GenerationConfig("spec", max_new_tokens=40, eos_token_ids=()))
    assert len(out.token_ids) == 40 and max(out.token_ids) < n_real
