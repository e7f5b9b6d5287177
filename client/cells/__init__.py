"""Single-cell data of a site: `.h5ad` and 10x `.h5` files as per-sample panel counts."""

from client.cells.errors import CellsInputError
from client.cells.loader import CellSample, read_cell_samples

__all__ = ["CellSample", "CellsInputError", "read_cell_samples"]
