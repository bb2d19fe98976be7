"""`fast-dvlm bench serve` and `fast-dvlm bench online`: serving benchmarks through SGLang.

`serve` starts one `fast-dvlm serve` (SGLang + our plugin, `--enable-metrics`) per algorithm and
precision, one at a time (same engine, same model class, same flags: only the algorithm or the
checkpoint differs), warms it up, and drives it at each concurrency with the same requests
(`load.py`: streaming OpenAI chat completions). `online` drives a server already running, ours
or any OpenAI-compatible one. Both write one report (`serving_metrics.py` defines every number):
JSON (`summary` rows + `details` per configuration), a markdown table, and PNG plots.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from pathlib import Path

from . import prometheus
from .load import BenchRequest, run_load
from .serving_metrics import (
    SCHEMA,
    RunMeasurement,
    add_ratios,
    check_report,
    environment,
    markdown_table,
    summarize,
)

ALGORITHMS = ("ar", "mdm", "mdm-full", "spec")  # mdm-full: MDM denoising whole blocks (the paper's NFE)
PRECISIONS = ("bf16", "fp8")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


class PeakMemory:
    """Peak memory of a server while it runs: RSS of its process tree (CPU), and the GPU's used
    memory (NVML) when a GPU is visible; sampled every `interval` s in a thread."""

    def __init__(self, pid: int | None, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.rss = 0
        self.cuda = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            self.rss = max(self.rss, sum(p.memory_info().rss for p in procs if p.is_running()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        try:
            import pynvml

            pynvml.nvmlInit()
            used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
            self.cuda = max(self.cuda or 0, int(used))
        except Exception:  # no NVML / no GPU: RSS only
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.pid is not None:
                self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def reading(self) -> tuple[int | None, str | None]:
        if self.cuda:
            return self.cuda, "cuda"
        return (self.rss, "rss") if self.rss else (None, None)


def measure(client, model: str, requests: list[BenchRequest], concurrency: int, *, algorithm: str,
            precision: str, metrics_url: str | None, headers: dict | None, pid: int | None,
            progress: bool = True) -> tuple[dict, dict]:
    """One configuration at one concurrency: (summary row, details)."""
    before = prometheus.fetch(metrics_url, headers) if metrics_url else None
    with PeakMemory(pid) as mem:
        records, duration = run_load(client, model, requests, concurrency, desc=f"{algorithm} {precision} c{concurrency}",
                                     progress=progress)
    after = prometheus.fetch(metrics_url, headers) if metrics_url else None
    run = RunMeasurement(duration=duration)
    run.peak_memory_bytes, run.peak_memory_kind = mem.reading()
    if before is not None and after is not None:
        d = prometheus.delta(before, after)
        name = {"spec": prometheus.SPEC_FORWARDS, "mdm": prometheus.MDM_FORWARDS,
                "mdm-full": prometheus.MDM_FORWARDS}.get(algorithm)
        if name is not None and prometheus.counter(d, name) is not None:
            run.nfe = round(prometheus.counter(d, name))
        if algorithm == "spec":
            run.round_tokens = prometheus.histogram_counts(d, prometheus.ROUND_TOKENS)
            run.draft_lengths = prometheus.histogram_counts(d, prometheus.DRAFT_LENGTH)
    row = summarize(records, run, algorithm=algorithm, precision=precision, concurrency=concurrency)
    answers = [r.text for r in records]
    graded = [(a, q.answer) for a, q in zip(answers, requests) if q.answer is not None]
    if graded:
        from fast_dvlm_sglang.demo.shapes import answers_match

        row["accuracy"] = sum(answers_match(a, want) for a, want in graded) / len(graded)
    row["key"] = f"{algorithm}/{precision}/{concurrency}"
    errors = sorted({r.error for r in records if r.error})
    details = {"key": row["key"], "e2e_latency_s": [r.e2e for r in records if r.ok],
               "ttft_s": [r.ttft for r in records if r.ttft is not None], "answers": answers, "errors": errors[:5]}
    return row, details


def answers_equal_ar(rows: list[dict], details: list[dict]) -> None:
    """`answers_equal_ar`: the fraction of a configuration's answers equal to AR's answer to the
    same request at the same precision and concurrency (greedy; spec is lossless up to near-ties)."""
    by_key = {d["key"]: d["answers"] for d in details}
    for r in rows:
        ar = by_key.get(f"ar/{r['precision']}/{r['batch_size']}")
        mine = by_key.get(r["key"])
        r["answers_equal_ar"] = (sum(a == b for a, b in zip(mine, ar)) / len(ar)) if ar and mine else None


def write_texts(items: list[tuple[Path, str]]) -> list[Path]:
    """Each (path, text) written atomically (a temporary file beside it, then renamed)."""
    paths = []
    for path, text in items:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_report(report: dict, out: Path, *, plot: bool = True) -> list[Path]:
    """JSON, markdown and PNG next to each other, each written atomically."""
    problems = check_report(report)
    if problems:
        raise ValueError("invalid report: " + "; ".join(problems))
    out = Path(out)
    paths = write_texts([(out, json.dumps(report, indent=1) + "\n"), (out.with_suffix(".md"), _markdown(report))])
    if plot:
        from .plots import plot_forward, plot_report

        draw = plot_forward if report["kind"] == "forward" else plot_report
        paths.append(draw(report, out.with_suffix(".png")))
    return paths


def _markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    if report["kind"] == "forward":
        from .forward import forward_markdown

        table = forward_markdown(report)
    else:
        table = markdown_table(report["summary"])
    head = (f"# {report['kind']}: {settings.get('model', settings.get('base_url', ''))}\n\n"
            f"{env['device']}; torch {env.get('torch')}, sglang {env.get('sglang')}; commit {env.get('commit')}; "
            f"{env.get('date')}\n\n")
    notes = "".join(f"- {k}: {v}\n" for k, v in report.get("notes", {}).items())
    return head + table + ("\n" + notes if notes else "")


def quantize_fp8(model: str, out: Path) -> Path:
    """The FP8 checkpoint of `model`, made by `fast-dvlm quantize` in the quantizer's environment
    (`.venv`: llmcompressor cannot share SGLang's)."""
    python = REPO / ".venv" / "bin" / "python"
    if not python.is_file():
        raise SystemExit("fast-dvlm bench: --precisions fp8 needs --fp8-model PATH, or .venv (make venv) to quantize")
    cmd = [str(python), "-m", "fast_dvlm_sglang.cli", "quantize", "--model", model, "--out", str(out),
           "--calib-samples", "16", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fast-dvlm bench: quantizing {model} failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def serve_bench(args, requests: list[BenchRequest]) -> dict:
    from fast_dvlm_sglang.config import resolve_model_dir
    from fast_dvlm_sglang.server_process import ServeProcess

    model_dir = resolve_model_dir(args.model)
    rows, details, startup = [], [], {}
    logs = Path(tempfile.mkdtemp(prefix="fast-dvlm-bench-"))
    for precision in args.precisions:
        if precision == "fp8":
            ckpt = Path(args.fp8_model) if args.fp8_model else quantize_fp8(args.model, logs / "fp8")
        else:
            ckpt = model_dir
        for algorithm in args.algorithms:
            serve_args = ["--mdm-full-blocks"] if algorithm == "mdm-full" else []
            if args.device:
                serve_args += ["--device", args.device]
            server = ServeProcess(ckpt, "mdm" if algorithm == "mdm-full" else algorithm,
                                  logs / f"{algorithm}-{precision}.log", max_running=max(args.concurrency),
                                  serve_args=serve_args, sglang_args=["--enable-metrics"])
            try:
                startup[f"{algorithm}/{precision}"] = server.wait_ready(timeout=args.startup_timeout)
                client = server.client(timeout=args.request_timeout)
                model = client.models.list().data[0].id
                warm = [BenchRequest(requests[0].messages, 8)] * 2
                run_load(client, model, warm, 2, progress=False)  # compile caches, first-image paths: not timed
                for c in args.concurrency:
                    row, det = measure(client, model, requests, c, algorithm=algorithm, precision=precision,
                                       metrics_url=server.base_url, headers=server.headers, pid=server.proc.pid,
                                       progress=not args.quiet)
                    row["server_healthy_after"] = server.healthy()
                    rows.append(row)
                    details.append(det)
            finally:
                server.stop()
    add_ratios(rows)
    answers_equal_ar(rows, details)
    return {"schema": SCHEMA, "kind": "serve", "environment": environment(),
            "settings": {"model": args.model, "dataset": args.dataset_label, "requests": len(requests),
                         "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
                         "algorithms": args.algorithms, "precisions": args.precisions,
                         "server_startup_s": startup, "command": " ".join(["fast-dvlm", "bench", *args.argv])},
            "summary": rows, "details": details,
            "notes": {"compute dtype": "bf16 on a GPU; float32 on CPU (SGLang's CPU path), labelled bf16 "
                                       "for the unquantized checkpoint",
                      "tokens/NFE": "see each row's nfe_convention"}}


def online_bench(args, requests: list[BenchRequest]) -> dict:
    from openai import OpenAI

    base = args.base_url.rstrip("/")
    api_base = base if base.endswith("/v1") else base + "/v1"
    root = api_base[: -len("/v1")]
    client = OpenAI(base_url=api_base, api_key=args.api_key or "none", max_retries=0, timeout=args.request_timeout)
    try:
        model = args.model_name or client.models.list().data[0].id
    except Exception as e:
        raise SystemExit(f"fast-dvlm bench online: cannot reach {api_base}: {type(e).__name__}: {e}") from None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    metrics_url = root if prometheus.fetch(root, headers) is not None else None
    rows, details = [], []
    run_load(client, model, [BenchRequest(requests[0].messages, 8)], 1, progress=False)  # warm-up
    for c in args.concurrency:
        row, det = measure(client, model, requests, c, algorithm=args.algorithm, precision=args.precision,
                           metrics_url=metrics_url, headers=headers, pid=None, progress=not args.quiet)
        rows.append(row)
        details.append(det)
    add_ratios(rows)
    return {"schema": SCHEMA, "kind": "online", "environment": environment(args.device_label),
            "settings": {"base_url": base, "model": model, "dataset": args.dataset_label,
                         "requests": len(requests), "max_new_tokens": args.max_new_tokens,
                         "concurrency": args.concurrency, "metrics": metrics_url is not None,
                         "command": " ".join(["fast-dvlm", "bench", *args.argv])},
            "summary": rows, "details": details,
            "notes": {"environment": "the client's machine; the server's device is --device-label if given",
                      "tokens/NFE": "from the server's /metrics where it exports ours, else AR's count "
                                    "(--algorithm ar) or none"}}


def default_out(kind: str, model: str) -> Path:
    name = "demo" if model == "demo" else Path(model).name or "model"
    device = "cuda" if _has_cuda() else "cpu"
    return RESULTS / f"bench_{kind}_{device}_{name}.json"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
