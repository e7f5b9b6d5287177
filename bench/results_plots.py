"""PNG plots of the results benchmark: held-out metric and ε per round, for bench/results.py."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from results_run import TaskResult

# Metric drawn per round for each task, and whether lower is better.
PLOT_METRIC = {
    "lab-forecast": ("mae", True),
    "crs-risk": ("log-loss", True),
    "cell-state": ("accuracy", False),
}


def _value(metrics: dict[str, float], name: str) -> float:
    return float(metrics.get(name, math.nan))


def _epsilon_by_round(result: TaskResult) -> dict[str, list[float]]:
    # Cumulative ε of each site after each round, from the round manifests.
    by_site: dict[str, list[float]] = {site.name: [] for site in result.sites}
    for manifest in result.manifests:
        spent = {entry["site"]: entry.get("epsilon-total") for entry in manifest["sites"]}
        for name, values in by_site.items():
            value = spent.get(name)
            values.append(float(value) if value is not None else math.nan)
    return by_site


def plot_task(result: TaskResult, out: Path) -> Path:
    """Draw the pooled held-out metric and the cumulative ε per round; return the PNG path."""
    metric, lower_is_better = PLOT_METRIC[result.task]
    rounds = list(range(len(result.federated_by_round)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

    # Pooled held-out metric per round
    left.plot(
        rounds,
        [_value(m, metric) for m in result.federated_by_round],
        marker="o",
        linewidth=2,
        label="federated, DP",
    )
    for name, alone in result.alone.items():
        values = [_value(result.federated_by_round[0], metric)]
        values += [_value(m, metric) for m in alone.pooled_by_round]
        left.plot(rounds, values, marker=".", linestyle=":", label=f"{name} alone, DP")
    left.axhline(
        _value(result.centralised.pooled, metric),
        color="black",
        linestyle="--",
        label="centralised, no DP",
    )
    left.axhline(
        _value(result.centralised_matched.pooled, metric),
        color="black",
        linestyle=":",
        label="centralised, no DP, federated schedule",
    )
    left.axhline(
        _value(result.baseline_pooled, metric), color="grey", linestyle="-.", label="baseline"
    )
    direction = "lower is better" if lower_is_better else "higher is better"
    left.set_title(f"{result.task}: {metric} on pooled held-out patients ({direction})")
    left.set_xlabel("round (0 = initial model)")
    left.set_ylabel(metric)
    left.set_xticks(rounds)
    left.legend(fontsize=7, loc="best")

    # Cumulative ε per site
    epsilon_rounds = list(range(1, len(result.manifests) + 1))
    for name, values in _epsilon_by_round(result).items():
        right.plot(epsilon_rounds, values, marker="o", label=name)
    caps = {site.epsilon_cap for site in result.sites}
    for cap in caps:
        right.axhline(cap, color="red", linestyle="--", linewidth=1, label=f"ε cap {cap:g}")
    accountant = result.alone[next(iter(result.alone))].accountant.upper() if result.alone else ""
    right.set_title(f"cumulative ε per site ({accountant}, δ per site, unit: patient)")
    right.set_xlabel("round")
    right.set_ylabel("ε")
    right.set_xticks(epsilon_rounds)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)

    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
