"""Lab-forecast twin: next-bin values of the lab panel with Gaussian predictive intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models.examples import TaskExamples, require_columns
from models.metrics import Z_90, forecast_metrics
from models.spec import FeatureSpec, SpecError

__all__ = [
    "LabForecastNet",
    "LabForecastTask",
    "LabScaling",
    "forecast_targets",
    "predict_interval",
    "predict_next",
]

TASK = "lab-forecast"
TENSOR_NAMES = ("values", "mask", "last", "seen", "gap", "time")

# Standardised log-variance is kept in [LOG_VAR_MIN, LOG_VAR_MAX] by a scaled tanh,
# so the predictive std lies in about [0.03, 4.5] plausible-range quarter widths.
LOG_VAR_MIN = -7.0
LOG_VAR_MAX = 3.0

# Scale of the time feature: days since the time origin divided by this.
TIME_SCALE_DAYS = 30.0


@dataclass(frozen=True)
class LabScaling:
    """Standardisation of lab values with constants taken from the spec alone.

    A value v of a code becomes z = (T(v) − center) / scale, where T is the
    code's transform (log1p or identity), center is the midpoint of the
    transformed plausible range [low, high] and scale a quarter of its width,
    so the plausible range maps to [−2, 2]. The constants depend on the spec
    only, never on patient data, so nothing about a site's patients is released
    through them.
    """

    codes: tuple[str, ...]
    center: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    log1p: npt.NDArray[np.bool_]

    @classmethod
    def from_spec(cls, spec: FeatureSpec, codes: Sequence[str]) -> LabScaling:
        """Compute the constants of these panel codes from the spec's plausible ranges."""
        centers, scales, logs = [], [], []
        for code in codes:
            lab = spec.lab(code)
            is_log = lab.transform == "log1p"
            low = math.log1p(max(lab.low, 0.0)) if is_log else lab.low
            high = math.log1p(max(lab.high, 0.0)) if is_log else lab.high
            centers.append(0.5 * (low + high))
            scales.append(max(0.25 * (high - low), 1e-6))
            logs.append(is_log)
        return cls(
            codes=tuple(codes),
            center=np.asarray(centers, dtype=np.float64),
            scale=np.asarray(scales, dtype=np.float64),
            log1p=np.asarray(logs, dtype=bool),
        )

    def standardize(self, values: npt.ArrayLike, column: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Standardise original-unit values; `column` is each value's code index."""
        v = np.asarray(values, dtype=np.float64)
        c = np.asarray(column, dtype=np.int64)
        transformed = np.where(self.log1p[c], np.log1p(np.maximum(v, 0.0)), v)
        return np.asarray((transformed - self.center[c]) / self.scale[c], dtype=np.float64)


def task_settings(spec: FeatureSpec) -> tuple[tuple[str, ...], float, int, int]:
    """Return codes, bin-hours, lookback-bins and max-bins of the lab-forecast task."""
    settings = spec.task(TASK)
    try:
        codes = tuple(str(c) for c in settings["codes"])
        bin_hours = float(settings["bin-hours"])
        lookback = int(settings["lookback-bins"])
        max_bins = int(settings["max-bins"])
    except KeyError as err:
        msg = f"{spec.source}: [tasks.{TASK}] lacks the key {err.args[0]!r}."
        raise SpecError(msg) from err
    if not codes or bin_hours <= 0 or lookback < 1 or max_bins < 2:
        msg = (
            f"{spec.source}: [tasks.{TASK}] needs codes, bin-hours > 0, lookback-bins >= 1 "
            f"and max-bins >= 2; got {len(codes)} codes, {bin_hours}, {lookback}, {max_bins}."
        )
        raise SpecError(msg)
    for code in codes:
        spec.lab(code)
    return codes, bin_hours, lookback, max_bins


class LabForecastNet(nn.Module):
    """Per-position MLP over a lookback window that predicts the next bin of every code.

    For each position t of a patient row, the input is the standardised values
    and observation masks of the `lookback` bins ending at t. Per code, it also
    gets the last observed value, whether the code was ever observed and the
    bins since then, plus the time features. The output is a Gaussian per code for bin
    t + 1: mean = last observed value + a learnt change, and a bounded
    log-variance. Only Linear layers hold parameters, so Opacus computes
    per-patient gradients by summing over positions.

    The buffers `center`, `scale` and `log1p` (see `LabScaling`) are part of the
    state_dict so that forecasts can be turned back into original units anywhere.
    """

    def __init__(
        self,
        scaling: LabScaling,
        *,
        lookback: int,
        n_time: int = 3,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        n_codes = len(scaling.codes)
        self.n_codes = n_codes
        self.lookback = lookback
        in_features = 2 * n_codes * lookback + 3 * n_codes + n_time
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
        )
        self.head = nn.Linear(hidden, 2 * n_codes)

        # Start at "no change, moderate spread" so the untrained net equals LOCF.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

        self.register_buffer("center", torch.tensor(scaling.center, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scaling.scale, dtype=torch.float32))
        self.register_buffer("log1p", torch.tensor(scaling.log1p, dtype=torch.float32))

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        # (P, T, C) -> (P, T, C * lookback): the bins t - lookback + 1 .. t, zero-padded.
        padded = F.pad(x, (0, 0, self.lookback - 1, 0))
        windows = padded.unfold(1, self.lookback, 1)
        return windows.reshape(x.shape[0], x.shape[1], self.n_codes * self.lookback)

    def forward(
        self,
        values: torch.Tensor,
        mask: torch.Tensor,
        last: torch.Tensor,
        seen: torch.Tensor,
        gap: torch.Tensor,
        time: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the standardised mean and log-variance of the next bin, each (P, T, C)."""
        features = torch.cat(
            [self._window(values * mask), self._window(mask), last * seen, seen, gap, time],
            dim=-1,
        )
        out = self.head(self.body(features))
        delta, raw_log_var = out.split(self.n_codes, dim=-1)
        mean = last * seen + delta
        half_width = 0.5 * (LOG_VAR_MAX - LOG_VAR_MIN)
        middle = 0.5 * (LOG_VAR_MAX + LOG_VAR_MIN)
        log_var = middle + half_width * torch.tanh(raw_log_var / half_width)
        return mean, log_var


def forecast_targets(
    values: torch.Tensor, mask: torch.Tensor, seen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return next-bin targets and their mask, each (P, T − 1, C).

    A target is the value of a code in bin t + 1 where the code was observed
    there and also at or before bin t. A forecast thus always has a history of
    its own code, and these are exactly the targets that LOCF can predict.
    """
    target = values[:, 1:]
    target_mask = mask[:, 1:] * seen[:, :-1]
    return target, target_mask


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus GradSampleModule keeps the wrapped module in `_module`.
    inner = getattr(model, "_module", model)
    return inner if isinstance(inner, nn.Module) else model


def _patient_days(rows: pd.DataFrame) -> npt.NDArray[np.float64] | None:
    # Days since infusion where known, else days since the first observation.
    day = rows["day"].to_numpy(dtype=np.float64)
    if np.isfinite(day).any():
        return day
    time = pd.to_datetime(rows["time"], utc=True)
    if time.isna().all():
        return None
    first = time.min()
    return np.asarray((time - first).dt.total_seconds().to_numpy() / 86400.0, dtype=np.float64)


def _patient_row(
    rows: pd.DataFrame,
    scaling: LabScaling,
    bin_hours: float,
    max_bins: int,
) -> dict[str, npt.NDArray[np.float32]] | None:
    """Bin one patient's timeline into the arrays of one row, or None without targets."""
    n_codes = len(scaling.codes)
    days = _patient_days(rows)
    if days is None:
        return None
    keep = np.isfinite(days)
    if not keep.any():
        return None
    column = rows["column"].to_numpy()[keep]
    z = scaling.standardize(rows["value"].to_numpy()[keep], column)
    bins = np.floor(days[keep] * 24.0 / bin_hours).astype(np.int64)

    # Keep the last `max_bins` bins ending at the last observed bin.
    last_bin = int(bins.max())
    first_bin = max(int(bins.min()), last_bin - max_bins + 1)
    in_range = bins >= first_bin
    position = bins[in_range] - (last_bin - max_bins + 1)
    column, z = column[in_range], z[in_range]

    # Mean of the standardised values per (bin, code).
    total = np.zeros((max_bins, n_codes))
    count = np.zeros((max_bins, n_codes))
    np.add.at(total, (position, column), z)
    np.add.at(count, (position, column), 1.0)
    mask = count > 0
    values = np.where(mask, total / np.maximum(count, 1.0), 0.0)

    # Last observed value, whether seen, and bins since seen, as of each position.
    last = np.zeros_like(values)
    seen = np.zeros_like(mask)
    gap = np.ones_like(values)
    norm = math.log1p(max_bins)
    current = np.zeros(n_codes)
    since = np.full(n_codes, -1.0)
    for t in range(max_bins):
        current = np.where(mask[t], values[t], current)
        since = np.where(mask[t], 0.0, np.where(since >= 0, since + 1.0, -1.0))
        last[t] = current
        seen[t] = since >= 0
        gap[t] = np.where(since >= 0, np.log1p(np.maximum(since, 0.0)) / norm, 1.0)

    if not (mask[1:] & seen[:-1]).any():
        return None

    # Time features: scaled day of the bin start, infusion known, position in the span.
    origin_known = float(np.isfinite(rows["day"].to_numpy(dtype=np.float64)).any())
    bin_days = (np.arange(max_bins) + last_bin - max_bins + 1) * bin_hours / 24.0
    in_span = (np.arange(max_bins) >= first_bin - (last_bin - max_bins + 1)).astype(np.float64)
    time = np.stack(
        [
            np.clip(bin_days / TIME_SCALE_DAYS, -3.0, 6.0) * in_span,
            np.full(max_bins, origin_known) * in_span,
            in_span,
        ],
        axis=-1,
    )
    arrays = {
        "values": values,
        "mask": mask,
        "last": last,
        "seen": seen,
        "gap": gap,
        "time": time,
    }
    return {name: np.asarray(a, dtype=np.float32) for name, a in arrays.items()}


class LabForecastTask:
    """The `lab-forecast` twin task."""

    name = TASK

    def build_model(self, spec: FeatureSpec) -> nn.Module:
        """Return an untrained `LabForecastNet` for the spec's lab-forecast codes."""
        codes, _, lookback, _ = task_settings(spec)
        return LabForecastNet(LabScaling.from_spec(spec, codes), lookback=lookback)

    def build_examples(
        self,
        spec: FeatureSpec,
        patients: pd.DataFrame,
        timeline: pd.DataFrame,
        events: pd.DataFrame,
        cells: Mapping[str, Any],
        *,
        seed: int = 0,
    ) -> TaskExamples:
        """Bin every patient's lab timeline into one row of `max-bins` positions.

        Values flagged `out_of_range` and absent values are left out. Each bin
        contains the mean of the standardised values of a code in it. A patient
        without any next-bin target (fewer than two bins of one code) is left
        out. The result is deterministic, so `seed` is not used.
        """
        codes, bin_hours, _, max_bins = task_settings(spec)
        require_columns(
            timeline,
            "timeline",
            ("patient_id", "time", "day", "code", "value", "out_of_range"),
            TASK,
        )
        scaling = LabScaling.from_spec(spec, codes)
        column_of = {code: i for i, code in enumerate(codes)}

        rows = timeline.loc[
            timeline["code"].isin(column_of)
            & timeline["value"].notna()
            & ~timeline["out_of_range"].fillna(False).astype(bool)
        ].copy()
        rows["column"] = rows["code"].map(column_of).astype(np.int64)

        patient_ids: list[str] = []
        per_name: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in TENSOR_NAMES}
        for patient_id, patient_rows in rows.groupby("patient_id", sort=True):
            row = _patient_row(patient_rows, scaling, bin_hours, max_bins)
            if row is None:
                continue
            patient_ids.append(str(patient_id))
            for name in TENSOR_NAMES:
                per_name[name].append(row[name])

        n_codes = len(codes)
        shapes = {"time": (0, max_bins, 3)}
        tensors = tuple(
            torch.from_numpy(np.stack(per_name[name]))
            if patient_ids
            else torch.zeros(shapes.get(name, (0, max_bins, n_codes)))
            for name in TENSOR_NAMES
        )
        return TaskExamples(
            task=TASK,
            patient_ids=patient_ids,
            tensors=tensors,
            names=TENSOR_NAMES,
            meta={"codes": codes, "bin-hours": bin_hours},
        )

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Return the Gaussian NLL, averaged over each patient's targets, then over patients."""
        values, mask, _, seen, _, _ = batch
        mean, log_var = model(*batch)
        target, target_mask = forecast_targets(values, mask, seen)
        mu, lv = mean[:, :-1], log_var[:, :-1]

        nll = 0.5 * (math.log(2.0 * math.pi) + lv + (target - mu) ** 2 * torch.exp(-lv))
        per_patient = (nll * target_mask).sum(dim=(1, 2)) / target_mask.sum(dim=(1, 2)).clamp(
            min=1.0
        )
        return per_patient.sum() / max(values.shape[0], 1)

    def evaluate(self, model: nn.Module, examples: TaskExamples) -> dict[str, float]:
        """Return `mae`, `nll`, `coverage-90` and `n-patients` over all held-out targets."""
        target, mean, std = _model_forecasts(model, examples)
        return forecast_metrics(target, mean, std, len(examples))

    def baseline(self, train: TaskExamples, test: TaskExamples) -> dict[str, float]:
        """Return the metrics of last value carried forward (see `models.baselines`)."""
        from models.baselines import last_value_carried_forward

        return last_value_carried_forward(train, test)


def _model_forecasts(
    model: nn.Module, examples: TaskExamples
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    # Targets, predicted means and stds at every target position, standardised.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        mean, log_var = model(*examples.tensors)
    model.train(was_training)
    target, target_mask = forecast_targets(examples["values"], examples["mask"], examples["seen"])
    keep = target_mask > 0
    std = torch.exp(0.5 * log_var[:, :-1])
    return (
        target[keep].double().numpy(),
        mean[:, :-1][keep].double().numpy(),
        std[keep].double().numpy(),
    )


def _next_standardised(
    model: nn.Module, examples: TaskExamples
) -> tuple[torch.Tensor, torch.Tensor]:
    # Mean and std (standardised) of the bin after each patient's last bin.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        mean, log_var = model(*examples.tensors)
    model.train(was_training)
    return mean[:, -1].double(), torch.exp(0.5 * log_var[:, -1]).double()


def predict_next(
    model: nn.Module, examples: TaskExamples
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Forecast the bin after each patient's last bin, in original units.

    Parameters
    ----------
    model
        A trained `LabForecastNet`, plain or wrapped by Opacus.
    examples
        Lab-forecast examples of the patients to forecast; the codes are in
        ``examples.meta["codes"]``.

    Returns
    -------
    mean, std
        Arrays (patients, codes): the mean and standard deviation of the
        predictive distribution in the spec's canonical units. For a log1p code
        the Gaussian on log1p(v) gives a shifted log-normal, whose exact moments
        are returned.
    """
    inner = _unwrap(model)
    mu_z, sigma_z = _next_standardised(model, examples)
    center = inner.get_buffer("center").double()
    scale = inner.get_buffer("scale").double()
    is_log = inner.get_buffer("log1p") > 0.5

    mu = mu_z * scale + center
    sigma = sigma_z * scale
    log_mean = torch.exp(mu + 0.5 * sigma**2) - 1.0
    log_std = torch.sqrt(torch.expm1(sigma**2)) * torch.exp(mu + 0.5 * sigma**2)
    mean = torch.where(is_log, log_mean, mu)
    std = torch.where(is_log, log_std, sigma)
    return mean.numpy(), std.numpy()


def predict_interval(
    model: nn.Module, examples: TaskExamples, z: float = Z_90
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Forecast the next bin as median and mean ± z std interval, in original units.

    The interval is taken on the standardised scale and mapped back through the
    inverse transform, so for a log1p code it is asymmetric. Returns arrays
    (patients, codes): median, lower and upper; the default z gives 90%.
    """
    inner = _unwrap(model)
    mu_z, sigma_z = _next_standardised(model, examples)
    center = inner.get_buffer("center").double()
    scale = inner.get_buffer("scale").double()
    is_log = inner.get_buffer("log1p") > 0.5

    def original(z_value: torch.Tensor) -> torch.Tensor:
        transformed = z_value * scale + center
        return torch.where(is_log, torch.expm1(transformed), transformed)

    return (
        original(mu_z).numpy(),
        original(mu_z - z * sigma_z).numpy(),
        original(mu_z + z * sigma_z).numpy(),
    )
