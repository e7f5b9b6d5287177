"""A PNG of one patient's lab panel: observed values, the forecast median and its intervals."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from client.twin.patient import PatientTwin

__all__ = ["plot_twin"]

# Days of observed history shown before the forecast.
HISTORY_DAYS = 30.0


def plot_twin(twin: PatientTwin, path: Path) -> None:
    """Draw one panel per forecast code and write the figure to `path`."""
    lab = twin.lab
    if lab is None:
        return
    count = len(lab.codes)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False, constrained_layout=True
    )
    last_day = lab.day_offsets[0] - 1.0
    for k, code in enumerate(lab.codes):
        axis = axes[k // columns][k % columns]
        seen = lab.observed.loc[
            (lab.observed["code"] == code) & (lab.observed["day_offset"] >= last_day - HISTORY_DAYS)
        ]
        axis.plot(
            seen["day_offset"], seen["value"], "o-", color="0.25", ms=3, lw=0.8, label="observed"
        )
        for level, alpha in ((0.95, 0.18), (0.8, 0.35)):
            low, high = lab.bounds[level]
            if not (np.isfinite(low[:, k]).all() and np.isfinite(high[:, k]).all()):
                continue  # too few held-out values to calibrate this level
            axis.fill_between(
                lab.day_offsets,
                low[:, k],
                high[:, k],
                color="tab:blue",
                alpha=alpha,
                step=None,
                label=f"{level:.0%} interval",
            )
            axis.errorbar(
                lab.day_offsets,
                lab.median[:, k],
                yerr=[lab.median[:, k] - low[:, k], high[:, k] - lab.median[:, k]],
                fmt="none",
                ecolor="tab:blue",
                alpha=0.6,
                lw=1.0,
            )
        axis.plot(lab.day_offsets, lab.median[:, k], "s", color="tab:blue", ms=4, label="forecast")
        axis.set_title(f"{code} [{lab.units[k]}]", fontsize=9)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("day", fontsize=8)
    for k in range(count, rows * columns):
        axes[k // columns][k % columns].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    mode = "per-patient twin" if lab.fit.used else "global model (fine-tuning did not help)"
    figure.suptitle(f"Patient {twin.patient_id}: lab forecast, {mode}", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
