"""Cell-state twin: a per-cell classifier of T-cell states on the gene panel."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from models.examples import TaskExamples
from models.metrics import classification_metrics
from models.spec import FeatureSpec, SpecError

__all__ = [
    "CellSample",
    "CellStateNet",
    "CellStateTask",
    "normalized_expression",
    "predict_sample_states",
    "state_composition",
]

TASK = "cell-state"
TENSOR_NAMES = ("x", "gene_mask", "labels", "cell_mask", "sample")

# Library size that every cell is scaled to before log1p (counts per 10,000).
TARGET_SUM = 1e4


class CellSample(Protocol):
    """One single-cell sample of a patient, with counts on the spec's gene panel.

    Attributes
    ----------
    patient_id
        The patient the sample was taken from.
    counts
        Raw counts, CSR matrix of shape `n_obs` × ``len(spec.genes)``.
    gene_mask
        Bool array, ``len(spec.genes)``: True where the sample measured the gene.
    labels
        Object array of str, one per cell: the cell state, ``""`` when unlabelled.
    total_counts
        Float array, one per cell: the library size over all genes of the sample.
    """

    patient_id: str
    counts: sparse.csr_matrix
    gene_mask: npt.NDArray[np.bool_]
    labels: npt.NDArray[np.object_]
    total_counts: npt.NDArray[np.float32]


def task_settings(spec: FeatureSpec) -> tuple[tuple[str, ...], int]:
    """Return the states and max-cells-per-patient of the cell-state task."""
    settings = spec.task(TASK)
    try:
        states = tuple(str(s) for s in settings["states"])
        max_cells = int(settings["max-cells-per-patient"])
    except KeyError as err:
        msg = f"{spec.source}: [tasks.{TASK}] lacks the key {err.args[0]!r}."
        raise SpecError(msg) from err
    if len(states) < 2 or max_cells < 1:
        msg = (
            f"{spec.source}: [tasks.{TASK}] needs at least two states and "
            f"max-cells-per-patient >= 1; got {len(states)} and {max_cells}."
        )
        raise SpecError(msg)
    if not spec.genes:
        msg = f"{spec.source}: the gene panel is empty; list gene symbols under [genes]."
        raise SpecError(msg)
    return states, max_cells


def normalized_expression(
    sample: CellSample, rows: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.float32]:
    """Return log1p(counts / total_counts × 1e4) of the chosen cells, times the gene mask.

    A cell with a library size of zero gets all zeros. Without `rows`, all
    cells of the sample are returned, shape `n_obs` × genes.
    """
    counts = sample.counts if rows is None else sample.counts[rows]
    total = np.asarray(sample.total_counts if rows is None else sample.total_counts[rows])
    dense = np.asarray(counts.toarray(), dtype=np.float64)
    factor = np.divide(
        TARGET_SUM, total, out=np.zeros(total.shape, dtype=np.float64), where=total > 0
    )
    expression = np.log1p(dense * factor[:, None]) * np.asarray(sample.gene_mask, dtype=np.float64)
    return expression.astype(np.float32)


def _check_sample(sample_id: str, sample: CellSample, n_genes: int) -> None:
    # Shapes must agree with the gene panel; the data layer guarantees it for valid input.
    n_obs, width = sample.counts.shape
    if width != n_genes or len(sample.gene_mask) != n_genes:
        msg = (
            f"Sample {sample_id!r}: counts have {width} genes and gene_mask "
            f"{len(sample.gene_mask)}, but the gene panel has {n_genes}; "
            "align the sample to the spec's genes first."
        )
        raise ValueError(msg)
    if len(sample.labels) != n_obs or len(sample.total_counts) != n_obs:
        msg = (
            f"Sample {sample_id!r}: {n_obs} cells but {len(sample.labels)} labels and "
            f"{len(sample.total_counts)} total_counts; give one of each per cell."
        )
        raise ValueError(msg)


def _patient_rng(patient_id: str, seed: int) -> np.random.Generator:
    # Seeded per patient, so a patient's sampled cells do not depend on other patients.
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


class CellStateNet(nn.Module):
    """Per-cell MLP: expression and gene mask of a cell -> logits over the states."""

    def __init__(self, n_genes: int, n_states: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2 * n_genes, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, n_states),
        )

    def forward(self, x: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
        """Return logits (..., n_states) for cells x (..., n_genes)."""
        return self.body(torch.cat([x, gene_mask], dim=-1))


class CellStateTask:
    """The `cell-state` twin task."""

    name = TASK

    def build_model(self, spec: FeatureSpec) -> nn.Module:
        """Return an untrained `CellStateNet` for the spec's gene panel and states."""
        states, _ = task_settings(spec)
        return CellStateNet(len(spec.genes), len(states))

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
        """Sample up to max-cells-per-patient cells per patient from all their samples.

        Cells are drawn without replacement with a generator seeded by `seed`
        and the patient id. Labels that are empty or not among the spec's
        states become -1 and take no part in the loss. A patient without any
        labelled drawn cell is left out. ``meta["sample_ids"]`` lists the
        samples that the ``sample`` tensor indexes (-1 for padding).
        """
        states, max_cells = task_settings(spec)
        n_genes = len(spec.genes)
        state_index = {state: i for i, state in enumerate(states)}

        by_patient: dict[str, list[str]] = {}
        for sample_id in sorted(cells):
            sample = cells[sample_id]
            _check_sample(sample_id, sample, n_genes)
            by_patient.setdefault(str(sample.patient_id), []).append(sample_id)

        sample_ids: list[str] = []
        patient_ids: list[str] = []
        rows: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in TENSOR_NAMES}
        for patient_id in sorted(by_patient):
            drawn = self._draw_patient(
                [(s, cells[s]) for s in by_patient[patient_id]],
                rng=_patient_rng(patient_id, seed),
                max_cells=max_cells,
                n_genes=n_genes,
                state_index=state_index,
                first_sample=len(sample_ids),
            )
            if drawn is None:
                continue
            patient_ids.append(patient_id)
            sample_ids.extend(by_patient[patient_id])
            for name in TENSOR_NAMES:
                rows[name].append(drawn[name])

        if patient_ids:
            tensors = tuple(torch.from_numpy(np.stack(rows[name])) for name in TENSOR_NAMES)
        else:
            tensors = (
                torch.zeros(0, max_cells, n_genes),
                torch.zeros(0, max_cells, n_genes),
                torch.zeros(0, max_cells, dtype=torch.long),
                torch.zeros(0, max_cells),
                torch.zeros(0, max_cells, dtype=torch.long),
            )
        return TaskExamples(
            task=TASK,
            patient_ids=patient_ids,
            tensors=tensors,
            names=TENSOR_NAMES,
            meta={"states": states, "sample_ids": tuple(sample_ids)},
        )

    @staticmethod
    def _draw_patient(
        samples: list[tuple[str, CellSample]],
        *,
        rng: np.random.Generator,
        max_cells: int,
        n_genes: int,
        state_index: dict[str, int],
        first_sample: int,
    ) -> dict[str, npt.NDArray[Any]] | None:
        # Draw cells across all the patient's samples, then pad to max_cells.
        sizes = [sample.counts.shape[0] for _, sample in samples]
        n_total = int(sum(sizes))
        if n_total == 0:
            return None
        chosen = np.sort(rng.choice(n_total, size=min(n_total, max_cells), replace=False))
        offsets = np.concatenate([[0], np.cumsum(sizes)])

        x = np.zeros((max_cells, n_genes), dtype=np.float32)
        gene_mask = np.zeros((max_cells, n_genes), dtype=np.float32)
        labels = np.full(max_cells, -1, dtype=np.int64)
        cell_mask = np.zeros(max_cells, dtype=np.float32)
        sample_of = np.full(max_cells, -1, dtype=np.int64)
        filled = 0
        for k, (_, sample) in enumerate(samples):
            local = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - offsets[k]
            if local.size == 0:
                continue
            stop = filled + local.size
            x[filled:stop] = normalized_expression(sample, local)
            gene_mask[filled:stop] = np.asarray(sample.gene_mask, dtype=np.float32)
            labels[filled:stop] = [state_index.get(str(sample.labels[i]), -1) for i in local]
            cell_mask[filled:stop] = 1.0
            sample_of[filled:stop] = first_sample + k
            filled = stop

        if not (labels >= 0).any():
            return None
        return {
            "x": x,
            "gene_mask": gene_mask,
            "labels": labels,
            "cell_mask": cell_mask,
            "sample": sample_of,
        }

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Return the cross-entropy of labelled cells, averaged per patient, then over patients.

        Unlabelled cells (label -1) and padding slots take no part.
        """
        x, gene_mask, labels, cell_mask, _ = batch
        logits = model(x, gene_mask)
        weight = (labels >= 0).float() * cell_mask
        per_cell = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
        ).reshape(labels.shape)
        per_patient = (per_cell * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return per_patient.sum() / max(x.shape[0], 1)

    def evaluate(self, model: nn.Module, examples: TaskExamples) -> dict[str, float]:
        """Return `accuracy`, `macro-f1`, `n-cells` (labelled) and `n-patients`."""
        predicted = _predict_examples(model, examples)
        labels = examples["labels"].numpy()
        keep = (labels >= 0) & (examples["cell_mask"].numpy() > 0)
        return classification_metrics(labels[keep], predicted[keep], len(examples))

    def baseline(self, train: TaskExamples, test: TaskExamples) -> dict[str, float]:
        """Return the metrics of predicting the majority training state for every cell."""
        from models.baselines import majority_class

        return majority_class(train, test)


def _predict_examples(model: nn.Module, examples: TaskExamples) -> npt.NDArray[np.int64]:
    # Predicted state index of every cell slot, shape (patients, max_cells).
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(examples["x"], examples["gene_mask"])
    model.train(was_training)
    return np.asarray(logits.argmax(dim=-1).numpy(), dtype=np.int64)


def state_composition(model: nn.Module, examples: TaskExamples) -> pd.DataFrame:
    """Return the predicted state composition of each sample over its drawn cells.

    Rows are the sample ids in ``examples.meta["sample_ids"]`` that have drawn
    cells, and columns are the states. Each row sums to 1.
    """
    states: tuple[str, ...] = examples.meta["states"]
    sample_ids: tuple[str, ...] = examples.meta["sample_ids"]
    predicted = _predict_examples(model, examples)
    sample_of = examples["sample"].numpy()
    real = examples["cell_mask"].numpy() > 0

    counts = np.zeros((len(sample_ids), len(states)))
    np.add.at(counts, (sample_of[real], predicted[real]), 1.0)
    has_cells = counts.sum(axis=1) > 0
    fractions = counts[has_cells] / counts[has_cells].sum(axis=1, keepdims=True)
    index = [s for s, keep in zip(sample_ids, has_cells, strict=True) if keep]
    return pd.DataFrame(fractions, index=pd.Index(index, name="sample_id"), columns=list(states))


def predict_sample_states(
    model: nn.Module, sample: CellSample, *, chunk_size: int = 4096
) -> npt.NDArray[np.float64]:
    """Return state probabilities (`n_obs` × states) for every cell of one sample.

    Cells are scored in chunks of `chunk_size`; the mean of the rows is the
    sample's expected state composition.
    """
    n_obs = sample.counts.shape[0]
    gene_mask = torch.tensor(np.asarray(sample.gene_mask, dtype=np.float32))
    parts = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # One pass even for an empty sample, so the result has the states as columns.
        for start in range(0, max(n_obs, 1), chunk_size):
            rows = np.arange(start, min(start + chunk_size, n_obs))
            x = torch.from_numpy(normalized_expression(sample, rows))
            logits = model(x, gene_mask.expand_as(x))
            parts.append(torch.softmax(logits.double(), dim=-1).numpy())
    model.train(was_training)
    return np.concatenate(parts)
