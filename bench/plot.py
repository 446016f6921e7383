"""Draw the fwd+bwd ratio to the frozen linear from a results CSV: ``python -m bench.plot results.csv``.

One panel per dropout probability, one bar per (case, provider): the median of the
per-repeat ratios to the frozen ``nn.Linear`` timed in the same run (lower is better, 1.0
is the limit), whiskers from the 20th to the 80th percentile, each provider labelled with
the backend it ran on. The legend sits above the panels, clear of the bars. Shapes are
in_features x out_features.
"""

from __future__ import annotations

import csv
import sys


def load_rows(csv_path: str) -> list[dict]:
    """The successful fwd+bwd rows of a results CSV."""
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "fwd+bwd" and r["status"] == "ok"]
    if not rows:
        raise SystemExit(f"{csv_path}: no successful fwd+bwd rows to plot")
    return rows


def provider_label(row: dict) -> str:
    """``fused_lora (cpu)``: the provider and the backend it ran on."""
    return f"{row['provider']} ({row['backend']})" if row.get("backend") else row["provider"]


def ratio_spread(row: dict) -> tuple[float, float, float]:
    """(median, p20, p80) of the ratio to the frozen linear.

    The CSV's ``ratio_p20`` / ``ratio_p80`` columns when present (percentiles of the
    per-repeat ratios); otherwise the provider's own time spread scaled onto its median
    ratio (``ratio * p20_ms / median_ms``).
    """
    ratio = float(row["ratio_to_linear"])
    if row.get("ratio_p20") and row.get("ratio_p80"):
        return ratio, float(row["ratio_p20"]), float(row["ratio_p80"])
    median = float(row["median_ms"])
    return ratio, ratio * float(row["p20_ms"]) / median, ratio * float(row["p80_ms"]) / median


def case_label(row: dict) -> str:
    return f"{row['K']}x{row['N']}\nT={row['T']} r={row['r']}"


def draw(rows: list[dict]):
    """The matplotlib figure for the rows of ``load_rows``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(provider_label(r) for r in rows))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # one colour per provider in every panel
    dropouts = sorted({r["p"] for r in rows}, key=float)
    most_cases = max(len({case_label(r) for r in rows if r["p"] == p}) for p in dropouts)
    fig, axes = plt.subplots(len(dropouts), 1, figsize=(min(18, max(8, 2.2 * most_cases)), 3.6 * len(dropouts)),
                             squeeze=False)
    width = 0.8 / len(labels)
    for ax, p in zip(axes[:, 0], dropouts):
        cases = list(dict.fromkeys(case_label(r) for r in rows if r["p"] == p))
        for i, label in enumerate(labels):
            spreads = {case_label(r): ratio_spread(r) for r in rows if r["p"] == p and provider_label(r) == label}
            present = [c for c in cases if c in spreads]
            if not present:
                continue
            xs = [cases.index(c) + i * width for c in present]
            medians = [spreads[c][0] for c in present]
            errors = [[spreads[c][0] - spreads[c][1] for c in present], [spreads[c][2] - spreads[c][0] for c in present]]
            ax.bar(xs, medians, width, yerr=errors, capsize=2, label=label, color=colors[label],
                   error_kw={"elinewidth": 0.8, "ecolor": "black"})
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel("fwd+bwd time / frozen nn.Linear\n(lower is better)", fontsize=9)
        ax.set_title(f"dropout p = {p} ({rows[0]['dtype']}, {rows[0]['device_name']}); "
                     f"bars: median, whiskers: p20-p80", fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    # NOTE: one legend for the figure, above the panels: it never covers a bar.
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    rows_of_legend = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.06 + 0.035 * rows_of_legend) / len(dropouts)))
    return fig


def plot(csv_path: str, png_path: str) -> None:
    """Write the PNG for a results CSV."""
    fig = draw(load_rows(csv_path))
    import matplotlib.pyplot as plt

    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m bench.plot RESULTS.csv [OUT.png]")
    plot(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else sys.argv[1].rsplit(".", 1)[0] + ".png")
