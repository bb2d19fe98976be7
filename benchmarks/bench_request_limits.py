"""What an oversized request costs the server, with and without the request limits; idle CPU.

    .venv-sglang/bin/python benchmarks/bench_request_limits.py [--before-checkout DIR]

Each configuration is one `fast-dvlm serve --model demo` process (spec):
- `default`: the limits as shipped (32 MiB body limit, text bound, media policy);
- `no_body_limit`: `--max-request-bytes 0` (the body is read and parsed whatever its size; the
  text bound still refuses a text no context can hold);
- `before` (with `--before-checkout DIR`, a checkout of the plugin before the limits, e.g.
  `git worktree add /tmp/before cd697aa`): that plugin first on PYTHONPATH, SGLang as it was.
Against each, raw HTTP (`fast_dvlm_sglang/http_probe.py`) sends chat requests whose text is
5 MB and 90 MB (90 MB only where a limit applies: without one it took the machine down), and
measures the seconds to the answer and the server process tree's resident memory: its peak
(sampled every 50 ms) and 5 s after, each minus the idle figure before.
Idle CPU: a server with SGLang's `--sleep-on-idle` (our CPU default) and one without, each idle
for 20 s: CPU seconds per second of its process tree.
Writes `benchmarks/results/request_limits_<device>_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from fast_dvlm_sglang.http_probe import post_raw, tree_cpu_seconds, tree_rss
from fast_dvlm_sglang.server_process import ServeProcess, free_port

RESULTS = Path(__file__).parent / "results"
MB = 1_000_000
MIB = 1024 * 1024


def chat_body(text_bytes: int) -> bytes:
    word = "circle "
    text = word * (text_bytes // len(word))
    return json.dumps({"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()


def measure(server_pid: int, port: int, body: bytes) -> dict:
    idle = tree_rss(server_pid)
    peak, stop = [idle], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(tree_rss(server_pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step = MIB
    status, answer, seconds = post_raw(port, "/v1/chat/completions",
                                       (body[i:i + step] for i in range(0, len(body), step)),
                                       headers={"Content-Length": str(len(body))}, timeout=600)
    time.sleep(5)
    stop.set()
    sampler.join()
    after = tree_rss(server_pid)
    return {"body_bytes": len(body), "status": status, "seconds_to_answer": round(seconds, 3),
            "rss_peak_growth_mb": round((max(peak) - idle) / MIB, 1), "rss_growth_after_5s_mb": round((after - idle) / MIB, 1),
            "answer": answer[:160].decode(errors="replace")}


def oversized(label: str, env: dict[str, str], serve_args: list[str], sizes: list[int], logs: Path) -> dict:
    # cwd outside the repo: `python -m` puts the cwd first on sys.path (the `before` checkout must win)
    server = ServeProcess("demo", "spec", logs / f"{label}.log", env=env, serve_args=serve_args, cwd=logs)
    try:
        server.wait_ready()
        out = {}
        for size in sizes:
            out[f"{size // MB}MB"] = measure(server.proc.pid, server.port, chat_body(size))
            print(label, size // MB, "MB:", json.dumps(out[f"{size // MB}MB"]), flush=True)
            if not server.healthy():
                out["healthy_after"] = False
                break
        else:
            out["healthy_after"] = True
        return out
    finally:
        server.stop()


def _older_plugin_env(checkout: Path, tmp: Path) -> dict[str, str]:
    """PYTHONPATH that imports `fast_dvlm_sglang` from `checkout` in every process. The editable
    install's import hook (a meta-path finder) would win over PYTHONPATH, so a sitecustomize
    (run after site-packages' .pth files) removes it."""
    shim = tmp / "older_plugin"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n")
    return {"PYTHONPATH": os.pathsep.join([str(checkout.resolve()), str(shim), os.environ.get("PYTHONPATH", "")])}


def idle_cpu(sleep_on_idle: bool, logs: Path, seconds: float = 20.0) -> float:
    """CPU seconds per second of an idle server's process tree."""
    from fast_dvlm_sglang import serve

    port = free_port()
    args = serve._parser().parse_args(["--model", "demo", "--port", str(port), "--device", "cpu"])
    cmd = serve.build_command(args, [], None)
    if not sleep_on_idle:
        cmd.remove("--sleep-on-idle")
    log = open(logs / f"idle_sleep{int(sleep_on_idle)}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.time() + 480
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        time.sleep(5)  # startup work done
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        return (tree_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-checkout", default=None, help="a checkout of the plugin before the limits")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_request_limits_") as tmp:
        logs = Path(tmp)
        configs = [("default", {}, [], [5 * MB, 90 * MB]),
                   ("no_body_limit", {}, ["--max-request-bytes", "0"], [5 * MB, 90 * MB])]
        if args.before_checkout:
            configs.insert(0, ("before", _older_plugin_env(Path(args.before_checkout), logs), [], [5 * MB]))
        results = {label: oversized(label, env, serve_args, sizes, logs) for label, env, serve_args, sizes in configs}
        idle = {"sleep_on_idle": round(idle_cpu(True, logs), 3), "busy_poll": round(idle_cpu(False, logs), 3)}
        print("idle CPU s/s:", idle, flush=True)
    record = {
        "date": date.today().isoformat(), "device": device, "host": platform.node(), "model": "demo",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "oversized_chat_requests": results, "idle_cpu_seconds_per_second": idle,
        "ratios": {
            "5MB_time_before_over_default": _ratio(results, "before", "default", "5MB", "seconds_to_answer"),
            "5MB_rss_peak_before_over_default": _ratio(results, "before", "default", "5MB", "rss_peak_growth_mb"),
            "90MB_time_no_limit_over_default": _ratio(results, "no_body_limit", "default", "90MB", "seconds_to_answer"),
            "idle_cpu_busy_over_sleep": round(idle["busy_poll"] / max(idle["sleep_on_idle"], 1e-6), 2),
        },
    }
    out = Path(args.out) if args.out else RESULTS / f"request_limits_{device}_demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["ratios"], indent=2))
    print("wrote", out)
    return 0


def _ratio(results, a, b, size, key):
    try:
        return round(results[a][size][key] / max(results[b][size][key], 1e-3), 1)
    except KeyError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
