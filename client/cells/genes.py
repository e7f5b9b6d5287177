"""Match a file's features to the gene panel and build the panel-ordered count matrix."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from client.cells.counts import read_rows
from models.spec import FeatureSpec

__all__ = ["GeneMatch", "PanelCounts", "match_genes", "project_counts"]

# var columns that contain Ensembl gene ids, and var columns that contain gene symbols
# when var_names are ids (10x, CELLxGENE and common scanpy conventions).
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id")
_SYMBOL_COLUMNS = ("gene_symbols", "feature_name", "gene_name")

_ENSEMBL = r"^ENS[A-Z]*G\d{11}(\.\d+)?$"
_ENSEMBL_VERSION = r"^(ENS[A-Z]*G\d{11})\.\d+$"

# Rows per block when reading counts, which bounds memory for backed files.
_ROWS_PER_BLOCK = 20_000


@dataclass(frozen=True)
class GeneMatch:
    """Mapping of one matrix's features onto the gene panel.

    Attributes
    ----------
    aggregation
        `n_vars` x `len(spec.genes)` 0/1 matrix; `counts @ aggregation` sums each
        panel gene's features into its column.
    gene_mask
        True where at least one feature matched the panel gene.
    missing
        Panel symbols that no feature matched.
    summed
        Panel symbols whose column is the sum of more than one feature.
    duplicate_var_names
        Features whose name repeats an earlier feature's name.
    """

    aggregation: sp.csr_matrix
    gene_mask: np.ndarray
    missing: tuple[str, ...]
    summed: tuple[str, ...]
    duplicate_var_names: int


@dataclass(frozen=True)
class PanelCounts:
    """Counts of every cell in panel order, with library sizes and the cells to skip.

    Attributes
    ----------
    counts
        `n_obs` x `len(spec.genes)` float32 CSR.
    total_counts
        float32 library size per cell over all features of the matrix.
    invalid
        Per reason (`NaN or infinite counts`, `negative counts`,
        `non-integer counts`), a bool mask of the cells with such a value.
    """

    counts: sp.csr_matrix
    total_counts: np.ndarray
    invalid: dict[str, np.ndarray]


def _text_column(values: Any) -> pd.Series:
    return pd.Series(np.asarray(values, dtype=object), dtype="string").fillna("")


def _strip_versions(ids: pd.Series) -> pd.Series:
    """Drop Ensembl version suffixes: `ENSG00000167286.5` -> `ENSG00000167286`."""
    return ids.str.replace(_ENSEMBL_VERSION, r"\1", regex=True)


def match_genes(var: pd.DataFrame, spec: FeatureSpec) -> GeneMatch:
    """Map features (rows of `var`) to panel genes.

    A panel gene whose Ensembl id (from `spec.gene_ids`) occurs among the file's
    ids takes exactly the features with that id. Any other panel gene takes every
    feature whose symbol equals its own, so duplicated names are summed.

    A file's ids come from a `gene_ids`, `gene_id` or `ensembl_id` column, and from
    var_names that look like Ensembl ids. Its symbols come from var_names and from
    a `gene_symbols`, `feature_name` or `gene_name` column.
    """
    names = _text_column(var.index)
    id_column = next((c for c in _ID_COLUMNS if c in var), None)
    ids = _text_column([""] * len(names))
    if id_column is not None:
        ids = _strip_versions(_text_column(var[id_column]))
    # Ensembl-looking var_names count as ids as well.
    name_ids = _strip_versions(names).where(names.str.match(_ENSEMBL), "")
    symbol_columns = [names, *(_text_column(var[c]) for c in _SYMBOL_COLUMNS if c in var)]

    # Index only the features that can match, because a file has tens of thousands.
    spec_ids = {
        symbol: re.sub(_ENSEMBL_VERSION, r"\1", gene_id)
        for symbol, gene_id in spec.gene_ids.items()
    }
    panel_ids = list(spec_ids.values())
    panel_symbols = list(spec.genes)
    relevant = ids.isin(panel_ids).to_numpy() | name_ids.isin(panel_ids).to_numpy()
    for column in symbol_columns:
        relevant |= column.isin(panel_symbols).to_numpy()

    by_id: dict[str, list[int]] = {}
    by_symbol: dict[str, list[int]] = {}
    for index in np.flatnonzero(relevant):
        for key in {ids.iloc[index], name_ids.iloc[index]} - {""}:
            by_id.setdefault(str(key), []).append(int(index))
        for column in symbol_columns:
            if column.iloc[index]:
                by_symbol.setdefault(str(column.iloc[index]), []).append(int(index))

    rows: list[int] = []
    cols: list[int] = []
    summed: list[str] = []
    for column_index, symbol in enumerate(spec.genes):
        spec_id = spec_ids.get(symbol, "")
        features = by_id.get(spec_id, []) if spec_id else []
        if not features:
            features = by_symbol.get(symbol, [])
        features = sorted(set(features))
        if len(features) > 1:
            summed.append(symbol)
        rows.extend(features)
        cols.extend([column_index] * len(features))

    n_vars, n_genes = len(names), len(spec.genes)
    aggregation = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_vars, n_genes)
    )
    gene_mask = np.asarray(aggregation.sum(axis=0)).ravel() > 0
    missing = tuple(g for g, found in zip(spec.genes, gene_mask, strict=True) if not found)
    duplicates = int(pd.Index(names).duplicated().sum())
    return GeneMatch(aggregation, gene_mask, missing, tuple(summed), duplicates)


def project_counts(matrix: Any, n_obs: int, match: GeneMatch) -> PanelCounts:
    """Read `matrix` in row blocks and return its counts in panel order.

    Cells containing an invalid value (NaN, infinite, negative, non-integer) are
    flagged in `invalid`; their values are zeroed so that sums stay finite.
    """
    blocks: list[sp.csr_matrix] = []
    totals: list[np.ndarray] = []
    invalid: dict[str, list[np.ndarray]] = {
        "NaN or infinite counts": [],
        "negative counts": [],
        "non-integer counts": [],
    }

    for start in range(0, n_obs, _ROWS_PER_BLOCK):
        block = read_rows(matrix, start, min(n_obs, start + _ROWS_PER_BLOCK))
        row_of_value = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        data = block.data
        finite = np.isfinite(data)
        checks = {
            "NaN or infinite counts": ~finite,
            "negative counts": finite & (data < 0),
            "non-integer counts": finite & (data != np.round(data)),
        }
        bad_value = np.zeros(data.shape, dtype=bool)
        for reason, flagged in checks.items():
            rows = np.zeros(block.shape[0], dtype=bool)
            rows[row_of_value[flagged]] = True
            invalid[reason].append(rows)
            bad_value |= flagged
        if bad_value.any():
            # Copy first: the block may share its data with the caller's matrix.
            data = np.where(bad_value, np.float32(0.0), data)
            block = sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)

        totals.append(np.asarray(block.sum(axis=1, dtype=np.float64)).ravel())
        blocks.append(sp.csr_matrix(block @ match.aggregation, dtype=np.float32))

    n_genes = match.aggregation.shape[1]
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes))
    return PanelCounts(
        counts=sp.csr_matrix(counts, dtype=np.float32),
        total_counts=np.concatenate(totals).astype(np.float32)
        if totals
        else np.zeros(0, np.float32),
        invalid={
            reason: np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
            for reason, masks in invalid.items()
        },
    )
