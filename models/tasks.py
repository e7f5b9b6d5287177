"""Registry of the twin tasks and the deterministic split of patients into train and held-out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from torch import nn

from models.cell_state import CellStateTask
from models.crs_risk import CrsRiskTask
from models.examples import TaskExamples
from models.lab_forecast import LabForecastTask
from models.spec import FeatureSpec

__all__ = ["TASKS", "TwinTask", "UnknownTaskError", "get_task", "split_patients"]


class UnknownTaskError(ValueError):
    """Raised when a task name is not in the registry."""


@runtime_checkable
class TwinTask(Protocol):
    """A twin submodel: its network, its per-patient tensors, loss, metrics and baseline."""

    name: str

    def build_model(self, spec: FeatureSpec) -> nn.Module:
        """Return an untrained network whose layers Opacus supports."""
        ...

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
        """Turn a site's tables into one row of tensors per patient."""
        ...

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Return the loss averaged over the patients of the batch.

        Each patient's term depends on that patient's row alone. An empty batch
        gives a zero that is still connected to the parameters.
        """
        ...

    def evaluate(self, model: nn.Module, examples: TaskExamples) -> dict[str, float]:
        """Return the task's metrics on held-out patients."""
        ...

    def baseline(self, train: TaskExamples, test: TaskExamples) -> dict[str, float]:
        """Return the simple baseline's metrics, with the names `evaluate` uses."""
        ...


TASKS: dict[str, TwinTask] = {
    task.name: task for task in (LabForecastTask(), CrsRiskTask(), CellStateTask())
}


def get_task(name: str) -> TwinTask:
    """Return the registered task with this name."""
    if name not in TASKS:
        known = ", ".join(sorted(TASKS))
        msg = f"Unknown task {name!r}; known tasks: {known}."
        raise UnknownTaskError(msg)
    return TASKS[name]


def _unit_hash(patient_id: str, seed: int) -> float:
    # A number in [0, 1) fixed by the patient id and the seed.
    digest = hashlib.sha256(f"fedtwin-split:{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_patients(
    patient_ids: Sequence[str], holdout_fraction: float = 0.25, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split patients into training and held-out row indices.

    A patient is held out when the SHA-256 of the seed and its id, read as a
    number in [0, 1), is below `holdout_fraction`. The side of a patient thus
    depends on its id and the seed alone, and stays the same across rounds,
    restarts and changes of the cohort. The fraction held out is therefore
    only close to `holdout_fraction`. With two or more patients and a fraction
    strictly between 0 and 1, neither side is left empty: the patient with the
    lowest (or highest) hash moves across.

    Returns
    -------
    train, test
        Indices into `patient_ids`, each in ascending order.
    """
    if not 0.0 <= holdout_fraction <= 1.0:
        msg = f"holdout_fraction is {holdout_fraction}; use a value in [0, 1]."
        raise ValueError(msg)
    scores = [_unit_hash(str(p), seed) for p in patient_ids]
    test = [i for i, score in enumerate(scores) if score < holdout_fraction]
    train = [i for i, score in enumerate(scores) if score >= holdout_fraction]

    if len(scores) >= 2 and 0.0 < holdout_fraction < 1.0:
        if not test:
            lowest = min(train, key=lambda i: scores[i])
            train.remove(lowest)
            test = [lowest]
        elif not train:
            highest = max(test, key=lambda i: scores[i])
            test.remove(highest)
            train = [highest]
    return train, test
