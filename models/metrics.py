"""Evaluation metrics of the twin submodels, on NumPy arrays of held-out patients."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "Z_90",
    "accuracy",
    "auroc",
    "brier",
    "classification_metrics",
    "expected_calibration_error",
    "forecast_metrics",
    "gaussian_nll",
    "interval_coverage",
    "log_loss",
    "macro_f1",
    "mean_absolute_error",
    "risk_metrics",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Two-sided 90% interval of a Gaussian: mean ± Z_90 × std.
Z_90 = 1.6448536269514722

_EPS = 1e-7


def mean_absolute_error(target: npt.ArrayLike, prediction: npt.ArrayLike) -> float:
    """Return the mean absolute error, NaN when there are no values."""
    y = np.asarray(target, dtype=np.float64)
    p = np.asarray(prediction, dtype=np.float64)
    if y.size == 0:
        return math.nan
    return float(np.mean(np.abs(y - p)))


def gaussian_nll(target: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike) -> float:
    """Return the mean negative log-likelihood (nats) of targets under N(mean, std²)."""
    y = np.asarray(target, dtype=np.float64)
    if y.size == 0:
        return math.nan
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.asarray(std, dtype=np.float64)
    nll = 0.5 * np.log(2.0 * np.pi) + np.log(sigma) + 0.5 * ((y - mu) / sigma) ** 2
    return float(np.mean(nll))


def interval_coverage(
    target: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike, z: float = Z_90
) -> float:
    """Return the fraction of targets inside mean ± z × std, NaN when there are none."""
    y = np.asarray(target, dtype=np.float64)
    if y.size == 0:
        return math.nan
    mu = np.asarray(mean, dtype=np.float64)
    sigma = np.asarray(std, dtype=np.float64)
    return float(np.mean(np.abs(y - mu) <= z * sigma))


def log_loss(label: npt.ArrayLike, probability: npt.ArrayLike) -> float:
    """Return the mean binary cross-entropy (nats), probabilities clipped to [1e-7, 1 − 1e-7]."""
    y = np.asarray(label, dtype=np.float64)
    if y.size == 0:
        return math.nan
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def brier(label: npt.ArrayLike, probability: npt.ArrayLike) -> float:
    """Return the Brier score, the mean squared difference of probability and label."""
    y = np.asarray(label, dtype=np.float64)
    if y.size == 0:
        return math.nan
    p = np.asarray(probability, dtype=np.float64)
    return float(np.mean((p - y) ** 2))


def auroc(label: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Return the area under the ROC curve, NaN unless both classes are present.

    Computed as the Mann-Whitney U statistic with average ranks for ties.
    """
    y = np.asarray(label, dtype=np.float64) >= 0.5
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan

    # Average ranks (1-based) so tied scores count one half.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_scores = s[order]
    start = 0
    while start < s.size:
        stop = start
        while stop + 1 < s.size and sorted_scores[stop + 1] == sorted_scores[start]:
            stop += 1
        ranks[order[start : stop + 1]] = 0.5 * (start + stop) + 1.0
        start = stop + 1

    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_calibration_error(
    label: npt.ArrayLike, probability: npt.ArrayLike, n_bins: int = 10
) -> float:
    """Return the expected calibration error over equal-width probability bins.

    ECE = Σ_b (n_b / n) × |mean label in b − mean probability in b|, with
    `n_bins` bins on [0, 1]; a probability of exactly 1 falls in the last bin.
    """
    y = np.asarray(label, dtype=np.float64)
    if y.size == 0:
        return math.nan
    p = np.asarray(probability, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(ece)


def accuracy(label: npt.ArrayLike, prediction: npt.ArrayLike) -> float:
    """Return the fraction of correct class predictions, NaN when there are none."""
    y = np.asarray(label)
    if y.size == 0:
        return math.nan
    return float(np.mean(y == np.asarray(prediction)))


def macro_f1(label: npt.ArrayLike, prediction: npt.ArrayLike) -> float:
    """Return the F1 score averaged over the classes that occur in labels or predictions."""
    y = np.asarray(label)
    p = np.asarray(prediction)
    if y.size == 0:
        return math.nan
    scores = []
    for cls in np.union1d(y, p):
        true_pos = float(np.sum((y == cls) & (p == cls)))
        false_pos = float(np.sum((y != cls) & (p == cls)))
        false_neg = float(np.sum((y == cls) & (p != cls)))
        scores.append(2.0 * true_pos / (2.0 * true_pos + false_pos + false_neg))
    return float(np.mean(scores))


def forecast_metrics(
    target: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike, n_patients: int
) -> dict[str, float]:
    """Return the lab-forecast metrics `mae`, `nll`, `coverage-90` and `n-patients`."""
    return {
        "mae": mean_absolute_error(target, mean),
        "nll": gaussian_nll(target, mean, std),
        "coverage-90": interval_coverage(target, mean, std),
        "n-patients": float(n_patients),
    }


def risk_metrics(label: npt.ArrayLike, probability: npt.ArrayLike) -> dict[str, float]:
    """Return `log-loss`, `brier`, `auroc`, `ece`, `n-patients` and `n-positive`."""
    y = np.asarray(label, dtype=np.float64)
    return {
        "log-loss": log_loss(y, probability),
        "brier": brier(y, probability),
        "auroc": auroc(y, probability),
        "ece": expected_calibration_error(y, probability),
        "n-patients": float(y.size),
        "n-positive": float(np.sum(y >= 0.5)),
    }


def classification_metrics(
    label: npt.ArrayLike, prediction: npt.ArrayLike, n_patients: int
) -> dict[str, float]:
    """Return the cell-state metrics `accuracy`, `macro-f1`, `n-cells` and `n-patients`."""
    y = np.asarray(label)
    return {
        "accuracy": accuracy(y, prediction),
        "macro-f1": macro_f1(y, prediction),
        "n-cells": float(y.size),
        "n-patients": float(n_patients),
    }
