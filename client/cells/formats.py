"""Open single-cell files: AnnData `.h5ad` and 10x Genomics Cell Ranger `.h5` matrices."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from client.cells.errors import CellsInputError

__all__ = [
    "BACKED_MIN_BYTES",
    "KIND_10X",
    "KIND_H5AD",
    "CellFile",
    "find_cell_files",
    "guess_kind",
    "open_cell_file",
]

logger = logging.getLogger(__name__)

KIND_H5AD = "h5ad"
KIND_10X = "10x-h5"

# An `.h5ad` file at least this large is opened in backed mode, so that X stays
# on disk and is read in row blocks.
# NOTE: anndata 0.12 loads `layers` into memory even in backed mode, so counts in
# `layers["counts"]` of a large file still take their full size in memory.
BACKED_MIN_BYTES = 1 << 30

_SUFFIXES = (".h5ad", ".h5")


@dataclass
class CellFile:
    """One opened single-cell file.

    Attributes
    ----------
    adata
        The file's AnnData; X is backed (on disk) for a large `.h5ad`.
    kind
        `h5ad` or `10x-h5`.
    layout
        `h5ad`, `10x-v3` or `10x-v2`.
    default_sample
        The sample id when `obs` has no sample column: the parent folder name of a
        10x file, the file stem of an `.h5ad`.
    """

    adata: anndata.AnnData
    kind: str
    layout: str
    default_sample: str

    def close(self) -> None:
        """Close the HDF5 file behind a backed AnnData; a no-op otherwise."""
        if self.adata.isbacked:
            self.adata.file.close()


def find_cell_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders into their `*.h5ad` and `*.h5` files, sorted; keep other paths as given.

    A path that does not exist is kept, so that the caller reports it.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
            if not found:
                logger.warning("Cells folder %s contains no .h5ad or .h5 file", path)
            files.extend(found)
        else:
            files.append(path)
    return files


def guess_kind(path: Path) -> str:
    """Return the report kind from the file name alone: `h5ad` for `.h5ad`, else `10x-h5`."""
    return KIND_H5AD if path.suffix == ".h5ad" else KIND_10X


def open_cell_file(path: Path, panel_names: Sequence[str]) -> CellFile:
    """Open an `.h5ad` or 10x `.h5` file.

    Parameters
    ----------
    path
        The file. An `.h5` file with AnnData's layout (top-level `obs` and `X`) is
        read as `.h5ad`.
    panel_names
        Gene symbols and Ensembl ids of the panel: 10x v3 features with these
        names or ids are kept whatever their feature type.

    Raises
    ------
    CellsInputError
        When the file is missing, is not HDF5, has an unknown layout or contains no cells.
    """
    if not path.is_file():
        msg = f"{path}: file not found; fix the path in [site] cells of site.toml."
        raise CellsInputError(msg)

    try:
        with h5py.File(path, "r") as file:
            layout = _detect_layout(file, path)
    except OSError as err:
        msg = f"{path}: not a readable HDF5 file ({err}); pass an .h5ad or a 10x .h5 matrix."
        raise CellsInputError(msg) from err

    if layout == "h5ad":
        return CellFile(_read_h5ad(path), KIND_H5AD, layout, path.stem)
    adata = _read_10x_v3(path, set(panel_names)) if layout == "10x-v3" else _read_10x_v2(path)
    return CellFile(adata, KIND_10X, layout, path.parent.name)


def _detect_layout(file: h5py.File, path: Path) -> str:
    """Return `h5ad`, `10x-v3` or `10x-v2` and check that a 10x matrix contains cells."""
    if "obs" in file and "X" in file:
        return "h5ad"

    if "matrix" in file:
        shapes = [_shape(file["matrix"], path)]
        layout = "10x-v3"
    else:
        genomes = _v2_genomes(file)
        if not genomes:
            msg = (
                f"{path}: neither AnnData (obs, X) nor a 10x matrix (a 'matrix' group, or "
                "genome groups with barcodes and genes); pass an .h5ad or a Cell Ranger .h5 file."
            )
            raise CellsInputError(msg)
        shapes = [_shape(file[genome], path) for genome in genomes]
        layout = "10x-v2"

    if all(shape[1] == 0 for shape in shapes):
        msg = (
            f"{path}: the 10x matrix contains no cells "
            f"(shape {shapes[0][0]} features x 0 barcodes); pass the "
            "filtered_feature_bc_matrix.h5 of a sample that has cells, or remove the file."
        )
        raise CellsInputError(msg)
    return layout


def _v2_genomes(file: h5py.File) -> list[str]:
    return [
        str(name)
        for name, item in file.items()
        if isinstance(item, h5py.Group) and "barcodes" in item and "genes" in item
    ]


def _shape(group: h5py.Group, path: Path) -> tuple[int, int]:
    if "shape" not in group:
        msg = f"{path}: 10x group {group.name!r} lacks the 'shape' dataset; the file is damaged."
        raise CellsInputError(msg)
    shape = np.asarray(group["shape"][()]).ravel()
    return int(shape[0]), int(shape[1])


def _read_h5ad(path: Path) -> anndata.AnnData:
    backed = "r" if path.stat().st_size >= BACKED_MIN_BYTES else None
    try:
        with warnings.catch_warnings():
            # Duplicate var_names are summed per panel gene later, so anndata's hint is noise.
            warnings.filterwarnings("ignore", message=".*names are not unique")
            return anndata.read_h5ad(path, backed=backed)
    except (OSError, KeyError, ValueError, TypeError) as err:
        msg = (
            f"{path}: cannot be read as AnnData ({type(err).__name__}: {err}); "
            "rewrite it with anndata."
        )
        raise CellsInputError(msg) from err


def _read_10x(path: Path, genome: str | None) -> anndata.AnnData:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*names are not unique")
            return sc.read_10x_h5(path, genome=genome, gex_only=False)
    except Exception as err:
        # scanpy raises a bare Exception for missing datasets, so catch broadly here.
        msg = f"{path}: cannot be read as a 10x matrix ({err}); the file is incomplete or damaged."
        raise CellsInputError(msg) from err


def _read_10x_v3(path: Path, panel_names: set[str]) -> anndata.AnnData:
    """Read a Cell Ranger v3 file, keeping Gene Expression features and panel features."""
    adata = _read_10x(path, genome=None)
    var = adata.var
    keep = var["feature_types"].to_numpy() == "Gene Expression"
    keep |= adata.var_names.isin(list(panel_names))
    if "gene_ids" in var:
        keep |= var["gene_ids"].isin(list(panel_names)).to_numpy()
    if keep.all():
        return adata
    logger.info(
        "%s: dropped %d features that are not Gene Expression and not in the gene panel",
        path,
        int((~keep).sum()),
    )
    return adata[:, keep].copy()


def _read_10x_v2(path: Path) -> anndata.AnnData:
    """Read a Cell Ranger v2 file; several genome groups are joined feature-wise."""
    with h5py.File(path, "r") as file:
        genomes = _v2_genomes(file)
    parts = [_read_10x(path, genome=genome) for genome in genomes]
    if len(parts) == 1:
        return parts[0]

    first = parts[0].obs_names
    for genome, part in zip(genomes[1:], parts[1:], strict=True):
        if not part.obs_names.equals(first):
            msg = (
                f"{path}: genome groups {genomes[0]!r} and {genome!r} list different barcodes; "
                "split the file into one file per genome."
            )
            raise CellsInputError(msg)
    matrix = sp.hstack([part.X for part in parts], format="csr")
    var = pd.concat([part.var.assign(genome=g) for g, part in zip(genomes, parts, strict=True)])
    return anndata.AnnData(matrix, obs=pd.DataFrame(index=first), var=var)
