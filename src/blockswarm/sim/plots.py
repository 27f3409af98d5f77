"""Figures: policies side by side (bars with 95 % intervals, CDF of per-token time) and sweep curves."""

from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(table: dict[str, dict], title: str, path: str) -> None:
    plt = _pyplot()
    figure, (bars, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(table)
    metrics = [("mean_per_token_s", "per token"), ("mean_ttft_s", "TTFT")]
    width = 0.8 / len(metrics)
    for k, (metric, label) in enumerate(metrics):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        bars.bar(xs, [table[n][metric] for n in names], width, yerr=[table[n][f"{metric}_ci95"] for n in names],
                 capsize=4, label=label)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("seconds (mean, 95 % CI across seeds)")
    bars.set_yscale("log")
    bars.legend()
    bars.set_title(title)
    for name in names:
        samples = sorted(table[name]["per_token_samples"])
        if samples:
            cdf.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=name)
    cdf.set_xlabel("per-token time (completion − arrival) / output tokens, s")
    cdf.set_ylabel("fraction of requests")
    cdf.set_xscale("log")
    cdf.grid(alpha=0.3)
    cdf.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_sweep(curves: dict[str, list[tuple[float, float, float]]], parameter: str, title: str, path: str) -> None:
    """curves: policy -> [(value, mean per-token s, ci half-width)]."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], capsize=3,
                      marker="o", label=name)
    axis.set_xlabel(parameter)
    axis.set_ylabel("mean per-token time, s")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
