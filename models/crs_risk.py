"""CRS-risk twin: probability of CRS of grade >= positive-grade from baseline and early labs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models.examples import TaskExamples, require_columns
from models.lab_forecast import LabScaling
from models.metrics import risk_metrics
from models.spec import FeatureSpec, SpecError

__all__ = ["CrsRiskNet", "CrsRiskTask", "predict_risk"]

TASK = "crs-risk"
TENSOR_NAMES = ("features", "mask", "label", "original")

# Age enters as (age − AGE_CENTER) / AGE_SCALE, fixed constants independent of data.
AGE_CENTER = 50.0
AGE_SCALE = 20.0


def task_settings(
    spec: FeatureSpec,
) -> tuple[tuple[str, ...], tuple[float, float], tuple[float, float], float]:
    """Return codes, baseline-days, early-days and positive-grade of the crs-risk task."""
    settings = spec.task(TASK)
    try:
        codes = tuple(str(c) for c in settings["codes"])
        baseline = (float(settings["baseline-days"][0]), float(settings["baseline-days"][1]))
        early = (float(settings["early-days"][0]), float(settings["early-days"][1]))
        positive = float(settings["positive-grade"])
    except (KeyError, IndexError, TypeError) as err:
        msg = (
            f"{spec.source}: [tasks.{TASK}] needs codes, baseline-days = [start, end], "
            f"early-days = [start, end] and positive-grade ({err!r})."
        )
        raise SpecError(msg) from err
    if not codes or baseline[0] > baseline[1] or early[0] > early[1]:
        msg = (
            f"{spec.source}: [tasks.{TASK}] needs at least one code and windows with "
            f"start <= end; got baseline-days {baseline}, early-days {early}."
        )
        raise SpecError(msg)
    for code in codes:
        spec.lab(code)
    return codes, baseline, early, positive


def feature_names(codes: tuple[str, ...]) -> tuple[str, ...]:
    """Return the names of the input features: two per code, then age."""
    names = []
    for code in codes:
        names.extend([f"{code}:baseline-last", f"{code}:early-max"])
    names.append("age")
    return tuple(names)


class CrsRiskNet(nn.Module):
    """Small MLP from masked, standardised features and their masks to a CRS logit."""

    def __init__(self, n_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2 * n_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return one logit per patient, shape (P,)."""
        return self.body(torch.cat([features * mask, mask], dim=-1)).squeeze(-1)


def _crs_labels(patients: pd.DataFrame, events: pd.DataFrame, positive_grade: float) -> pd.Series:
    # Maximum CRS grade per patient from the patients table, else from CRS events,
    # else 0 (infused without a CRS record); label = grade >= positive_grade.
    grade = pd.to_numeric(patients["crs_grade"], errors="coerce")
    if len(events) and "kind" in events.columns:
        crs = events.loc[events["kind"] == "crs"]
        from_events = pd.to_numeric(crs["grade"], errors="coerce").groupby(crs["patient_id"]).max()
        grade = grade.fillna(from_events.reindex(grade.index))
    return (grade.fillna(0.0) >= positive_grade).astype(np.float32)


def _window_values(rows: pd.DataFrame, window: tuple[float, float], statistic: str) -> pd.Series:
    # One value per (patient_id, code): the last by time, or the maximum, in the window.
    inside = rows.loc[(rows["day"] >= window[0]) & (rows["day"] <= window[1])]
    grouped = inside.sort_values("time").groupby(["patient_id", "code"])["value"]
    if statistic == "last":
        return grouped.last()
    return grouped.max()


class CrsRiskTask:
    """The `crs-risk` twin task."""

    name = TASK

    def build_model(self, spec: FeatureSpec) -> nn.Module:
        """Return an untrained `CrsRiskNet` for the spec's crs-risk codes."""
        codes, _, _, _ = task_settings(spec)
        return CrsRiskNet(len(feature_names(codes)))

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
        """Build one row per infused patient: window features, masks, label, original values.

        Patients without an infusion time are left out. Lab values flagged
        `out_of_range` are ignored. Features are standardised with
        `LabScaling` (spec constants); ``original`` keeps the same values in
        canonical units for the threshold baselines. The result is
        deterministic, so `seed` is not used.
        """
        codes, baseline, early, positive = task_settings(spec)
        require_columns(
            patients, "patients", ("infusion_time", "crs_grade", "age_at_infusion"), TASK
        )
        require_columns(
            timeline,
            "timeline",
            ("patient_id", "time", "day", "code", "value", "out_of_range"),
            TASK,
        )
        names = feature_names(codes)
        scaling = LabScaling.from_spec(spec, codes)

        infused = patients.loc[patients["infusion_time"].notna()].sort_index()
        patient_ids = [str(p) for p in infused.index]
        labels = _crs_labels(infused, events, positive)

        rows = timeline.loc[
            timeline["code"].isin(codes)
            & timeline["value"].notna()
            & timeline["day"].notna()
            & ~timeline["out_of_range"].fillna(False).astype(bool)
            & timeline["patient_id"].isin(infused.index)
        ]
        last = _window_values(rows, baseline, "last")
        peak = _window_values(rows, early, "max")

        n, n_features = len(patient_ids), len(names)
        original = np.zeros((n, n_features))
        mask = np.zeros((n, n_features))
        features = np.zeros((n, n_features))
        row_of = {pid: i for i, pid in enumerate(infused.index)}
        for j, code in enumerate(codes):
            for k, series in enumerate((last, peak)):
                column = 2 * j + k
                if code not in series.index.get_level_values("code"):
                    continue
                per_patient = series.xs(code, level="code")
                for patient_id, value in per_patient.items():
                    i = row_of[patient_id]
                    original[i, column] = value
                    mask[i, column] = 1.0
                    features[i, column] = scaling.standardize([value], [j])[0]

        age = pd.to_numeric(infused["age_at_infusion"], errors="coerce").to_numpy(np.float64)
        has_age = np.isfinite(age)
        original[has_age, -1] = age[has_age]
        mask[has_age, -1] = 1.0
        features[has_age, -1] = (age[has_age] - AGE_CENTER) / AGE_SCALE

        tensors = (
            torch.tensor(features, dtype=torch.float32),
            torch.tensor(mask, dtype=torch.float32),
            torch.tensor(labels.to_numpy(), dtype=torch.float32).reshape(n),
            torch.tensor(original, dtype=torch.float32),
        )
        return TaskExamples(
            task=TASK,
            patient_ids=patient_ids,
            tensors=tensors,
            names=TENSOR_NAMES,
            meta={"features": names, "positive-grade": positive},
        )

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Return the binary cross-entropy, averaged over the patients of the batch."""
        features, mask, label, _ = batch
        logit = model(features, mask)
        per_patient = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        return per_patient.sum() / max(features.shape[0], 1)

    def evaluate(self, model: nn.Module, examples: TaskExamples) -> dict[str, float]:
        """Return `log-loss`, `brier`, `auroc`, `ece`, `n-patients` and `n-positive`."""
        probability = predict_risk(model, examples)
        return risk_metrics(examples["label"].double().numpy(), probability)

    def baseline(self, train: TaskExamples, test: TaskExamples) -> dict[str, float]:
        """Return the CRP-threshold metrics, plus the EASIX metrics prefixed ``easix-``.

        The unprefixed names (the same as `evaluate`) are those of the early-CRP
        threshold rule, because CRP is measured far more often than the three
        EASIX labs.
        """
        from models.baselines import crp_threshold, easix

        metrics = crp_threshold(train, test)
        for key, value in easix(train, test).items():
            if key not in ("n-patients", "n-positive"):
                metrics[f"easix-{key}"] = value
        return metrics


def predict_risk(model: nn.Module, examples: TaskExamples) -> npt.NDArray[np.float64]:
    """Return the predicted probability of CRS >= positive-grade per patient."""
    if len(examples) == 0:
        return np.zeros(0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logit = model(examples["features"], examples["mask"])
    model.train(was_training)
    return np.asarray(torch.sigmoid(logit.double()).numpy(), dtype=np.float64)
