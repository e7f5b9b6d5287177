"""One patient's twin: fine-tuned lab forecasts, CRS risk and cell-state composition."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from client.twin.basis import ObservationRef
from client.twin.calibration import LEVELS
from client.twin.errors import NoObservationsError, UnknownPatientError
from client.twin.forecast import STEPS, FitOutcome, fine_tune, forecast, twin_model
from client.twin.site import SiteCalibration, SiteContext
from client.twin.state import load_twin, read_offset, retire_task, save_task
from models.cell_state import predict_sample_states
from models.crs_risk import predict_risk
from models.crs_risk import task_settings as crs_settings

__all__ = ["CellComposition", "CrsRisk", "LabForecast", "PatientTwin", "build_twin"]

logger = logging.getLogger(__name__)


@dataclass
class LabForecast:
    """Forecast of the lab panel for days 1..H after the patient's last lab day.

    `median` and each bound are (H, codes) in the codes' canonical units; only codes the
    patient has a value of are kept. `bounds[level]` is the (lower, upper) pair.
    """

    codes: list[str]
    units: list[str]
    periods: list[tuple[datetime, datetime]]
    day_offsets: list[float]
    median: npt.NDArray[np.float64]
    bounds: dict[float, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    fit: FitOutcome
    calibration_method: str
    observed: pd.DataFrame
    origin: datetime
    basis: list[ObservationRef]


@dataclass
class CrsRisk:
    """P(CRS grade >= positive-grade) and the site's calibration figures behind it."""

    probability: float
    positive_grade: float
    calibration: dict[str, float]
    basis: list[ObservationRef]


@dataclass
class CellComposition:
    """Expected cell-state fractions (samples × states) of the patient's single-cell samples."""

    fractions: pd.DataFrame
    cells: dict[str, int]


@dataclass
class PatientTwin:
    """Everything the twin of one patient gives, with the model versions and notes."""

    patient_id: str
    versions: dict[str, str]
    names: dict[str, str] = field(default_factory=dict)
    loinc: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lab: LabForecast | None = None
    risk: CrsRisk | None = None
    cells: CellComposition | None = None
    notes: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    pending: list[Callable[[], object]] = field(default_factory=list, repr=False)

    def commit(self) -> None:
        """Write the twin state changes, once the outputs are in place."""
        for write in self.pending:
            write()
        self.pending.clear()


def _sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _lab_rows(context: SiteContext, patient_id: str, codes: list[str]) -> pd.DataFrame:
    timeline = context.dataset.timeline
    rows = timeline.loc[
        (timeline["patient_id"] == patient_id)
        & timeline["code"].isin(codes)
        & timeline["value"].notna()
        & ~timeline["out_of_range"].fillna(False).astype(bool)
    ]
    return rows.sort_values(["time", "code"])


def _data_sha256(rows: pd.DataFrame, extra: Any = None) -> str:
    # Rounded to 8 significant digits: the site's table cache keeps 10, not a float's 17.
    payload = [
        [pd.Timestamp(t).isoformat(), c, f"{float(v):.8g}"]
        for t, c, v in zip(rows["time"], rows["code"], rows["value"], strict=True)
    ]
    return _sha256({"rows": payload, "extra": extra})


def _origin(
    context: SiteContext, patient_id: str, rows: pd.DataFrame
) -> tuple[datetime, pd.Series]:
    # Time origin of the bins and each row's day, as `models.lab_forecast` defines them.
    day = rows["day"].astype(float)
    if np.isfinite(day.to_numpy()).any():
        infusion = context.dataset.patients.loc[patient_id, "infusion_time"]
        return pd.Timestamp(infusion).to_pydatetime(), day
    first = rows["time"].min()
    days = (rows["time"] - first).dt.total_seconds() / 86400.0
    return pd.Timestamp(first).to_pydatetime(), days


def _fit_lab(
    context: SiteContext,
    twin: PatientTwin,
    mode: str,
    data_sha256: str,
    row: tuple[torch.Tensor, ...],
) -> tuple[FitOutcome, npt.NDArray[np.float32] | None, bool]:
    """Decide between the saved twin, an incremental refit and a fresh fit."""
    task = "lab-forecast"
    state_dir = context.config.state_dir
    version = context.models[task].version
    model = context.networks[task]
    saved = load_twin(state_dir, twin.patient_id).get(task)
    start = None
    if saved is not None and saved.get("global-model") != version:
        reason = f"global model {version} replaced {saved.get('global-model')}"
        twin.pending.append(partial(retire_task, state_dir, twin.patient_id, task, reason))
        twin.notes.append(
            f"lab-forecast: retired the twin of global model {saved.get('global-model')}; "
            f"fine-tuned again on {version}"
        )
    elif saved is not None and saved.get("data-sha256") == data_sha256:
        offset = read_offset(state_dir, twin.patient_id, task)
        fit = FitOutcome(
            bool(saved["fit"]["used"]),
            offset if offset is not None else np.zeros(2 * row[0].shape[-1], dtype=np.float32),
            str(saved["fit"]["reason"]),
            int(saved["fit"]["target-bins"]),
            int(saved["fit"]["holdout-bins"]),
            math.nan,
            math.nan,
        )
        return fit, offset, False
    elif saved is not None and mode == "update":
        start = read_offset(state_dir, twin.patient_id, task)
        twin.notes.append("lab-forecast: new observations; fine-tuned on from the saved twin")
    steps = STEPS // 2 if start is not None else STEPS
    fit = fine_tune(model, row, start=start, steps=steps)
    return fit, (fit.offset if fit.used else None), True


def _lab_forecast(
    context: SiteContext, twin: PatientTwin, calibration: SiteCalibration, horizon: int, mode: str
) -> None:
    task = "lab-forecast"
    examples = context.examples[task]
    if twin.patient_id not in examples.patient_ids:
        twin.notes.append("lab-forecast: no panel code with two days of values; no forecast")
        return
    index = examples.patient_ids.index(twin.patient_id)
    row = examples.subset([index]).tensors
    codes = list(examples.meta["codes"])
    bin_hours = float(examples.meta["bin-hours"])
    max_bins = int(row[0].shape[1])
    rows = _lab_rows(context, twin.patient_id, codes)
    data_sha256 = _data_sha256(rows)

    fit, offset, refit = _fit_lab(context, twin, mode, data_sha256, row)
    model = twin_model(context.networks[task], offset if fit.used else None)
    prediction = forecast(model, row, horizon, bin_hours=bin_hours, max_bins=max_bins)

    # Standardised -> canonical units, through the network's scaling buffers
    center = model.get_buffer("center").double().numpy()
    scale = model.get_buffer("scale").double().numpy()
    is_log = model.get_buffer("log1p").numpy() > 0.5

    def original(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # An infinite conformal multiplier (too few held-out values for the level) stays infinite.
        value = z * scale + center
        with np.errstate(over="ignore", invalid="ignore"):
            return np.where(is_log, np.maximum(np.expm1(value), 0.0), value)

    intervals = calibration.intervals
    bounds = {}
    for level in LEVELS:
        factor = np.asarray(
            [
                intervals.multiplier(level, day) if intervals is not None else math.nan
                for day in range(1, horizon + 1)
            ]
        )[:, None]
        bounds[level] = (
            original(prediction.mean - factor * prediction.std),
            original(prediction.mean + factor * prediction.std),
        )
    seen = row[3][0, -1].numpy() > 0
    keep = [i for i in range(len(codes)) if seen[i]]

    origin, days = _origin(context, twin.patient_id, rows)
    last_bin = int(np.floor(days.max() * 24.0 / bin_hours))
    periods = []
    offsets = []
    for day in range(1, horizon + 1):
        start = origin + timedelta(hours=(last_bin + day) * bin_hours)
        periods.append((start, start + timedelta(hours=bin_hours)))
        offsets.append((last_bin + day + 0.5) * bin_hours / 24.0)
    observed = rows.assign(day_offset=days.to_numpy())[["time", "day_offset", "code", "value"]]
    window_start = origin + timedelta(hours=(last_bin - max_bins + 1) * bin_hours)
    basis = [
        ref
        for ref in context.refs(twin.patient_id)
        if ref.code in codes and ref.time >= window_start
    ]

    twin.lab = LabForecast(
        codes=[codes[i] for i in keep],
        units=[context.spec.lab(codes[i]).unit for i in keep],
        periods=periods,
        day_offsets=offsets,
        median=original(prediction.mean)[:, keep],
        bounds={level: (low[:, keep], high[:, keep]) for level, (low, high) in bounds.items()},
        fit=fit,
        calibration_method="gaussian" if intervals is None else intervals.method,
        observed=observed,
        origin=origin,
        basis=basis,
    )
    if refit:
        twin.changed.append(task)
        save = partial(
            save_task,
            context.config.state_dir,
            twin.patient_id,
            task,
            {
                "global-model": context.models[task].version,
                "data-sha256": data_sha256,
                "patient-specific-part": "head.bias offset (2 x codes)",
                "fit": {
                    "used": fit.used,
                    "reason": fit.reason,
                    "target-bins": fit.target_bins,
                    "holdout-bins": fit.holdout_bins,
                },
            },
            offset,
        )
        twin.pending.append(save)


def _simple_state(
    context: SiteContext, twin: PatientTwin, task: str, data_sha256: str, mode: str
) -> bool:
    """Track a task without patient-specific weights; return False when nothing changed."""
    state_dir = context.config.state_dir
    version = context.models[task].version
    saved = load_twin(state_dir, twin.patient_id).get(task)
    if saved is not None and saved.get("global-model") != version:
        reason = f"global model {version} replaced {saved.get('global-model')}"
        twin.pending.append(partial(retire_task, state_dir, twin.patient_id, task, reason))
        twin.notes.append(f"{task}: retired the twin of global model {saved.get('global-model')}")
    elif saved is not None and saved.get("data-sha256") == data_sha256 and mode == "update":
        return False
    twin.changed.append(task)
    entry = {"global-model": version, "data-sha256": data_sha256}
    twin.pending.append(partial(save_task, state_dir, twin.patient_id, task, entry, None))
    return True


def _crs_risk(
    context: SiteContext, twin: PatientTwin, calibration: SiteCalibration, mode: str
) -> None:
    task = "crs-risk"
    examples = context.examples[task]
    if twin.patient_id not in examples.patient_ids:
        twin.notes.append("crs-risk: no infusion recorded; no CRS risk")
        return
    codes, baseline, early, positive = crs_settings(context.spec)
    rows = _lab_rows(context, twin.patient_id, list(codes))
    after = rows.loc[rows["day"] >= 0]
    if after.empty:
        twin.notes.append("crs-risk: no value on or after the infusion day yet; no CRS risk")
        return
    index = examples.patient_ids.index(twin.patient_id)
    probability = float(predict_risk(context.networks[task], examples.subset([index]))[0])
    infusion = context.dataset.patients.loc[twin.patient_id, "infusion_time"]
    windows = [baseline, early]
    basis = []
    for ref in context.refs(twin.patient_id):
        day = (pd.Timestamp(ref.time) - pd.Timestamp(infusion)).total_seconds() / 86400.0
        if ref.code in codes and any(low <= day <= high for low, high in windows):
            basis.append(ref)
    inside = rows.loc[(rows["day"] >= baseline[0]) & (rows["day"] <= early[1])]
    age = context.dataset.patients.loc[twin.patient_id, "age_at_infusion"]
    _simple_state(context, twin, task, _data_sha256(inside, extra=[str(infusion), str(age)]), mode)
    twin.risk = CrsRisk(probability, positive, calibration.risk or {}, basis)


def _cell_state(context: SiteContext, twin: PatientTwin, mode: str) -> None:
    task = "cell-state"
    samples = {
        sample_id: sample
        for sample_id, sample in sorted(context.dataset.cells.items())
        if str(sample.patient_id) == twin.patient_id
    }
    if not samples:
        twin.notes.append("cell-state: no single-cell sample of this patient")
        return
    states = list(context.spec.task(task)["states"])
    rows = {}
    for sample_id, sample in samples.items():
        probabilities = predict_sample_states(context.networks[task], sample)
        rows[sample_id] = (
            probabilities.mean(axis=0) if sample.counts.shape[0] else np.zeros(len(states))
        )
    fractions = pd.DataFrame.from_dict(rows, orient="index", columns=states)
    cells = {sample_id: int(sample.counts.shape[0]) for sample_id, sample in samples.items()}
    _simple_state(context, twin, task, _sha256(sorted(cells.items())), mode)
    twin.cells = CellComposition(fractions, cells)


def build_twin(
    context: SiteContext,
    patient_id: str,
    calibration: SiteCalibration,
    *,
    horizon: int,
    mode: str = "predict",
) -> PatientTwin:
    """Build (`predict`) or refresh (`update`) the twin of one patient.

    Raises
    ------
    UnknownPatientError
        The id is not in the site's data.
    NoObservationsError
        No task could use anything of the patient.
    """
    if patient_id not in context.known_patients():
        msg = (
            f"Patient {patient_id!r} is not in the data of site {context.config.name} "
            f"({context.config.path}); check the id (the FHIR Patient.id)."
        )
        raise UnknownPatientError(msg)
    twin = PatientTwin(
        patient_id,
        {task: m.version for task, m in context.models.items()},
        names={lab.key: lab.name for lab in context.spec.labs},
        loinc={lab.key: lab.loinc for lab in context.spec.labs},
    )
    torch.set_num_threads(1)
    if "lab-forecast" in context.models:
        _lab_forecast(context, twin, calibration, horizon, mode)
    if "crs-risk" in context.models:
        _crs_risk(context, twin, calibration, mode)
    if "cell-state" in context.models:
        _cell_state(context, twin, mode)
    if twin.lab is None and twin.risk is None and twin.cells is None:
        msg = (
            f"Patient {patient_id!r} has no observations the given checkpoints can use ("
            + "; ".join(twin.notes)
            + ")."
        )
        raise NoObservationsError(msg)
    return twin
