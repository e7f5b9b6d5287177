"""Backtests of the lab-forecast twin on held-out patients: forecasts of their latest values.

For each chosen cut in a patient's row, the twin is fine-tuned on the history up to the
cut, as `predict` would have done then, and its forecasts of days 1..H after the cut are
compared with the values observed there. The global model and last value carried forward
are scored on the same values. Calibration (`client.twin.calibration`) and the accuracy
figures of the benchmark use these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from client.twin.forecast import Row, fine_tune, forecast, prefix_row, twin_model
from models.examples import TaskExamples

__all__ = ["BacktestRecords", "backtest"]

# Cuts per patient: before each of the latest this many bins with a new value.
CUTS_PER_PATIENT = 3


@dataclass
class BacktestRecords:
    """One entry per forecast value that was later observed (standardised units).

    Attributes
    ----------
    patient, horizon, code
        Patient id, days after the cut (1..H) and code index of each value.
    observed
        The observed value.
    global_mean, global_std, twin_mean, twin_std
        The forecasts of the global model and of the twin as deployed (the global model
        where the fine-tuning guard fell back to it).
    locf
        The last value observed up to the cut.
    twin_used
        Whether the twin's fine-tuned offset was used for that cut.
    """

    patient: list[str] = field(default_factory=list)
    horizon: list[int] = field(default_factory=list)
    code: list[int] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)
    global_mean: list[float] = field(default_factory=list)
    global_std: list[float] = field(default_factory=list)
    twin_mean: list[float] = field(default_factory=list)
    twin_std: list[float] = field(default_factory=list)
    locf: list[float] = field(default_factory=list)
    twin_used: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.observed)

    def array(self, name: str) -> npt.NDArray[np.float64]:
        """Return one field as a float array."""
        return np.asarray(getattr(self, name), dtype=np.float64)

    def extend(self, other: BacktestRecords) -> None:
        """Append the records of `other`."""
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))


def _cuts(row: Row, count: int) -> list[int]:
    # Positions c where bin c + 1 contains a value of a code seen up to c: the latest `count`.
    _values, mask, _, seen, _, _ = row
    has_next = (mask[0, 1:] * seen[0, :-1]).sum(dim=-1) > 0
    positions = torch.nonzero(has_next).flatten().tolist()
    return [int(p) for p in positions[-count:]]


def backtest_row(
    model: nn.Module,
    patient_id: str,
    row: Row,
    horizon: int,
    *,
    bin_hours: float,
    max_bins: int,
    cuts: int = CUTS_PER_PATIENT,
) -> BacktestRecords:
    """Backtest one patient's row at its latest `cuts` cut points."""
    records = BacktestRecords()
    values, mask, last, seen, _, _ = row
    length = values.shape[1]
    for cut in _cuts(row, cuts):
        history = prefix_row(row, cut)
        outcome = fine_tune(model, history)
        twin = twin_model(model, outcome.offset if outcome.used else None)
        global_forecast = forecast(model, history, horizon, bin_hours=bin_hours, max_bins=max_bins)
        twin_forecast = forecast(twin, history, horizon, bin_hours=bin_hours, max_bins=max_bins)
        for day in range(1, horizon + 1):
            position = cut + day
            if position >= length:
                break
            observed = (mask[0, position] * seen[0, cut]) > 0
            for code in torch.nonzero(observed).flatten().tolist():
                records.patient.append(patient_id)
                records.horizon.append(day)
                records.code.append(int(code))
                records.observed.append(float(values[0, position, code]))
                records.global_mean.append(float(global_forecast.mean[day - 1, code]))
                records.global_std.append(float(global_forecast.std[day - 1, code]))
                records.twin_mean.append(float(twin_forecast.mean[day - 1, code]))
                records.twin_std.append(float(twin_forecast.std[day - 1, code]))
                records.locf.append(float(last[0, cut, code]))
                records.twin_used.append(outcome.used)
    return records


def backtest(
    model: nn.Module,
    examples: TaskExamples,
    indices: list[int],
    horizon: int,
    *,
    cuts: int = CUTS_PER_PATIENT,
) -> BacktestRecords:
    """Backtest the patients at these row indices of lab-forecast examples."""
    bin_hours = float(examples.meta["bin-hours"])
    max_bins = int(examples["values"].shape[1])
    records = BacktestRecords()
    for index in indices:
        row = examples.subset([index]).tensors
        records.extend(
            backtest_row(
                model,
                examples.patient_ids[index],
                row,
                horizon,
                bin_hours=bin_hours,
                max_bins=max_bins,
                cuts=cuts,
            )
        )
    return records
