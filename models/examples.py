"""Per-patient tensors of one task: the `TaskExamples` container."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch.utils.data import TensorDataset

__all__ = ["TaskExamples", "require_columns"]


def require_columns(
    table: pd.DataFrame, table_name: str, columns: Sequence[str], task: str
) -> None:
    """Raise ValueError naming the first column of `columns` that `table` lacks."""
    for column in columns:
        if column not in table.columns:
            msg = (
                f"{task}: the {table_name} table lacks the column {column!r}; "
                "build it with the site data layer, which always writes that column."
            )
            raise ValueError(msg)


@dataclass
class TaskExamples:
    """The examples of one task at one site, one row per patient.

    One row of every tensor is one patient's whole record (all bins, all cells),
    so a DP-SGD sample, and therefore the clipping unit, is one patient.

    Attributes
    ----------
    task
        Task name, for example ``"lab-forecast"``.
    patient_ids
        Patient id of each row.
    tensors
        The tensors, each with first dimension ``len(patient_ids)``.
    names
        Name of each tensor, in the order of `tensors`.
    meta
        Data-independent descriptions that the tensors need to be read, such as
        feature names or sample ids; never statistics computed from the values.
    """

    task: str
    patient_ids: list[str]
    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.tensors) != len(self.names):
            msg = (
                f"TaskExamples for {self.task!r} has {len(self.tensors)} tensors but "
                f"{len(self.names)} names; pass one name per tensor."
            )
            raise ValueError(msg)
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if tensor.shape[0] != len(self.patient_ids):
                msg = (
                    f"TaskExamples for {self.task!r}: tensor {name!r} has {tensor.shape[0]} "
                    f"rows but there are {len(self.patient_ids)} patients; use one row per patient."
                )
                raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, name: str) -> torch.Tensor:
        """Return the tensor with this name."""
        if name not in self.names:
            msg = f"TaskExamples for {self.task!r} has no tensor {name!r}; names: {self.names}."
            raise KeyError(msg)
        return self.tensors[self.names.index(name)]

    def subset(self, indices: Sequence[int]) -> TaskExamples:
        """Return the examples of the patients at these row indices, in that order."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TaskExamples(
            task=self.task,
            patient_ids=[self.patient_ids[i] for i in index.tolist()],
            tensors=tuple(tensor.index_select(0, index) for tensor in self.tensors),
            names=self.names,
            meta=dict(self.meta),
        )

    def dataset(self) -> TensorDataset:
        """Return a `TensorDataset` whose items are one patient's tensors."""
        return TensorDataset(*self.tensors)
