"""Serving metrics from per-request timings, computed as the field computes them.

Definitions (those of `python -m sglang.bench_serving`, so our numbers and its numbers mean the
same thing; `benchmarks/README` cross-checks them on one configuration):
- output tokens/s (aggregate): all requests' completion tokens (the server's `usage`) / the wall
  time from the first send to the last answer;
- output tokens/s per request: a request's completion tokens / its end-to-end latency (mean and
  p50 over requests);
- TTFT: send -> first streamed content; end-to-end latency: send -> last byte;
- inter-token latency (ITL): the gaps between consecutive content chunks of a stream (a spec
  chunk can carry several tokens: its ITL is per chunk, as SGLang's client counts it), and TPOT
  per request: (e2e - TTFT) / (completion tokens - 1);
- NFE: model forwards after each prompt's prefill, summed over requests, counted by the server
  (`fast_dvlm:spec_forwards_total`, `fast_dvlm:mdm_forwards_total`) or, for AR, one decode step
  per token after the first (`NFE_CONVENTIONS` names each); tokens/NFE = completion tokens / NFE;
  NFE/s = NFE / wall time;
- percentiles: linear interpolation between the closest ranks (numpy's default).

A report is one JSON object (`SCHEMA`): `environment`, `settings`, and `summary`, one row per
configuration with at least `REQUIRED_ROW_KEYS`; `check_report` says what is missing or wrong.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

SCHEMA = "fast-dvlm-bench/1"
REQUIRED_ROW_KEYS = ("algorithm", "precision", "batch_size", "output_tokens_per_s", "tokens_per_nfe", "ratio_to_ar")
NFE_CONVENTIONS = {
    "ar": "one decode forward per output token after the first (the prefill gives the first)",
    "spec": "server count: every forward after the prompt's prefill (2 per drafting round, 1 per AR step)",
    "mdm": "server count: every denoising forward and block re-encoding after the prompt's prefill, "
           "denoising stopped once a block's filled prefix holds a stop (the reference decoder's count)",
    "mdm-full": "server count, every block denoised to its end (the paper's convention)",
}


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it (seconds on one monotonic clock)."""
    start: float
    end: float
    first_content: float | None = None  # arrival of the first chunk with content
    chunk_times: tuple[float, ...] = ()  # arrival of every chunk with content
    output_tokens: int = 0  # usage.completion_tokens
    prompt_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first_content is None else self.first_content - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks; None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1000.0) -> dict:
    """mean, p50, p90, p99 of `values` x `scale` (seconds -> ms by default); None where empty."""
    vals = [v * scale for v in values]
    if not vals:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": sum(vals) / len(vals), "p50": percentile(vals, 50), "p90": percentile(vals, 90),
            "p99": percentile(vals, 99)}


@dataclass
class RunMeasurement:
    """What one configuration's run measured besides the client's records."""
    duration: float  # first send -> last answer, seconds
    nfe: int | None = None
    round_tokens: dict[int, int] | None = None  # spec: rounds per tokens emitted
    draft_lengths: dict[int, int] | None = None  # spec: rounds per draft length
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # "rss" (server processes) or "cuda" (device memory used)
    extra: dict = field(default_factory=dict)


def ar_nfe(records: Sequence[RequestRecord]) -> int:
    """AR's forwards after the prefill: one decode step per completion token after the first."""
    return sum(max(r.output_tokens - 1, 0) for r in records if r.ok)


def summarize(records: Sequence[RequestRecord], run: RunMeasurement, *, algorithm: str, precision: str,
              concurrency: int) -> dict:
    """One `summary` row (ratio_to_ar is filled by `add_ratios` once AR's row is known)."""
    if run.duration <= 0:
        raise ValueError(f"duration must be > 0, got {run.duration}")
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    nfe = ar_nfe(ok) if algorithm == "ar" and run.nfe is None else run.nfe
    per_request = [r.output_tokens / r.e2e for r in ok if r.e2e > 0]
    row = {
        "algorithm": algorithm,
        "precision": precision,
        "batch_size": concurrency,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "duration_s": run.duration,
        "output_tokens_per_s": tokens / run.duration,
        "output_tokens_per_s_per_request": {"mean": sum(per_request) / len(per_request) if per_request else None,
                                            "p50": percentile(per_request, 50)},
        "tokens_per_nfe": tokens / nfe if nfe else None,
        "nfe": nfe,
        "nfe_per_s": nfe / run.duration if nfe is not None else None,
        "nfe_convention": NFE_CONVENTIONS.get(algorithm),
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itls]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e_latency_ms": distribution([r.e2e for r in ok]),
        "ratio_to_ar": None,
        "peak_memory_bytes": run.peak_memory_bytes,
        "peak_memory_kind": run.peak_memory_kind,
    }
    if run.round_tokens is not None:
        rounds = sum(run.round_tokens.values())
        row["acceptance_histogram"] = {str(k): v for k, v in sorted(run.round_tokens.items())}
        row["mean_tokens_per_round"] = (sum(k * v for k, v in run.round_tokens.items()) / rounds) if rounds else None
    if run.draft_lengths is not None:
        row["draft_length_histogram"] = {str(k): v for k, v in sorted(run.draft_lengths.items())}
    row.update(run.extra)
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """`ratio_to_ar`: output tokens/s over the AR row of the same precision and batch size in the
    same report (None where there is none)."""
    ar = {(r["precision"], r["batch_size"]): r["output_tokens_per_s"] for r in rows if r["algorithm"] == "ar"}
    for r in rows:
        base = ar.get((r["precision"], r["batch_size"]))
        r["ratio_to_ar"] = r["output_tokens_per_s"] / base if base else None
    return rows


def check_report(report: dict) -> list[str]:
    """What makes `report` not a valid bench report (empty: valid)."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}, got {report.get('schema')!r}")
    env = report.get("environment")
    if not isinstance(env, dict) or not env.get("device"):
        problems.append("environment must be an object naming the device")
    rows = report.get("summary")
    if not isinstance(rows, list) or not rows:
        problems.append("summary must be a non-empty list")
        return problems
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            problems.append(f"summary[{i}] lacks {', '.join(missing)}")
            continue
        if not isinstance(row["batch_size"], int) or row["batch_size"] < 1:
            problems.append(f"summary[{i}].batch_size must be a positive integer")
        for key in ("output_tokens_per_s", "tokens_per_nfe", "ratio_to_ar"):
            v = row[key]
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                problems.append(f"summary[{i}].{key} must be a finite number >= 0 or null, got {v!r}")
        if row["algorithm"] == "ar" and row["ratio_to_ar"] not in (None, 1.0):
            problems.append(f"summary[{i}]: an AR row's ratio_to_ar is 1")
    return problems


def markdown_table(rows: Sequence[dict]) -> str:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = ["| algorithm | precision | concurrency | output tok/s | x AR | tok/s per request | tokens/NFE | "
             "NFE/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['precision']} | {r['batch_size']} | {f(r['output_tokens_per_s'])} | "
            f"{f(r['ratio_to_ar'], '.2f')} | {f(r['output_tokens_per_s_per_request']['mean'])} | "
            f"{f(r['tokens_per_nfe'], '.2f')} | {f(r['nfe_per_s'])} | "
            f"{f(r['ttft_ms']['p50'], '.0f')} / {f(r['ttft_ms']['p99'], '.0f')} | "
            f"{f(r['itl_ms']['p50'], '.1f')} / {f(r['itl_ms']['p99'], '.1f')} | "
            f"{f(r['e2e_latency_ms']['p50'], '.0f')} / {f(r['e2e_latency_ms']['p99'], '.0f')} |")
    return "\n".join(lines) + "\n"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _commit() -> str | None:
    """HEAD's short hash (+dirty), else $FAST_DVLM_COMMIT (a copy of the tree without .git, as a
    lent GPU machine gets it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FAST_DVLM_COMMIT") or None


def environment(device: str | None = None) -> dict:
    """Where a report was measured: the device (the GPU's name, or the CPU), versions, commit."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device or gpu or cpu,
        "gpu": gpu,
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sglang": _version("sglang"),
        "fast_dvlm_sglang": _version("fast-dvlm-sglang"),
        "commit": _commit(),
        "date": date.today().isoformat(),
    }
