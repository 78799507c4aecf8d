"""Bar charts of step time, bytes saved for backward and peak memory per method, as ratios to limit."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("step_time_s_ratio", "step time / limit"),
    ("step_cpu_s_ratio", "step CPU time / limit"),
    ("saved_bytes_ratio", "saved for backward / limit"),
    ("peak_mem_bytes_ratio", "peak memory / limit"),
)


def plot_ratios(records: list[dict], path: str | Path) -> None:
    """One panel per figure; bars are methods, grouped by (model, batch x seq)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records))
    groups = list(dict.fromkeys((r["model"], r["batch"], r["seq_len"]) for r in records))
    width = 0.8 / len(groups)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(8, 1.6 * len(methods)), 3.2 * len(PANELS)))
    for ax, (field, title) in zip(axes, PANELS, strict=True):
        for i, (model, batch, seq_len) in enumerate(groups):
            values = {
                r["method"]: r[field] or 0.0
                for r in records
                if (r["model"], r["batch"], r["seq_len"]) == (model, batch, seq_len)
            }
            xs = [m + (i - (len(groups) - 1) / 2) * width for m in range(len(methods))]
            ax.bar(xs, [values.get(m, 0.0) for m in methods], width, label=f"{model} {batch}x{seq_len}")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0.0)
    axes[0].legend(fontsize="small", ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
