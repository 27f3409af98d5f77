"""The testbed's results: a table of measured vs predicted, a plot, and what they were run on."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

from blockswarm.testbed.run import relative_errors


TABLE_ROWS = ("mean_per_token_s", "p50_per_token_s", "p90_per_token_s", "mean_ttft_s", "p50_ttft_s", "p90_ttft_s",
              "mean_wait_s")


def print_table(results: dict) -> None:
    """Measured and predicted per policy and metric (mean, p50, p90) with the relative error, and
    CG-BPRR's reduction of mean per-token time against PETALS on both sides when both ran."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="testbed (measured) vs simulator (predicted), scenario units")
    for column in ("policy", "metric", "measured", "predicted", "error"):
        table.add_column(column, justify="right" if column in ("measured", "predicted", "error") else "left")
    for policy, result in results.items():
        errors = relative_errors(result["predicted"], result["measured"], TABLE_ROWS)
        for metric in TABLE_ROWS:
            table.add_row(policy, metric, f"{result['measured'][metric]:.4f}", f"{result['predicted'][metric]:.4f}",
                          f"{errors[metric] * 100:+.1f} %")
    console = Console()
    console.print(table)
    reduction = cgbprr_reduction(results)
    if reduction is not None:
        console.print(f"CG-BPRR's reduction of mean per-token time against PETALS: measured "
                      f"{reduction['measured'] * 100:.1f} %, predicted {reduction['predicted'] * 100:.1f} %")


def cgbprr_reduction(results: dict) -> dict | None:
    """1 − CG-BPRR's mean per-token time / PETALS', measured and predicted (None unless both ran)."""
    if "petals" not in results or "cgbprr" not in results:
        return None
    return {kind: 1 - results["cgbprr"][kind]["mean_per_token_s"] / results["petals"][kind]["mean_per_token_s"]
            for kind in ("measured", "predicted")}


def write_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for policy, result in results.items():
        rows = result["per_request"]
        measured = [r["measured_per_token_s"] for r in rows]
        predicted = [r["predicted_per_token_s"] for r in rows]
        axes[0].scatter(measured, predicted, s=10, label=policy)
        for values, style in ((measured, "-"), (predicted, "--")):
            ordered = sorted(values)
            axes[1].plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style,
                         label=f"{policy} {'measured' if style == '-' else 'predicted'}")
    low = min(min(r["measured_per_token_s"] for r in res["per_request"]) for res in results.values())
    high = max(max(r["measured_per_token_s"] for r in res["per_request"]) for res in results.values())
    axes[0].plot([low, high], [low, high], "k:", linewidth=1)
    axes[0].set(xlabel="measured per-token time (s)", ylabel="predicted (s)", title="per request")
    axes[1].set(xlabel="per-token time (s)", ylabel="fraction of requests", title="CDF")
    for axis in axes:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metadata() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "load": os.getloadavg()[0]}
