"""Find the raw UMI counts of an AnnData: X, `layers["counts"]` or `.raw`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from client.cells.errors import CellsInputError

__all__ = ["COUNTS_SOURCES", "CountsMatrix", "check_values", "find_raw_counts", "read_rows"]

# Matrices searched for raw counts, in this order.
COUNTS_SOURCES = ("X", "layers/counts", "raw")

# Rows per block in the raw-counts check, which reads blocks at the start, middle and end.
_CHECK_ROWS_PER_BLOCK = 200


@dataclass(frozen=True)
class CountsMatrix:
    """A matrix that contains raw counts, with the var table that names its columns.

    Attributes
    ----------
    matrix
        `n_obs` x `n_vars`: a scipy sparse matrix, a numpy array, or for a backed
        file an h5py dataset or anndata's on-disk sparse dataset.
    var
        The var table of the matrix (`.raw.var` when the counts are in `.raw`).
    source
        `X`, `layers/counts` or `raw`.
    """

    matrix: Any
    var: pd.DataFrame
    source: str


def read_rows(matrix: Any, start: int, stop: int) -> sp.csr_matrix:
    """Read rows `start:stop` of an in-memory or backed matrix as float32 CSR."""
    block = matrix[start:stop]
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float32)
    return sp.csr_matrix(np.asarray(block, dtype=np.float32))


def check_values(values: np.ndarray) -> str:
    """Return why `values` are not raw counts, or "" when they are.

    NaN and infinite values are ignored here, unless every value is one, because
    the row pass skips the cells that contain them.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0 and values.size > 0:
        return "only NaN or infinite values"
    if (finite < 0).any():
        return "negative values"
    if (finite != np.round(finite)).any():
        return "non-integer values"
    return ""


def find_raw_counts(adata: anndata.AnnData, path: Path) -> CountsMatrix:
    """Return the first of X, `layers["counts"]` and `.raw.X` that contains raw counts.

    A matrix contains raw counts when the values stored in a sample of its rows are
    non-negative integers (start, middle and end blocks of up to 200 rows each).

    Raises
    ------
    CellsInputError
        When none of them contains raw counts.
    """
    problems: list[str] = []
    for candidate in _candidates(adata):
        problem = _check_sample(candidate.matrix, adata.n_obs)
        if not problem:
            return candidate
        problems.append(f"{candidate.source} has {problem}")

    found = "; ".join(problems) if problems else "no matrix at all"
    msg = (
        f"{path}: no raw counts found ({found}); raw integer UMI counts are required "
        'in X, layers["counts"] or .raw (normalised, log or scaled values cannot be used).'
    )
    raise CellsInputError(msg)


def _candidates(adata: anndata.AnnData) -> list[CountsMatrix]:
    candidates = []
    if adata.X is not None:
        candidates.append(CountsMatrix(adata.X, adata.var, "X"))
    if "counts" in adata.layers:
        candidates.append(CountsMatrix(adata.layers["counts"], adata.var, "layers/counts"))
    if adata.raw is not None:
        candidates.append(CountsMatrix(adata.raw.X, adata.raw.var, "raw"))
    return candidates


def _check_sample(matrix: Any, n_obs: int) -> str:
    starts = {
        0,
        max(0, n_obs // 2 - _CHECK_ROWS_PER_BLOCK // 2),
        max(0, n_obs - _CHECK_ROWS_PER_BLOCK),
    }
    values = [
        read_rows(matrix, start, min(n_obs, start + _CHECK_ROWS_PER_BLOCK)).data
        for start in sorted(starts)
    ]
    return check_values(np.concatenate(values))
