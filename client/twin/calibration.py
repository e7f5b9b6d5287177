"""Split-conformal calibration of the twin's forecast intervals, and risk calibration figures.

Interval calibration: on the site's held-out patients, the score of each backtested value
is |observed − mean| / std of the twin's Gaussian forecast (standardised units). The
calibrated interval at level 1 − α is mean ± q · std, where q is the ⌈(n + 1)(1 − α)⌉-th
smallest of the n scores of that horizon (split conformal prediction). Coverage is
reported with each held-out patient's values covered by a q computed from the other
held-out patients only, so no value is covered by a quantile it helped to set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

from client.twin.backtest import BacktestRecords

__all__ = [
    "LEVELS",
    "IntervalCalibration",
    "calibrate_intervals",
    "calibration_slope",
    "conformal_quantile",
    "risk_calibration",
]

LEVELS = (0.8, 0.9, 0.95)
# A horizon with fewer scores than this uses the scores of all horizons together.
MIN_SCORES_PER_HORIZON = 20


def conformal_quantile(scores: npt.ArrayLike, level: float) -> float:
    """Return the ⌈(n + 1) · level⌉-th smallest score, or inf when n is too small for the level."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = values.size
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        return math.inf
    return float(values[rank - 1])


@dataclass
class IntervalCalibration:
    """Conformal multipliers of the forecast std per horizon and level, with their coverage.

    Attributes
    ----------
    quantiles
        Level (as a string such as ``"0.9"``) -> one multiplier per horizon day 1..H.
        Where calibration was not possible (no held-out values), the Gaussian z is used.
    method
        ``"split-conformal"`` or ``"gaussian"`` (uncalibrated).
    n_patients, n_values
        Held-out patients and backtested values behind the quantiles.
    coverage, coverage_gaussian
        Level -> share of held-out values inside the calibrated interval (leave one
        patient out) and inside the uncalibrated Gaussian interval; NaN without values.
    """

    quantiles: dict[str, list[float]]
    method: str
    n_patients: int = 0
    n_values: int = 0
    coverage: dict[str, float] = field(default_factory=dict)
    coverage_gaussian: dict[str, float] = field(default_factory=dict)

    def multiplier(self, level: float, horizon: int) -> float:
        """Return the std multiplier of the interval at this level for day `horizon` (1-based)."""
        per_day = self.quantiles[_key(level)]
        return per_day[min(horizon, len(per_day)) - 1]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN and inf as None)."""
        return {
            "method": self.method,
            "quantiles": {k: [_finite(q) for q in v] for k, v in self.quantiles.items()},
            "n-patients": self.n_patients,
            "n-values": self.n_values,
            "coverage": {k: _finite(v) for k, v in self.coverage.items()},
            "coverage-gaussian": {k: _finite(v) for k, v in self.coverage_gaussian.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IntervalCalibration:
        """Read what `to_json` wrote."""

        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        return cls(
            quantiles={
                k: [math.inf if q is None else float(q) for q in v]
                for k, v in data["quantiles"].items()
            },
            method=str(data["method"]),
            n_patients=int(data["n-patients"]),
            n_values=int(data["n-values"]),
            coverage={k: number(v) for k, v in data["coverage"].items()},
            coverage_gaussian={k: number(v) for k, v in data["coverage-gaussian"].items()},
        )


def _key(level: float) -> str:
    return f"{level:g}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _gaussian_z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2.0))


def _per_horizon(
    scores: npt.NDArray[np.float64],
    horizons: npt.NDArray[np.int64],
    horizon: int,
    level: float,
) -> list[float]:
    pooled = conformal_quantile(scores, level)
    result = []
    for day in range(1, horizon + 1):
        own = scores[horizons == day]
        if own.size >= MIN_SCORES_PER_HORIZON:
            result.append(conformal_quantile(own, level))
        else:
            result.append(pooled)
    return result


def calibrate_intervals(
    records: BacktestRecords, horizon: int, levels: Sequence[float] = LEVELS
) -> IntervalCalibration:
    """Calibrate the twin's intervals on backtest records of held-out patients.

    A horizon day with fewer than `MIN_SCORES_PER_HORIZON` scores uses the quantile of the
    scores of all days. Without any record, the Gaussian z of each level is used and the
    method is ``"gaussian"``.
    """
    if len(records) == 0:
        return IntervalCalibration(
            quantiles={_key(level): [_gaussian_z(level)] * horizon for level in levels},
            method="gaussian",
            coverage={_key(level): math.nan for level in levels},
            coverage_gaussian={_key(level): math.nan for level in levels},
        )

    observed = records.array("observed")
    mean = records.array("twin_mean")
    std = records.array("twin_std")
    scores = np.abs(observed - mean) / std
    horizons = np.asarray(records.horizon, dtype=np.int64)
    patients = np.asarray(records.patient, dtype=object)

    quantiles = {_key(level): _per_horizon(scores, horizons, horizon, level) for level in levels}

    # Leave one patient out: each patient's values against the others' quantile.
    coverage: dict[str, float] = {}
    coverage_gaussian: dict[str, float] = {}
    for level in levels:
        inside = np.zeros(scores.size, dtype=bool)
        for patient in np.unique(patients):
            own = patients == patient
            others = _per_horizon(scores[~own], horizons[~own], horizon, level)
            limit = np.asarray([others[min(h, horizon) - 1] for h in horizons[own]])
            inside[own] = scores[own] <= limit
        coverage[_key(level)] = float(inside.mean())
        coverage_gaussian[_key(level)] = float((scores <= _gaussian_z(level)).mean())

    return IntervalCalibration(
        quantiles=quantiles,
        method="split-conformal",
        n_patients=int(np.unique(patients).size),
        n_values=int(scores.size),
        coverage=coverage,
        coverage_gaussian=coverage_gaussian,
    )


def calibration_slope(labels: npt.ArrayLike, probability: npt.ArrayLike) -> float:
    """Return the slope b of the logistic fit P(y = 1) = σ(a + b · logit(p)).

    A slope of 1 means well-spread risks; below 1, risks too extreme. NaN with fewer
    than two patients of either class or when the fit does not converge.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
    if y.size == 0 or min(y.sum(), (1 - y).sum()) < 2:
        return math.nan
    x = np.stack([np.ones_like(p), np.log(p / (1 - p))], axis=1)
    beta = np.zeros(2)
    for _ in range(50):
        fitted = 1.0 / (1.0 + np.exp(-(x @ beta)))
        gradient = x.T @ (y - fitted)
        hessian = x.T @ (x * (fitted * (1 - fitted))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-8:
            return float(beta[1])
    return math.nan


def risk_calibration(labels: npt.ArrayLike, probability: npt.ArrayLike) -> dict[str, float]:
    """Return `brier`, `calibration-slope`, `mean-risk`, `observed-rate` and `n-patients`."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    if y.size == 0:
        nan = math.nan
        return {
            "brier": nan,
            "calibration-slope": nan,
            "mean-risk": nan,
            "observed-rate": nan,
            "n-patients": 0.0,
        }
    return {
        "brier": float(np.mean((p - y) ** 2)),
        "calibration-slope": calibration_slope(y, p),
        "mean-risk": float(p.mean()),
        "observed-rate": float(y.mean()),
        "n-patients": float(y.size),
    }
