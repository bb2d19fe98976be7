"""`fast-dvlm serve` builds the right SGLang command line (no SGLang needed to check it)."""

from __future__ import annotations

import pytest

from fast_dvlm_sglang import serve


def _cmd(*argv: str) -> list[str]:
    args = serve._parser().parse_args(list(argv))
    yaml = serve.algorithm_yaml(args)
    return serve.build_command(args, ["--log-level", "info"], None if yaml is None else "/tmp/algo.yaml")


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.mark.parametrize("algorithm,expected", [("ar", None), ("mdm", "FastDVLMBlock"),
                                                ("spec", "FastDVLMSpeculative")])
def test_algorithm_flags(tmp_path, algorithm, expected):
    cmd = _cmd("--model", str(tmp_path), "--algorithm", algorithm, "--device", "cuda")
    assert _flag(cmd, "--dllm-algorithm") == expected
    assert (_flag(cmd, "--dllm-algorithm-config") == "/tmp/algo.yaml") == (algorithm == "mdm")
    # dLLM algorithms are batched by default (SGLang's DllmConfig would default to 1).
    assert _flag(cmd, "--max-running-requests") == (None if algorithm == "ar" else str(serve.DEFAULT_DLLM_MAX_RUNNING))
    assert cmd[-2:] == ["--log-level", "info"]  # extra SGLang args go last, verbatim
    assert "--device" not in cmd  # on CUDA SGLang's own defaults apply


@pytest.mark.parametrize("algorithm,backend", [("ar", None), ("mdm", "flashinfer"), ("spec", "triton")])
def test_cuda_dry_run_names_backend_dtype_and_graphs(tmp_path, capsys, algorithm, backend):
    """`fast-dvlm serve --dry-run --device cuda`: bf16 (not SGLang's `auto`, which serves a float32
    checkpoint such as the demo in float16), the attention backend SGLang's dLLM resolution would
    pick for the algorithm written out, CUDA graphs left to SGLang (no --disable-cuda-graph), spec
    graphs only with --spec-cuda-graph (a YAML with cuda_graph: true)."""
    assert serve.serve_main(["--model", str(tmp_path), "--algorithm", algorithm, "--device", "cuda", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert _flag(cmd, "--dtype") == "bfloat16"
    assert _flag(cmd, "--attention-backend") == backend
    assert "--disable-cuda-graph" not in cmd and "--device" not in cmd
    assert ("--dllm-algorithm-config" in cmd) == (algorithm == "mdm")


def test_cuda_flags_given_after_the_separator_win(tmp_path):
    args = serve._parser().parse_args(["--model", str(tmp_path), "--algorithm", "spec", "--device", "cuda"])
    cmd = serve.build_command(args, ["--dtype", "float16", "--attention-backend=flashinfer"], None)
    assert _flag(cmd, "--dtype") == "float16" and cmd.count("--dtype") == 1
    assert "--attention-backend" not in cmd and cmd[-1] == "--attention-backend=flashinfer"


def test_spec_cuda_graph_is_an_algorithm_config(tmp_path):
    argv = ("--model", str(tmp_path), "--algorithm", "spec", "--device", "cuda", "--spec-cuda-graph")
    assert _flag(_cmd(*argv), "--dllm-algorithm-config") == "/tmp/algo.yaml"
    import yaml

    assert yaml.safe_load(serve.algorithm_yaml(serve._parser().parse_args(list(argv)))) == {"cuda_graph": True}


@pytest.mark.parametrize("argv,message", [
    (("--algorithm", "mdm", "--device", "cuda"), "needs --algorithm spec"),
    (("--algorithm", "spec", "--device", "cpu"), "needs a CUDA GPU"),
])
def test_spec_cuda_graph_misuse_is_a_one_line_error(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        _cmd("--model", str(tmp_path), "--spec-cuda-graph", *argv)


def test_default_algorithm_is_spec(tmp_path):
    assert _flag(_cmd("--model", str(tmp_path)), "--dllm-algorithm") == "FastDVLMSpeculative"


def test_cpu_flags(tmp_path):
    cmd = _cmd("--model", str(tmp_path), "--device", "cpu", "--max-running-requests", "3", "--api-key", "k")
    for name, value in [("--device", "cpu"), ("--attention-backend", "torch_native"), ("--dtype", "float32"),
                        ("--sampling-backend", "pytorch"), ("--max-running-requests", "3"), ("--api-key", "k")]:
        assert _flag(cmd, name) == value
    assert "--disable-cuda-graph" in cmd and "--sleep-on-idle" in cmd
    assert _flag(cmd, "--model-path") == str(tmp_path)
    assert _flag(cmd, "--served-model-name") is None


def test_demo_is_served_as_demo(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(serve, "DEMO_CHECKPOINT", tmp_path)
    cmd = _cmd("--model", "demo", "--device", "cpu")
    assert _flag(cmd, "--model-path") == str(tmp_path) and _flag(cmd, "--served-model-name") == "demo"


def test_missing_demo_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(serve, "DEMO_CHECKPOINT", tmp_path / "nope")
    with pytest.raises(SystemExit, match="demo checkpoint is missing"):
        _cmd("--model", "demo")


_SERVER_STANDIN = """
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
def stop(signum, _frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
marker.with_suffix(".tmp").write_text(str(__import__("os").getpid()))
marker.with_suffix(".tmp").rename(marker.with_suffix(".ready"))
while True:
    time.sleep(0.05)
"""

_WRAPPER = """
import sys
from fast_dvlm_sglang import serve
serve.build_command = lambda args, extra, config: [sys.executable, "-c", sys.argv[1], sys.argv[2]]
raise SystemExit(serve.serve_main(["--model", sys.argv[3], "--device", "cpu"]))
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_stopping_serve_stops_the_server(tmp_path, signum):
    # The SGLang server is a child process: a process manager's SIGTERM to `fast-dvlm serve`
    # must reach it, or it keeps the port after we are gone.
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "stopped"
    wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, _SERVER_STANDIN, str(marker),
                                str(tmp_path)])
    deadline = time.monotonic() + 60
    while not marker.with_suffix(".ready").exists():
        assert wrapper.poll() is None and time.monotonic() < deadline, "stand-in never started"
        time.sleep(0.05)
    standin = int(marker.with_suffix(".ready").read_text())
    try:
        wrapper.send_signal(getattr(signal, signum))
        assert wrapper.wait(timeout=30) == 0
        assert marker.read_text() == signum
    finally:
        wrapper.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(standin, signal.SIGKILL)


def test_draft_length_and_forward_cost_are_algorithm_config(tmp_path):
    import yaml

    table = tmp_path / "cost.json"
    table.write_text('{"fit": {"base": 0.01, "per_token": 0.001}}')
    argv = ["--model", str(tmp_path), "--draft-length", "0", "--forward-cost", str(table), "--unconstrained-drafts"]
    assert _flag(_cmd(*argv), "--dllm-algorithm-config") == "/tmp/algo.yaml"
    assert yaml.safe_load(serve.algorithm_yaml(serve._parser().parse_args(argv))) == {
        "draft_length": 0, "forward_cost": str(table.resolve()), "constrain_drafts": False}
    assert serve.algorithm_yaml(serve._parser().parse_args(["--model", str(tmp_path)])) is None  # adaptive


@pytest.mark.parametrize("argv,message", [
    (("--algorithm", "ar", "--draft-length", "3"), "--draft-length needs --algorithm spec"),
    (("--algorithm", "mdm", "--unconstrained-drafts"), "--unconstrained-drafts needs --algorithm spec"),
    (("--draft-length", "-1"), "must be >= 0"),
    (("--forward-cost", "/nonexistent/cost.json"), "no such file"),
])
def test_draft_length_misuse_is_a_one_line_error(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        _cmd("--model", str(tmp_path), *argv)


def test_limits_reach_every_sglang_process_as_environment(tmp_path, capsys):
    """The limits are not SGLang flags: `serve` sets them in the environment of the SGLang process
    tree (`sglang_plugin/limits.py` reads them there); the host allow-list is SGLang's own flag."""
    from fast_dvlm_sglang.sglang_plugin.limits import ServingLimits

    media = tmp_path / "media"
    media.mkdir()
    assert serve.serve_main(["--model", str(tmp_path), "--device", "cpu", "--dry-run", "--max-request-bytes", "1000",
                             "--max-images", "2", "--allowed-local-media-path", str(media / ".." / "media"),
                             "--allow-image-urls", "--allowed-image-hosts", "a.example, b.example"]) == 0
    words = capsys.readouterr().out.split()
    env = dict(w.split("=", 1) for w in words if w.startswith("FAST_DVLM_"))
    limits = ServingLimits.from_env(env)
    assert limits == ServingLimits(max_request_bytes=1000, max_images=2, allow_media_urls=True,
                                   allowed_local_media_path=str(media.resolve()))
    i = words.index("--allowed-media-domains")
    assert words[i + 1:i + 3] == ["a.example", "b.example"]
    # without flags: the defaults, data: URLs only
    assert serve.serve_main(["--model", str(tmp_path), "--device", "cpu", "--dry-run"]) == 0
    words = capsys.readouterr().out.split()
    assert ServingLimits.from_env(dict(w.split("=", 1) for w in words if w.startswith("FAST_DVLM_"))) == ServingLimits()
    assert "--allowed-media-domains" not in words


@pytest.mark.parametrize("argv,message", [
    (["--allowed-image-hosts", "a.example"], "--allowed-image-hosts needs --allow-image-urls"),
    (["--allowed-local-media-path", "/no/such/dir"], "not a directory"),
    (["--max-request-bytes", "-1"], "max_request_bytes must be >= 0"),
    (["--request-read-timeout", "0"], "request_read_timeout_s must be > 0"),
    (["--video-fps", "0"], "video fps must be > 0"),
    (["--max-video-frames", "1"], "max video frames must be >= 2"),
    (["--max-videos", "-1"], "max_videos must be >= 0"),
    (["--max-video-pixels", "100000"], "--max-video-pixels"),  # under 2 frames of 2 x 100 k
])
def test_limit_misuse_is_a_one_line_error(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        serve.serve_main(["--model", str(tmp_path), "--device", "cpu", "--dry-run", *argv])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_video_caps_reach_sglang_as_environment(tmp_path, capsys):
    from fast_dvlm_sglang.sglang_plugin.limits import ServingLimits

    assert serve.serve_main(["--model", "demo", "--device", "cpu", "--dry-run", "--video-fps", "1.5",
                             "--max-video-frames", "16", "--max-video-pixels", "1000000", "--max-video-seconds", "9",
                             "--max-videos", "2"]) == 0
    words = capsys.readouterr().out.split()
    limits = ServingLimits.from_env(dict(w.split("=", 1) for w in words if w.startswith("FAST_DVLM_")))
    assert limits == ServingLimits(video_fps=1.5, max_video_frames=16, max_video_pixels=1000000,
                                   max_video_seconds=9.0, max_videos=2)


def test_serve_refuses_to_start_without_pyav(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(SystemExit) as e:
        serve.serve_main(["--model", str(tmp_path), "--device", "cpu", "--dry-run"])
    assert "PyAV" in str(e.value) and "pip install av" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("device,extra,interpret", [
    ("cpu", ["--attention-backend", "fast_dvlm_triton"], True),
    ("cpu", ["--", "--attention-backend=fast_dvlm_triton"], True),  # raw SGLang flag: the last one wins
    ("cpu", [], False),
    ("cuda", ["--attention-backend", "fast_dvlm_triton"], False),  # compiled on a GPU
])
def test_attention_backend_flag_and_the_interpreter(tmp_path, capsys, device, extra, interpret):
    """`--attention-backend fast_dvlm_triton` reaches SGLang on either device; on a CPU the kernel
    runs in Triton's interpreter, which the SGLang processes get from their environment."""
    assert serve.serve_main(["--model", str(tmp_path), "--device", device, "--dry-run", *extra]) == 0
    words = capsys.readouterr().out.split()
    backend = serve.last_value(words, "--attention-backend")
    assert backend == ("fast_dvlm_triton" if extra else "torch_native" if device == "cpu" else "triton")
    assert ("TRITON_INTERPRET=1" in words) == interpret
    assert "SGLANG_EXTERNAL_MODEL_PACKAGE=fast_dvlm_sglang.sglang_plugin.models" in words  # every device


@pytest.mark.parametrize("extra,ranks", [
    ([], 1), (["--", "--dp", "2"], 2), (["--", "--tp=2"], 2), (["--", "--data-parallel-size", "2"], 2),
    (["--", "--tp-size", "2", "--tp", "1"], 1),  # the last alias wins, as in SGLang's parser
    (["--", "--dp", "2", "--tp-size", "2"], 4), (["--", "--pp-size", "3"], 3),
])
def test_cpu_ranks_split_the_cores(tmp_path, capsys, monkeypatch, extra, ranks):
    """Several CPU ranks (data / tensor / pipeline parallel) get equal, disjoint core groups in
    SGLang's SGLANG_CPU_OMP_THREADS_BIND (its default allows one rank per NUMA node and refuses
    `--dp 2` on a one-node machine); one rank, or a binding the user set, is left alone; more
    ranks than cores is a one-line error."""
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _pid: set(range(8)))
    argv = ["--model", str(tmp_path), "--device", "cpu", "--dry-run", *extra]
    assert serve.serve_main(argv) == 0
    words = capsys.readouterr().out.split()
    bind = [w.split("=", 1)[1] for w in words if w.startswith("SGLANG_CPU_OMP_THREADS_BIND=")]
    if ranks == 1:
        assert bind == []
    else:
        groups = [[int(c) for c in g.split(",")] for g in bind[0].split("|")]
        assert len(groups) == ranks and all(len(g) == 8 // ranks for g in groups)
        flat = [c for g in groups for c in g]
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(8))
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0-3|4-7")
    assert serve.serve_main(argv) == 0
    assert not any(w.startswith("SGLANG_CPU_OMP") for w in capsys.readouterr().out.split())


def test_more_cpu_ranks_than_cores_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda _pid: {0, 1})
    with pytest.raises(SystemExit) as e:
        serve.serve_main(["--model", str(tmp_path), "--device", "cpu", "--dry-run", "--", "--dp", "2", "--tp", "2"])
    assert "4 ranks" in str(e.value) and "2" in str(e.value) and "\n" not in str(e.value)
