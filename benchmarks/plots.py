"""PNG plots of a bench report: tokens/s by algorithm and concurrency, latency CDFs, spec's
acceptance histogram (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _label(row: dict) -> str:
    return f"{row['algorithm']} {row['precision']}"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_forward(report: dict, path: Path) -> Path:
    """Forward time by batch size (one line per forward and precision, the largest context) and
    each forward's time over its roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["forwards"]
    context = max(r["context"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (precision, forward) in dict.fromkeys((r["precision"], r["forward"]) for r in rows):
        pts = sorted((r["batch_size"], r["ms"], r["x_roofline"]) for r in rows
                     if r["precision"] == precision and r["forward"] == forward and r["context"] == context)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{forward} {precision}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{forward} {precision}")
    for ax, ylabel in zip(axes, ("ms per forward", "time / roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    axes[0].set_title(f"context {context}")
    env = report["environment"]
    fig.suptitle(f"{report['settings']['model']} on {env['device']} ({env.get('commit') or '?'})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_report(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    details = {d["key"]: d for d in report.get("details", [])}
    spec_rows = [r for r in rows if r.get("acceptance_histogram")]
    ncols = 3 if spec_rows else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4))

    ax = axes[0]  # tokens/s by algorithm and concurrency
    for label in dict.fromkeys(_label(r) for r in rows):
        pts = sorted((r["batch_size"], r["output_tokens_per_s"]) for r in rows if _label(r) == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.set_title("throughput")
    ax.legend(fontsize=7)

    ax = axes[1]  # end-to-end latency CDF, one line per configuration
    for r in rows:
        lat = sorted(details.get(r.get("key"), {}).get("e2e_latency_s", []))
        if lat:
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post",
                    label=f"{_label(r)} c{r['batch_size']}")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency CDF")
    ax.legend(fontsize=6)

    if spec_rows:
        ax = axes[2]  # tokens per spec round
        width = 0.8 / len(spec_rows)
        for i, r in enumerate(spec_rows):
            hist = {int(k): v for k, v in r["acceptance_histogram"].items()}
            total = sum(hist.values()) or 1
            ks = sorted(hist)
            ax.bar([k + i * width for k in ks], [hist[k] / total for k in ks], width=width,
                   label=f"{_label(r)} c{r['batch_size']}")
        ax.set_xlabel("tokens emitted per round (accepted drafts + 1)")
        ax.set_ylabel("fraction of rounds")
        ax.set_title("spec acceptance")
        ax.legend(fontsize=6)

    env = report["environment"]
    fig.suptitle(f"{report['settings'].get('model', '')} on {env['device']} ({env.get('commit') or '?'})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
