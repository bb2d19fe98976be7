"""Our server's counters from its Prometheus text (`/metrics`, `--enable-metrics`), differenced
over a run: NFE, and spec's per-round histograms (`fast_dvlm_sglang/sglang_plugin/metrics.py`)."""

from __future__ import annotations

SPEC_FORWARDS = "fast_dvlm:spec_forwards_total"
MDM_FORWARDS = "fast_dvlm:mdm_forwards_total"
ROUND_TOKENS = "fast_dvlm:spec_round_tokens_bucket"
DRAFT_LENGTH = "fast_dvlm:spec_draft_length_bucket"


def parse(text: str) -> dict[str, float]:
    """Sample name (with its labels) -> value, summed over duplicates (multiprocess series)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def counter(samples: dict[str, float], name: str) -> float | None:
    """A counter's value (unlabelled), or None if the server does not export it."""
    return samples.get(name)


def histogram_counts(samples: dict[str, float], bucket_name: str) -> dict[int, int]:
    """Observations per integer bucket of a histogram with buckets 0, 1, 2, ... (cumulative
    `le` buckets differenced); empty if the histogram is absent."""
    cumulative = {}
    for name, value in samples.items():
        if name.startswith(bucket_name + "{") and 'le="' in name:
            le = name.split('le="', 1)[1].split('"', 1)[0]
            if le != "+Inf":
                cumulative[float(le)] = value
    out, prev = {}, 0.0
    for le in sorted(cumulative):
        n = round(cumulative[le] - prev)
        prev = cumulative[le]
        if n:
            out[int(le)] = n
    return out


def fetch(base_url: str, headers: dict | None = None) -> dict[str, float] | None:
    """The server's samples, or None if it serves no /metrics (metrics off, or another server)."""
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers or {}, timeout=30)
    except httpx.HTTPError:
        return None
    return parse(r.text) if r.status_code == 200 else None
