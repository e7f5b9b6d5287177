"""Find each cell's sample, patient and cell-state label: from obs, sample sheet or labels table."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.cells.errors import CellsInputError
from client.site_config import CellsConfig

__all__ = ["CellAssignment", "SiteTables", "assign_labels", "assign_samples", "read_table"]

logger = logging.getLogger(__name__)


def text_values(values: Any) -> np.ndarray:
    """Return values as an object array of stripped strings, "" where missing."""
    series = pd.Series(np.asarray(values, dtype=object), dtype="string")
    return series.fillna("").str.strip().to_numpy(dtype=object)


def read_table(path: Path, columns: dict[str, str], setting: str) -> pd.DataFrame:
    """Read a TSV or CSV file as strings and check that it has the given columns.

    Parameters
    ----------
    path
        The file; tab-separated when its header line has a tab, else comma-separated.
    columns
        Column name -> the `[cells]` key of site.toml that sets it.
    setting
        The `[cells]` key that names the file, for messages.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline()
        table = pd.read_csv(
            path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False
        )
    except FileNotFoundError as err:
        msg = f"{path}: file not found; fix [cells] {setting} in site.toml."
        raise CellsInputError(msg) from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        msg = (
            f"{path}: cannot be read as TSV or CSV ({err}); "
            f"fix the file named by [cells] {setting}."
        )
        raise CellsInputError(msg) from err

    for column, key in columns.items():
        if column not in table.columns:
            found = ", ".join(map(str, table.columns))
            msg = (
                f"{path}: column {column!r} not found (columns: {found}); "
                f"set [cells] {key} to the right column name."
            )
            raise CellsInputError(msg)
    return table


@dataclass
class SiteTables:
    """The site's sample sheet and labels table, each read once on first use."""

    config: CellsConfig
    _sheet: dict[str, str] | None = field(default=None, init=False)
    _sheet_conflicts: set[str] = field(default_factory=set, init=False)
    _labels: dict[str, str] | None = field(default=None, init=False)
    _errors: dict[str, CellsInputError] = field(default_factory=dict, init=False)

    def sample_sheet(self) -> dict[str, str]:
        """Return sample id -> patient id from the sample sheet (empty when none is set)."""
        path = self.config.sample_sheet
        if path is None:
            return {}
        if "sheet" in self._errors:
            raise self._errors["sheet"]
        if self._sheet is None:
            try:
                self._sheet = self._read_sheet(path)
            except CellsInputError as err:
                self._errors["sheet"] = err
                raise
        return self._sheet

    def cell_labels(self) -> dict[str, str]:
        """Return cell id -> label from the labels table (empty when none is set)."""
        path = self.config.labels
        if path is None:
            return {}
        if "labels" in self._errors:
            raise self._errors["labels"]
        if self._labels is None:
            try:
                self._labels = self._read_labels(path)
            except CellsInputError as err:
                # Logged once here; every file then reads on without labels.
                logger.warning("%s Cells stay unlabelled.", err)
                self._errors["labels"] = err
                raise
        return self._labels

    def patient_of(self, sample: str, patient_column: str) -> tuple[str, str]:
        """Return (patient, "") for a sample from the sample sheet or the default patient.

        Without either, return ("", reason), where the reason names the setting to add.
        """
        config = self.config
        sheet = self.sample_sheet()
        if sample in self._sheet_conflicts:
            return "", (
                f"patient: sample {sample!r} has several patients in sample sheet "
                f"{config.sample_sheet}; keep one row per sample"
            )
        if sample in sheet:
            return sheet[sample], ""
        if config.patient:
            return config.patient, ""
        if config.sample_sheet is not None:
            return "", (
                f"patient: sample {sample!r} is not in sample sheet {config.sample_sheet} "
                f"(column {config.sample_sheet_sample!r}); add a row for it or set [cells] patient"
            )
        return "", (
            f"patient: no patient for sample {sample!r}; add obs column {patient_column!r}, "
            "set [cells] sample-sheet, or set [cells] patient"
        )

    def _read_sheet(self, path: Path) -> dict[str, str]:
        config = self.config
        table = read_table(
            path,
            {
                config.sample_sheet_sample: "sample-sheet-sample",
                config.sample_sheet_patient: "sample-sheet-patient",
            },
            "sample-sheet",
        )
        samples = text_values(table[config.sample_sheet_sample])
        patients = text_values(table[config.sample_sheet_patient])
        sheet: dict[str, str] = {}
        for sample, patient in zip(samples, patients, strict=True):
            if not sample or not patient:
                continue
            if sheet.setdefault(sample, patient) != patient:
                self._sheet_conflicts.add(sample)
        if self._sheet_conflicts:
            logger.warning(
                "Sample sheet %s gives several patients for %d sample(s); their cells are skipped",
                path,
                len(self._sheet_conflicts),
            )
        return sheet

    def _read_labels(self, path: Path) -> dict[str, str]:
        config = self.config
        table = read_table(
            path,
            {
                config.labels_cell_column: "labels-cell-column",
                config.labels_label_column: "labels-label-column",
            },
            "labels",
        )
        cells = text_values(table[config.labels_cell_column])
        labels = text_values(table[config.labels_label_column])
        mapping: dict[str, str] = {}
        conflicts = 0
        for cell, label in zip(cells, labels, strict=True):
            if not cell or not label:
                continue
            if mapping.setdefault(cell, label) != label:
                conflicts += 1
        if conflicts:
            logger.warning(
                "Labels table %s gives %d cell(s) a second, different label; the first is used",
                path,
                conflicts,
            )
        return mapping


@dataclass
class CellAssignment:
    """Sample and patient of each cell of one file.

    Attributes
    ----------
    samples, patients
        Object arrays of str, one entry per cell; "" for a skipped cell.
    skips
        Skipped cells per reason.
    """

    samples: np.ndarray
    patients: np.ndarray
    skips: Counter[str]

    @property
    def kept(self) -> np.ndarray:
        """Bool mask of the cells that have both a sample and a patient."""
        return (self.samples != "") & (self.patients != "")


def assign_samples(
    obs: pd.DataFrame, default_sample: str, config: CellsConfig, tables: SiteTables
) -> CellAssignment:
    """Find the sample and patient of every cell.

    The sample comes from `obs[sample_column]`, else it is `default_sample`. The
    patient comes from `obs[patient_column]`, else from the sample sheet, else
    from `config.patient`. Without a sample column, a file whose patient column
    lists several patients is split into samples `<default_sample>:<patient>`. A
    sample whose cells name several patients is skipped.

    Raises
    ------
    CellsInputError
        When the sample sheet is needed but cannot be read.
    """
    n_cells = len(obs)
    skips: Counter[str] = Counter()
    has_sample_column = config.sample_column in obs.columns
    if has_sample_column:
        samples = text_values(obs[config.sample_column])
        skips[f"obs[{config.sample_column!r}]: missing"] += int((samples == "").sum())
    else:
        samples = np.full(n_cells, default_sample, dtype=object)

    if config.patient_column not in obs.columns:
        patients = np.full(n_cells, "", dtype=object)
        for sample in pd.unique(samples[samples != ""]):
            patient, reason = tables.patient_of(str(sample), config.patient_column)
            in_sample = samples == sample
            patients[in_sample] = patient
            if reason:
                skips[reason] += int(in_sample.sum())
        return CellAssignment(samples, patients, +skips)

    patients = text_values(obs[config.patient_column])
    missing = (patients == "") & (samples != "")
    skips[f"obs[{config.patient_column!r}]: missing"] += int(missing.sum())
    samples[missing] = ""

    frame = pd.DataFrame({"sample": samples, "patient": patients})
    frame = frame[frame["sample"] != ""]
    per_sample = frame.groupby("sample", sort=False)["patient"].nunique()
    for sample, n_patients in per_sample[per_sample > 1].items():
        in_sample = samples == sample
        if has_sample_column:
            reason = (
                f"obs[{config.sample_column!r}]: sample {sample!r} has cells of {n_patients} "
                f"patients in obs[{config.patient_column!r}]; a sample must belong to one patient"
            )
            skips[reason] += int(in_sample.sum())
            samples[in_sample] = ""
        else:
            samples[in_sample] = [f"{sample}:{p}" for p in patients[in_sample]]
    return CellAssignment(samples, patients, +skips)


def assign_labels(
    obs: pd.DataFrame, samples: np.ndarray, config: CellsConfig, tables: SiteTables
) -> np.ndarray:
    """Return each cell's label: `obs[label_column]`, else the labels table, else "".

    The labels table is joined on `<sample>_<barcode>` first, then on the bare
    barcode (the obs_name).

    Raises
    ------
    CellsInputError
        When the labels table is needed but cannot be read.
    """
    if config.label_column in obs.columns:
        return text_values(obs[config.label_column])

    table = tables.cell_labels()
    barcodes = obs.index.astype(str)
    labels = np.full(len(obs), "", dtype=object)
    if not table:
        return labels
    for index, (sample, barcode) in enumerate(zip(samples, barcodes, strict=True)):
        labels[index] = table.get(f"{sample}_{barcode}", table.get(barcode, ""))
    return labels
