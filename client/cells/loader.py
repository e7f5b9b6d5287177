"""Read a site's single-cell files into per-sample count matrices over the gene panel."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from client.cells.counts import find_raw_counts
from client.cells.errors import CellsInputError
from client.cells.formats import CellFile, find_cell_files, guess_kind, open_cell_file
from client.cells.genes import GeneMatch, PanelCounts, match_genes, project_counts
from client.cells.metadata import SiteTables, assign_labels, assign_samples
from client.report import SourceReport
from client.site_config import SiteConfig
from models.spec import FeatureSpec

__all__ = ["CellSample", "read_cell_samples"]

logger = logging.getLogger(__name__)


@dataclass
class CellSample:
    """The cells of one sample, with counts over the gene panel.

    Attributes
    ----------
    sample_id, patient_id
        The sample and the patient it belongs to.
    counts
        `n_cells` x `len(spec.genes)` float32 CSR of raw UMI counts in
        `spec.genes` order; a panel gene the file lacks is an all-zero column.
    gene_mask
        bool, one per panel gene: True where the file measured the gene.
    labels
        Object array of str, the cell-state label per cell; "" for an unlabelled cell.
    barcodes
        The cell ids (obs_names) as str.
    total_counts
        float32 library size per cell over all genes the file kept (for normalisation).
    source
        The file the sample was read from.
    """

    sample_id: str
    patient_id: str
    counts: sp.csr_matrix
    gene_mask: np.ndarray
    labels: np.ndarray
    barcodes: np.ndarray
    total_counts: np.ndarray
    source: str


def read_cell_samples(
    config: SiteConfig, spec: FeatureSpec
) -> tuple[dict[str, CellSample], list[SourceReport]]:
    """Read every `.h5ad` and 10x `.h5` file that `config.cells` lists.

    Parameters
    ----------
    config
        The site config. `cells` lists files or folders, and a folder means every
        `*.h5ad` and `*.h5` file below it, sorted. `cells_config` sets where
        patient, sample and label are found.
    spec
        The feature spec whose gene panel sets the columns of every matrix.

    Returns
    -------
    samples
        Sample id -> CellSample, in file order.
    reports
        One SourceReport per file. A file that cannot be used is marked unusable
        with a one-line error; no exception escapes for bad input.
    """
    tables = SiteTables(config.cells_config)
    panel_names = [*spec.genes, *spec.gene_ids.values()]
    samples: dict[str, CellSample] = {}
    reports: list[SourceReport] = []

    for path in find_cell_files(config.cells):
        report = SourceReport(path=str(path), kind=guess_kind(path))
        try:
            _read_file(path, spec, config, tables, panel_names, samples, report)
        except CellsInputError as err:
            report.fail(str(err))
        except Exception as err:  # a damaged file must not stop the site
            logger.debug("Unexpected error reading %s", path, exc_info=True)
            report.fail(f"{path}: cannot be read ({type(err).__name__}: {err}); check the file.")
        if report.usable:
            logger.info(
                "%s: %d cells of %d sample(s), %d labelled, %d of %d panel genes",
                path,
                report.counts["cells"],
                report.counts["samples"],
                report.counts["cells-labelled"],
                report.counts["genes-matched"],
                len(spec.genes),
            )
        else:
            logger.warning("%s", report.error)
        reports.append(report)
    return samples, reports


def _read_file(
    path: Path,
    spec: FeatureSpec,
    config: SiteConfig,
    tables: SiteTables,
    panel_names: list[str],
    samples: dict[str, CellSample],
    report: SourceReport,
) -> None:
    """Read one file into `samples` and fill its report; raise CellsInputError when unusable."""
    cell_file = open_cell_file(path, panel_names)
    try:
        report.kind = cell_file.kind
        report.details["layout"] = cell_file.layout
        _read_opened(path, cell_file, spec, config, tables, samples, report)
    finally:
        cell_file.close()


def _read_opened(
    path: Path,
    cell_file: CellFile,
    spec: FeatureSpec,
    config: SiteConfig,
    tables: SiteTables,
    samples: dict[str, CellSample],
    report: SourceReport,
) -> None:
    adata = cell_file.adata
    if adata.n_obs == 0:
        msg = f"{path}: contains no cells (n_obs = 0); pass a file with cells or remove it."
        raise CellsInputError(msg)

    # Find the raw counts and map their features to the panel
    counts_matrix = find_raw_counts(adata, path)
    match = match_genes(counts_matrix.var, spec)
    _report_genes(report, match, counts_matrix.source)
    if not match.gene_mask.any():
        # Kept (every panel column masked) because a partial reference is valid
        # input; the warning points at the usual cause, var_names of another kind.
        warning = (
            f"{path}: none of the {len(spec.genes)} panel genes is among its "
            f"{counts_matrix.var.shape[0]} features; check that var_names are human gene "
            "symbols or Ensembl ids"
        )
        report.details["warning"] = warning
        logger.warning("%s", warning)

    # Find sample, patient and label of every cell
    obs = adata.obs
    assignment = assign_samples(obs, cell_file.default_sample, config.cells_config, tables)
    for reason, count in assignment.skips.items():
        report.skip(reason, count)
    if not assignment.kept.any():
        msg = f"{path}: no usable cells ({'; '.join(report.skips)})."
        raise CellsInputError(msg)
    labels = _labels_or_report(obs, assignment.samples, config, tables, report)

    # Read the counts and skip cells with invalid values
    panel = project_counts(counts_matrix.matrix, adata.n_obs, match)
    kept = assignment.kept.copy()
    for reason, flagged in panel.invalid.items():
        bad = flagged & kept
        if bad.any():
            report.skip(f"{counts_matrix.source}: {reason}", int(bad.sum()))
            kept &= ~flagged

    # Split the cells into samples
    cells = _FileCells(
        path=path,
        patients=assignment.patients,
        labels=labels,
        barcodes=np.asarray(obs.index.astype(str), dtype=object),
        panel=panel,
        match=match,
        counts_source=counts_matrix.source,
    )
    for sample_id in pd.unique(assignment.samples[kept]):
        in_sample = kept & (assignment.samples == sample_id)
        _add_sample(str(sample_id), np.flatnonzero(in_sample), cells, samples, report)
    if report.counts["cells"] == 0:
        msg = f"{path}: no usable cells ({'; '.join(report.skips)})."
        raise CellsInputError(msg)


@dataclass(frozen=True)
class _FileCells:
    """Everything read from one file, before it is split into samples."""

    path: Path
    patients: np.ndarray
    labels: np.ndarray
    barcodes: np.ndarray
    panel: PanelCounts
    match: GeneMatch
    counts_source: str


def _labels_or_report(
    obs: pd.DataFrame,
    sample_ids: np.ndarray,
    config: SiteConfig,
    tables: SiteTables,
    report: SourceReport,
) -> np.ndarray:
    """Return the cell labels; an unreadable labels table leaves every cell unlabelled."""
    try:
        return assign_labels(obs, sample_ids, config.cells_config, tables)
    except CellsInputError as err:
        report.details["labels-error"] = str(err)
        return np.full(len(obs), "", dtype=object)


def _report_genes(report: SourceReport, match: GeneMatch, counts_source: str) -> None:
    report.counts["genes-matched"] = int(match.gene_mask.sum())
    report.counts["genes-missing"] = len(match.missing)
    report.counts["duplicate-var-names"] = match.duplicate_var_names
    report.details["counts-source"] = counts_source
    report.details["genes-missing"] = list(match.missing)
    report.details["genes-summed"] = list(match.summed)
    report.details.setdefault("samples", {})


def _add_sample(
    sample_id: str,
    rows: np.ndarray,
    cells: _FileCells,
    samples: dict[str, CellSample],
    report: SourceReport,
) -> None:
    """Add the cells at `rows` as one sample, unless another file already gave that sample id."""
    if sample_id in samples:
        reason = (
            f"sample {sample_id!r}: already read from {samples[sample_id].source}; "
            "give every sample a unique id"
        )
        report.skip(reason, len(rows))
        return

    patient_id = str(cells.patients[rows[0]])
    labels = cells.labels[rows]
    samples[sample_id] = CellSample(
        sample_id=sample_id,
        patient_id=patient_id,
        counts=cells.panel.counts[rows],
        gene_mask=cells.match.gene_mask.copy(),
        labels=labels,
        barcodes=cells.barcodes[rows].astype(str),
        total_counts=cells.panel.total_counts[rows],
        source=str(cells.path),
    )

    n_labelled = int((labels != "").sum())
    report.counts["cells"] += len(rows)
    report.counts["cells-labelled"] += n_labelled
    report.counts["samples"] += 1
    report.details["samples"][sample_id] = {
        "patient": patient_id,
        "cells": len(rows),
        "cells-labelled": n_labelled,
        "genes-matched": int(cells.match.gene_mask.sum()),
        "counts-source": cells.counts_source,
    }
