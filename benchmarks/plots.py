"""PNG plots of a benchmark run (matplotlib, no display needed)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(sweep, points, path: Path):
    """Time of every side against the swept parameter (log scale) and fsskern's speed-up."""
    xs = [p["x"] for p in points]
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_time.plot(xs, [p["reference_ms"] for p in points], "o-", label="pure PyTorch reference")
    ax_time.plot(xs, [p["fsskern_ms"] for p in points], "o-", label="fsskern")
    for name in points[0]["peers_ms"]:
        ax_time.plot(xs, [p["peers_ms"][name] for p in points], "o--", label=name)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median time (ms)")
    ax_speed.plot(xs, [p["reference_ms"] / p["fsskern_ms"] for p in points], "o-", color="C1")
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    ax_speed.set_ylabel("speed-up over the reference (x)")
    for ax in (ax_time, ax_speed):
        ax.set_xlabel(sweep.xlabel)
        if sweep.log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(sweep.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_threads(rows, path: Path):
    """Speed-up from 1 to 2 threads of the reference and of fsskern, per case."""
    labels = [r["case"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar([x - 0.2 for x in xs], [r["reference_1t_ms"] / r["reference_2t_ms"] for r in rows], 0.4,
           label="reference")
    ax.bar([x + 0.2 for x in xs], [r["fsskern_1t_ms"] / r["fsskern_2t_ms"] for r in rows], 0.4, label="fsskern")
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), labels, rotation=15, fontsize=8)
    ax.set_ylabel("time at 1 thread / time at 2 threads")
    ax.set_title("thread scaling (2 = perfect on 2 cores)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(rows, path: Path):
    """Achieved rate of every main case as a percentage of this machine's limit for it."""
    rows = [r for r in rows if r.get("roofline")]
    labels = [f"{r['case']}\n{r['size']}" for r in rows]
    pct = [r["roofline"]["percent_of_limit"] for r in rows]
    colors = ["C0" if r["roofline"]["kind"] == "flop" else "C2" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), pct, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the limit (blue: GEMM GFLOP/s at the same shape; green: copy bandwidth)")
    ax.axvline(100, color="grey", lw=0.8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
