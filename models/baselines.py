"""Simple reference predictors that each twin submodel must beat on held-out patients.

Every function takes the training and the held-out examples of one task and
returns the same metric names as that task's `evaluate`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from models.examples import TaskExamples
from models.metrics import classification_metrics, forecast_metrics, risk_metrics

__all__ = [
    "CRP_THRESHOLD_MG_L",
    "crp_threshold",
    "easix",
    "last_value_carried_forward",
    "majority_class",
]

# Early (post-infusion) CRP at or above this value, in mg/L, marks high CRS risk.
CRP_THRESHOLD_MG_L = 100.0

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------
# lab-forecast
# ---------------------------------------------------------------------------


def _locf_residuals(examples: TaskExamples) -> tuple[FloatArray, FloatArray, FloatArray]:
    # Targets, LOCF predictions and the code index of each target, standardised.
    values, mask, last, seen = (examples[n] for n in ("values", "mask", "last", "seen"))
    target_mask = (mask[:, 1:] * seen[:, :-1]) > 0
    code = torch.arange(values.shape[-1]).expand_as(values[:, 1:])
    return (
        values[:, 1:][target_mask].double().numpy(),
        last[:, :-1][target_mask].double().numpy(),
        code[target_mask].numpy(),
    )


def last_value_carried_forward(train: TaskExamples, test: TaskExamples) -> dict[str, float]:
    """Score last value carried forward (LOCF) as a Gaussian forecast.

    The mean is the code's last observed value. The std of each code is the
    root mean square of the LOCF residuals on the training patients. A code
    with fewer than two training residuals gets the pooled value, and 1.0 on
    the standardised scale is used when there are no residuals at all. Targets are those of
    `models.lab_forecast.forecast_targets`, so model and baseline are scored on
    the same values.
    """
    train_target, train_pred, train_code = _locf_residuals(train)
    n_codes = train["values"].shape[-1]
    residual = train_target - train_pred
    pooled = float(np.sqrt(np.mean(residual**2))) if residual.size else 1.0
    std_per_code = np.full(n_codes, max(pooled, 1e-3))
    for c in range(n_codes):
        code_residual = residual[train_code == c]
        if code_residual.size >= 2:
            std_per_code[c] = max(float(np.sqrt(np.mean(code_residual**2))), 1e-3)

    target, prediction, code = _locf_residuals(test)
    return forecast_metrics(target, prediction, std_per_code[code], len(test))


# ---------------------------------------------------------------------------
# crs-risk
# ---------------------------------------------------------------------------


def _smoothed_rate(label: FloatArray) -> float:
    # Positive rate with one pseudo-count per class, so it is never 0 or 1.
    return float((label.sum() + 1.0) / (label.size + 2.0))


def _original_feature(examples: TaskExamples, feature: str) -> tuple[FloatArray, FloatArray]:
    # Original-unit values and observation mask of one named crs-risk feature.
    names: tuple[str, ...] = examples.meta.get("features", ())
    if feature not in names:
        nan = np.full(len(examples), math.nan)
        return nan, np.zeros(len(examples))
    j = names.index(feature)
    return (
        examples["original"][:, j].double().numpy(),
        examples["mask"][:, j].double().numpy(),
    )


def crp_threshold(train: TaskExamples, test: TaskExamples) -> dict[str, float]:
    """Score the early-CRP threshold rule as a calibrated probability.

    A patient whose maximum CRP in the early window is at least
    `CRP_THRESHOLD_MG_L` gets the training positive rate of such patients.
    A patient below it gets the training rate of those below. A patient
    without early CRP gets the overall training rate. Each rate has one
    pseudo-count per class (Laplace smoothing).
    """
    train_label = train["label"].double().numpy()
    crp, observed = _original_feature(train, "crp:early-max")
    high = (observed > 0) & (crp >= CRP_THRESHOLD_MG_L)
    low = (observed > 0) & (crp < CRP_THRESHOLD_MG_L)
    p_high = _smoothed_rate(train_label[high])
    p_low = _smoothed_rate(train_label[low])
    p_all = _smoothed_rate(train_label)

    test_crp, test_observed = _original_feature(test, "crp:early-max")
    probability = np.full(len(test), p_all)
    probability[(test_observed > 0) & (test_crp >= CRP_THRESHOLD_MG_L)] = p_high
    probability[(test_observed > 0) & (test_crp < CRP_THRESHOLD_MG_L)] = p_low
    return risk_metrics(test["label"].double().numpy(), probability)


def _log2_easix(examples: TaskExamples) -> FloatArray:
    # log2(LDH [U/L] × creatinine [mg/dL] / platelets [10^9/L]) from the baseline
    # window; NaN where one of the three is missing or not positive.
    ldh, ldh_seen = _original_feature(examples, "ldh:baseline-last")
    creatinine, creatinine_seen = _original_feature(examples, "creatinine:baseline-last")
    platelets, platelets_seen = _original_feature(examples, "platelets:baseline-last")
    usable = (
        (ldh_seen > 0)
        & (creatinine_seen > 0)
        & (platelets_seen > 0)
        & (ldh > 0)
        & (creatinine > 0)
        & (platelets > 0)
    )
    score = np.full(len(examples), math.nan)
    score[usable] = np.log2(ldh[usable] * creatinine[usable] / platelets[usable])
    return score


def _fit_logistic(x: FloatArray, y: FloatArray, ridge: float = 1e-2) -> tuple[float, float]:
    # One-feature logistic regression by Newton's method with a small L2 penalty
    # on the slope; returns (intercept, slope) for the standardised feature.
    w = np.zeros(2)
    design = np.stack([np.ones_like(x), x], axis=1)
    penalty = np.diag([0.0, ridge])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        gradient = design.T @ (p - y) + penalty @ w
        hessian = design.T @ (design * (p * (1.0 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(w[0]), float(w[1])


def easix(train: TaskExamples, test: TaskExamples) -> dict[str, float]:
    """Score EASIX (LDH × creatinine / platelets, baseline window) as a probability.

    log2(EASIX) of the training patients is mapped to a probability by a
    one-feature logistic regression. Patients without the three baseline labs
    get the smoothed training positive rate, as do all patients when fewer
    than two training patients of each class have EASIX.
    """
    train_label = train["label"].double().numpy()
    train_score = _log2_easix(train)
    p_all = _smoothed_rate(train_label)
    has_score = np.isfinite(train_score)
    y = train_label[has_score]

    test_score = _log2_easix(test)
    probability = np.full(len(test), p_all)
    if y.sum() >= 2 and (y.size - y.sum()) >= 2:
        x = train_score[has_score]
        center, spread = float(x.mean()), float(x.std()) or 1.0
        intercept, slope = _fit_logistic((x - center) / spread, y)
        usable = np.isfinite(test_score)
        logit = intercept + slope * (test_score[usable] - center) / spread
        probability[usable] = 1.0 / (1.0 + np.exp(-logit))
    return risk_metrics(test["label"].double().numpy(), probability)


# ---------------------------------------------------------------------------
# cell-state
# ---------------------------------------------------------------------------


def _labelled(examples: TaskExamples) -> npt.NDArray[np.int64]:
    # State index of every real, labelled cell.
    labels = examples["labels"]
    keep = (labels >= 0) & (examples["cell_mask"] > 0)
    return labels[keep].numpy().astype(np.int64)


def majority_class(train: TaskExamples, test: TaskExamples) -> dict[str, float]:
    """Score predicting the most frequent training state for every held-out cell.

    With no labelled training cell the prediction is state 0.
    """
    train_labels = _labelled(train)
    majority = int(np.bincount(train_labels).argmax()) if train_labels.size else 0
    test_labels = _labelled(test)
    return classification_metrics(test_labels, np.full_like(test_labels, majority), len(test))
