"""Draw the fwd+bwd ratio to the frozen linear from a results CSV: ``python -m bench.plot results.csv``."""

from __future__ import annotations

import csv
import sys


def plot(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "fwd+bwd" and r["status"] == "ok"]
    if not rows:
        raise SystemExit(f"{csv_path}: no successful fwd+bwd rows to plot")
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(providers)}  # one colour per provider in every panel
    dropouts = sorted({r["p"] for r in rows}, key=float)
    most_cases = max(len({(r["K"], r["N"], r["T"], r["r"]) for r in rows if r["p"] == p}) for p in dropouts)
    fig, axes = plt.subplots(len(dropouts), 1, figsize=(min(18, max(8, 2.2 * most_cases)), 3.6 * len(dropouts)),
                             squeeze=False)
    for ax, p in zip(axes[:, 0], dropouts):
        cases = list(dict.fromkeys(f"{r['K']}->{r['N']}\nT={r['T']} r={r['r']}" for r in rows if r["p"] == p))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {f"{r['K']}->{r['N']}\nT={r['T']} r={r['r']}": float(r["ratio_to_linear"])
                      for r in rows if r["p"] == p and r["provider"] == provider}
            if not values:
                continue
            xs = [j + i * width for j, c in enumerate(cases) if c in values]
            ax.bar(xs, [values[c] for c in cases if c in values], width, label=provider, color=colors[provider])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
        ax.set_title(f"dropout p = {p} ({rows[0]['dtype']}, {rows[0]['device_name']})", fontsize=10)
        ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m bench.plot RESULTS.csv [OUT.png]")
    plot(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else sys.argv[1].rsplit(".", 1)[0] + ".png")
