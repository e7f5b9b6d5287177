"""Tests of client.cells: reading .h5ad and 10x .h5 files into per-sample panel counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from client.cells import CellSample, read_cell_samples
from client.report import SourceReport
from client.site_config import CellsConfig, SiteConfig
from models.spec import FeatureSpec, load_spec

CARPALL = "carpall-cart-scrna"
PBMC = "scanpy-pbmc68k"


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec()


def site(tmp_path: Path, cells: list[Path], **cells_config: Any) -> SiteConfig:
    return SiteConfig(
        path=tmp_path / "site.toml",
        name="test-site",
        fhir=(),
        cells=tuple(cells),
        spec=None,
        state_dir=tmp_path / "state",
        timezone="UTC",
        cells_config=CellsConfig(**cells_config),
    )


def read_one(
    tmp_path: Path, spec: FeatureSpec, path: Path, **cells_config: Any
) -> tuple[dict[str, CellSample], SourceReport]:
    samples, reports = read_cell_samples(site(tmp_path, [path], **cells_config), spec)
    assert len(reports) == 1
    return samples, reports[0]


def integer_counts(n_cells: int, n_genes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)


def write_h5ad(
    path: Path,
    x: np.ndarray,
    var_names: list[str],
    obs: dict[str, list[str | None]] | None = None,
    layers: dict[str, np.ndarray] | None = None,
    raw: np.ndarray | None = None,
    dense: bool = False,
    var: dict[str, list[str]] | None = None,
) -> Path:
    obs_frame = pd.DataFrame(obs or {}, index=[f"cell{i}" for i in range(x.shape[0])])
    var_frame = pd.DataFrame(var or {}, index=var_names)
    matrix = x if dense else sp.csr_matrix(x)
    adata = anndata.AnnData(matrix, obs=obs_frame, var=var_frame)
    if raw is not None:
        adata.raw = anndata.AnnData(sp.csr_matrix(raw), obs=obs_frame, var=var_frame)
    for name, layer in (layers or {}).items():
        adata.layers[name] = sp.csr_matrix(layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def write_10x_v3(
    path: Path,
    x: np.ndarray,
    names: list[str],
    ids: list[str],
    feature_types: list[str] | None = None,
) -> Path:
    """Write cells x features counts in Cell Ranger v3 layout (features x cells CSC)."""
    matrix = sp.csc_matrix(x.T.astype(np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        group = file.create_group("matrix")
        group["barcodes"] = np.array([f"AAAC{i:012d}-1" for i in range(x.shape[0])], dtype="S")
        group["data"] = matrix.data.astype(np.int32)
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array(matrix.shape, dtype=np.int32)
        features = group.create_group("features")
        features["name"] = np.array(names, dtype="S")
        features["id"] = np.array(ids, dtype="S")
        types = feature_types or ["Gene Expression"] * len(names)
        features["feature_type"] = np.array(types, dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(names), dtype="S")
        features["_all_tag_keys"] = np.array(["genome"], dtype="S")
    return path


def write_10x_v2(path: Path, x: np.ndarray, names: list[str], ids: list[str]) -> Path:
    """Write cells x genes counts in Cell Ranger v2 layout (one genome group)."""
    matrix = sp.csc_matrix(x.T.astype(np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        group = file.create_group("GRCh38")
        group["barcodes"] = np.array([f"AAAC{i:012d}-1" for i in range(x.shape[0])], dtype="S")
        group["data"] = matrix.data.astype(np.int32)
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array(matrix.shape, dtype=np.int32)
        group["gene_names"] = np.array(names, dtype="S")
        group["genes"] = np.array(ids, dtype="S")
    return path


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------


def test_carpall_all_samples(shared_data: Path, tmp_path: Path, spec: FeatureSpec) -> None:
    folder = shared_data / CARPALL
    sheet_path = folder / "CARPALL_scRNAseq_CART_metadata.txt"
    labels_path = folder / "CARTcell_barcodes.txt"
    config = site(tmp_path, [folder / "gex"], sample_sheet=sheet_path, labels=labels_path)

    samples, reports = read_cell_samples(config, spec)

    # Expected values, read without fedtwin
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str)
    patient_of = dict(zip(sheet["GEX_Sample"], sheet["Patient"], strict=True))
    labelled_ids = set(pd.read_csv(labels_path, sep="\t", usecols=["CellID"])["CellID"])
    expected_cells: dict[str, int] = {}
    expected_labelled = 0
    for h5 in sorted((folder / "gex").glob("*/filtered_feature_bc_matrix.h5")):
        with h5py.File(h5, "r") as file:
            barcodes = file["matrix/barcodes"][:].astype(str)
        expected_cells[h5.parent.name] = len(barcodes)
        expected_labelled += sum(f"{h5.parent.name}_{b}" in labelled_ids for b in barcodes)
    expected_patients = {patient_of[s] for s in expected_cells}

    assert len(reports) == 26
    assert all(r.usable for r in reports), [r.error for r in reports if not r.usable]
    assert {r.kind for r in reports} == {"10x-h5"}
    assert sorted(samples) == sorted(expected_cells)
    assert {s: c.counts.shape[0] for s, c in samples.items()} == expected_cells
    assert sum(expected_cells.values()) == 26_669
    assert sum(c.counts.shape[0] for c in samples.values()) == 26_669
    assert {c.patient_id for c in samples.values()} == expected_patients
    assert len(expected_patients) == 9
    assert all(c.patient_id == patient_of[s] for s, c in samples.items())
    n_labelled = sum(int((c.labels != "").sum()) for c in samples.values())
    assert n_labelled == expected_labelled == 5_953
    assert sum(r.counts["cells-labelled"] for r in reports) == 5_953
    assert all(r.counts["genes-matched"] == len(spec.genes) for r in reports)
    assert all(r.details["counts-source"] == "X" for r in reports)


def test_carpall_counts_match_h5(shared_data: Path, tmp_path: Path, spec: FeatureSpec) -> None:
    sample_dir = shared_data / CARPALL / "gex" / "CAR-T10484039"
    h5 = sample_dir / "filtered_feature_bc_matrix.h5"
    samples, report = read_one(tmp_path, spec, h5, patient="P08")

    # Rebuild the cells x features matrix from the raw HDF5 datasets
    with h5py.File(h5, "r") as file:
        matrix = file["matrix"]
        n_features, n_cells = matrix["shape"][:]
        raw = sp.csc_matrix(
            (matrix["data"][:], matrix["indices"][:], matrix["indptr"][:]),
            shape=(n_features, n_cells),
        ).T.tocsr()
        names = list(matrix["features/name"][:].astype(str))
        barcodes = matrix["barcodes"][:].astype(str)

    cell_sample = samples["CAR-T10484039"]
    assert report.usable
    assert cell_sample.counts.dtype == np.float32
    assert cell_sample.counts.shape == (n_cells, len(spec.genes))
    assert list(cell_sample.barcodes) == list(barcodes)
    assert cell_sample.gene_mask.all()
    np.testing.assert_array_equal(cell_sample.total_counts, np.asarray(raw.sum(axis=1)).ravel())
    for symbol in ("CD3D", "CD8A", "CAT_scFv"):
        column = spec.genes.index(symbol)
        expected = raw[:, names.index(symbol)].toarray().ravel()
        np.testing.assert_array_equal(cell_sample.counts[:, column].toarray().ravel(), expected)


def test_pbmc_v3_loads(shared_data: Path, tmp_path: Path, spec: FeatureSpec) -> None:
    h5 = shared_data / PBMC / "10x_v3_filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r") as file:
        n_cells = int(file["matrix/shape"][1])
        names = set(file["matrix/features/name"][:].astype(str))

    samples, report = read_one(tmp_path, spec, h5, patient="donor")

    assert report.usable, report.error
    assert report.kind == "10x-h5"
    assert report.details["layout"] == "10x-v3"
    assert list(samples) == [PBMC]
    assert samples[PBMC].patient_id == "donor"
    assert samples[PBMC].counts.shape == (n_cells, len(spec.genes))
    assert report.counts["cells"] == n_cells
    expected_matched = len(names & set(spec.genes))
    assert report.counts["genes-matched"] == expected_matched
    assert int(samples[PBMC].gene_mask.sum()) == expected_matched


def test_pbmc_reduced_refused(shared_data: Path, tmp_path: Path, spec: FeatureSpec) -> None:
    path = shared_data / PBMC / "10x_pbmc68k_reduced.h5ad"
    adata = anndata.read_h5ad(path)
    raw_values = adata.raw.X.data if sp.issparse(adata.raw.X) else np.asarray(adata.raw.X)
    x_values = np.asarray(adata.X).ravel()
    # The file contains scaled values in X and log-normalised values in .raw: no counts.
    assert (x_values < 0).any()
    assert (raw_values != np.round(raw_values)).any()
    assert "counts" not in adata.layers

    samples, report = read_one(tmp_path, spec, path, patient="donor")

    assert samples == {}
    assert not report.usable
    assert report.kind == "h5ad"
    assert str(path) in report.error
    assert "raw integer UMI counts are required" in report.error
    assert "\n" not in report.error


# ---------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------

GENES = ["CD3D", "CD8A", "GZMB", "MALAT1"]


def test_counts_nan_cells_skipped(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(10, len(GENES))
    x[[2, 7], 0] = np.nan
    path = write_h5ad(tmp_path / "nan.h5ad", x, GENES)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable
    assert report.counts["cells"] == 8
    assert report.skips == {"X: NaN or infinite counts": 2}
    assert list(samples["nan"].barcodes) == [f"cell{i}" for i in range(10) if i not in (2, 7)]
    assert np.isfinite(samples["nan"].total_counts).all()


def test_counts_all_nan_unusable(tmp_path: Path, spec: FeatureSpec) -> None:
    x = np.full((5, len(GENES)), np.nan, dtype=np.float32)
    path = write_h5ad(tmp_path / "allnan.h5ad", x, GENES)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert samples == {}
    assert not report.usable
    assert "X has only NaN or infinite values" in report.error
    assert str(path) in report.error


def test_counts_normalised_only(tmp_path: Path, spec: FeatureSpec) -> None:
    x = np.log1p(integer_counts(6, len(GENES)) / 3.0)
    path = write_h5ad(tmp_path / "lognorm.h5ad", x, GENES)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert samples == {}
    assert not report.usable
    assert report.error.startswith(f"{path}: no raw counts found (X has non-integer values)")
    assert 'X, layers["counts"] or .raw' in report.error


@pytest.mark.parametrize(
    ("where", "expected_source"),
    [("layers", "layers/counts"), ("raw", "raw")],
    ids=["layer", "raw"],
)
def test_counts_source_fallback(
    tmp_path: Path, spec: FeatureSpec, where: str, expected_source: str
) -> None:
    counts = integer_counts(6, len(GENES))
    normalised = np.log1p(counts / 3.0)
    if where == "layers":
        path = write_h5ad(tmp_path / "s.h5ad", normalised, GENES, layers={"counts": counts})
    else:
        path = write_h5ad(tmp_path / "s.h5ad", normalised, GENES, raw=counts)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.details["counts-source"] == expected_source
    assert report.details["samples"]["s"]["counts-source"] == expected_source
    np.testing.assert_array_equal(samples["s"].total_counts, counts.sum(axis=1))
    cd3d = spec.genes.index("CD3D")
    np.testing.assert_array_equal(samples["s"].counts[:, cd3d].toarray().ravel(), counts[:, 0])


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_counts_backed_read(
    tmp_path: Path, spec: FeatureSpec, monkeypatch: pytest.MonkeyPatch, dense: bool
) -> None:
    monkeypatch.setattr("client.cells.formats.BACKED_MIN_BYTES", 0)
    monkeypatch.setattr("client.cells.genes._ROWS_PER_BLOCK", 4)
    counts = integer_counts(10, len(GENES))
    counts[3, 1] = np.nan
    path = write_h5ad(tmp_path / "big.h5ad", counts, GENES, dense=dense)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.skips == {"X: NaN or infinite counts": 1}
    kept = [i for i in range(10) if i != 3]
    np.testing.assert_array_equal(samples["big"].total_counts, counts[kept].sum(axis=1))
    cd8a = spec.genes.index("CD8A")
    column = samples["big"].counts[:, cd8a].toarray().ravel()
    np.testing.assert_array_equal(column, counts[kept, 1])


def test_counts_backed_raw(
    tmp_path: Path, spec: FeatureSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("client.cells.formats.BACKED_MIN_BYTES", 0)
    counts = integer_counts(5, len(GENES))
    path = write_h5ad(tmp_path / "r.h5ad", np.log1p(counts), GENES, raw=counts)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.details["counts-source"] == "raw"
    np.testing.assert_array_equal(samples["r"].total_counts, counts.sum(axis=1))


def test_counts_negative_refused(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(6, len(GENES)) - 3.0
    path = write_h5ad(tmp_path / "scaled.h5ad", x, GENES)

    _, report = read_one(tmp_path, spec, path, patient="P1")

    assert not report.usable
    assert "X has negative values" in report.error


# ---------------------------------------------------------------------------
# 10x layouts
# ---------------------------------------------------------------------------


def test_10x_no_cells(tmp_path: Path, spec: FeatureSpec) -> None:
    path = write_10x_v3(
        tmp_path / "S0" / "filtered_feature_bc_matrix.h5",
        np.zeros((0, 3), dtype=np.float32),
        ["CD3D", "CD8A", "GZMB"],
        ["ENSG00000167286", "ENSG00000153563", "ENSG00000100453"],
    )

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert samples == {}
    assert not report.usable
    assert report.kind == "10x-h5"
    assert "contains no cells" in report.error
    assert str(path) in report.error


def test_10x_v2_loads(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(7, 3)
    ids = ["ENSG00000167286", "ENSG00000153563", "ENSG00000000001"]
    path = write_10x_v2(tmp_path / "S2" / "matrix.h5", x, ["CD3D", "CD8A", "OTHER"], ids)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.details["layout"] == "10x-v2"
    assert samples["S2"].counts.shape == (7, len(spec.genes))
    np.testing.assert_array_equal(samples["S2"].total_counts, x.sum(axis=1))
    assert report.counts["genes-matched"] == 2


def test_10x_v3_feature_types(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(5, 4)
    names = ["CD3D", "CD8A", "CD3_TotalSeqC", "CAT_scFv"]
    ids = ["ENSG00000167286", "ENSG00000153563", "CD3_TotalSeqC", "CAT_scFv"]
    types = ["Gene Expression", "Gene Expression", "Antibody Capture", "Custom"]
    path = write_10x_v3(tmp_path / "S3" / "filtered_feature_bc_matrix.h5", x, names, ids, types)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    cell_sample = samples["S3"]
    # The antibody feature is dropped; the panel's CAR feature is kept whatever its type.
    np.testing.assert_array_equal(cell_sample.total_counts, x[:, [0, 1, 3]].sum(axis=1))
    car = spec.genes.index("CAT_scFv")
    np.testing.assert_array_equal(cell_sample.counts[:, car].toarray().ravel(), x[:, 3])
    assert report.counts["genes-matched"] == 3


def test_h5_with_anndata_layout(tmp_path: Path, spec: FeatureSpec) -> None:
    path = write_h5ad(tmp_path / "adata.h5", integer_counts(3, 4), GENES)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.kind == "h5ad"
    assert list(samples) == ["adata"]


def test_10x_not_hdf5(tmp_path: Path, spec: FeatureSpec) -> None:
    path = tmp_path / "S4" / "filtered_feature_bc_matrix.h5"
    path.parent.mkdir()
    path.write_text("not an HDF5 file\n")

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert samples == {}
    assert not report.usable
    assert "not a readable HDF5 file" in report.error
    assert "\n" not in report.error


# ---------------------------------------------------------------------------
# Genes
# ---------------------------------------------------------------------------


def test_genes_duplicates_summed(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(6, 4)
    with pytest.warns(UserWarning, match="names are not unique"):
        path = write_h5ad(tmp_path / "dup.h5ad", x, ["CD3D", "GZMB", "CD3D", "OTHER"])

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.counts["duplicate-var-names"] == 1
    assert report.details["genes-summed"] == ["CD3D"]
    column = samples["dup"].counts[:, spec.genes.index("CD3D")].toarray().ravel()
    np.testing.assert_array_equal(column, x[:, 0] + x[:, 2])
    np.testing.assert_array_equal(samples["dup"].total_counts, x.sum(axis=1))


def test_genes_ensembl_only(tmp_path: Path, spec: FeatureSpec) -> None:
    ids = [spec.gene_ids["CD3D"] + ".7", spec.gene_ids["GZMB"], "ENSG00000999999"]
    x = integer_counts(5, 3)
    path = write_h5ad(tmp_path / "ens.h5ad", x, ids)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.usable, report.error
    assert report.counts["genes-matched"] == 2
    for index, symbol in enumerate(("CD3D", "GZMB")):
        column = samples["ens"].counts[:, spec.genes.index(symbol)].toarray().ravel()
        np.testing.assert_array_equal(column, x[:, index])


def test_genes_symbol_column(tmp_path: Path, spec: FeatureSpec) -> None:
    # Ids unknown to the spec, so the match falls back to the feature_name symbols.
    ids = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    x = integer_counts(4, 3)
    var = {"feature_name": ["GZMK", "NOT_IN_PANEL", "CCR7"]}
    path = write_h5ad(tmp_path / "cxg.h5ad", x, ids, var=var)

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    assert report.counts["genes-matched"] == 2
    gzmk = samples["cxg"].counts[:, spec.genes.index("GZMK")].toarray().ravel()
    ccr7 = samples["cxg"].counts[:, spec.genes.index("CCR7")].toarray().ravel()
    np.testing.assert_array_equal(gzmk, x[:, 0])
    np.testing.assert_array_equal(ccr7, x[:, 2])


def test_genes_missing_masked(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(4, 2)
    path = write_h5ad(tmp_path / "few.h5ad", x, ["CD8A", "NOT_A_PANEL_GENE"])

    samples, report = read_one(tmp_path, spec, path, patient="P1")

    cell_sample = samples["few"]
    assert cell_sample.counts.shape == (4, len(spec.genes))
    assert cell_sample.gene_mask.tolist() == [g == "CD8A" for g in spec.genes]
    dense = cell_sample.counts.toarray()
    assert not dense[:, ~cell_sample.gene_mask].any()
    assert report.counts["genes-matched"] == 1
    assert report.counts["genes-missing"] == len(spec.genes) - 1
    assert report.details["genes-missing"] == [g for g in spec.genes if g != "CD8A"]


# ---------------------------------------------------------------------------
# Patients, samples and labels
# ---------------------------------------------------------------------------


def test_patient_missing(tmp_path: Path, spec: FeatureSpec) -> None:
    path = write_h5ad(tmp_path / "anon.h5ad", integer_counts(4, 4), GENES)

    samples, report = read_one(tmp_path, spec, path)

    assert samples == {}
    assert not report.usable
    assert str(path) in report.error
    assert "add obs column 'patient'" in report.error
    assert "set [cells] patient" in report.error


def test_patient_not_in_sheet(tmp_path: Path, spec: FeatureSpec) -> None:
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("GEX_Sample,Patient\nother,P9\n")
    path = write_h5ad(tmp_path / "s1.h5ad", integer_counts(4, 4), GENES)

    _, report = read_one(tmp_path, spec, path, sample_sheet=sheet)

    assert not report.usable
    assert "sample 's1' is not in sample sheet" in report.error
    assert "add a row for it or set [cells] patient" in report.error


def test_sheet_missing_column(tmp_path: Path, spec: FeatureSpec) -> None:
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("Sample\tPatient\ns1\tP1\n")
    path = write_h5ad(tmp_path / "s1.h5ad", integer_counts(4, 4), GENES)

    _, report = read_one(tmp_path, spec, path, sample_sheet=sheet)

    assert not report.usable
    assert report.error.startswith(f"{sheet}: column 'GEX_Sample' not found")
    assert "set [cells] sample-sheet-sample" in report.error


def test_obs_samples_and_labels(tmp_path: Path, spec: FeatureSpec) -> None:
    obs: dict[str, list[str | None]] = {
        "sample": ["a", "a", "b", "b", "b", ""],
        "patient": ["P1", "P1", "P2", "P2", "P2", "P3"],
        "cell_state": ["CD8 TEM", "", "CD4 TEM", "DN gdT", None, "CD8 TEM"],
    }
    path = write_h5ad(tmp_path / "multi.h5ad", integer_counts(6, 4), GENES, obs=obs)

    samples, report = read_one(tmp_path, spec, path)

    assert list(samples) == ["a", "b"]
    assert samples["a"].patient_id == "P1"
    assert samples["b"].patient_id == "P2"
    assert samples["a"].labels.tolist() == ["CD8 TEM", ""]
    assert samples["b"].labels.tolist() == ["CD4 TEM", "DN gdT", ""]
    assert report.skips == {"obs['sample']: missing": 1}
    assert report.counts["cells"] == 5
    assert report.counts["cells-labelled"] == 3
    assert report.details["samples"]["b"] == {
        "patient": "P2",
        "cells": 3,
        "cells-labelled": 2,
        "genes-matched": 3,
        "counts-source": "X",
    }


def test_obs_patients_split(tmp_path: Path, spec: FeatureSpec) -> None:
    obs: dict[str, list[str | None]] = {"patient": ["P1", "P2", "P1"]}
    path = write_h5ad(tmp_path / "donors.h5ad", integer_counts(3, 4), GENES, obs=obs)

    samples, _ = read_one(tmp_path, spec, path)

    assert sorted(samples) == ["donors:P1", "donors:P2"]
    assert samples["donors:P1"].barcodes.tolist() == ["cell0", "cell2"]


def test_obs_sample_two_patients(tmp_path: Path, spec: FeatureSpec) -> None:
    obs: dict[str, list[str | None]] = {"sample": ["a", "a", "b"], "patient": ["P1", "P2", "P3"]}
    path = write_h5ad(tmp_path / "mixed.h5ad", integer_counts(3, 4), GENES, obs=obs)

    samples, report = read_one(tmp_path, spec, path)

    assert list(samples) == ["b"]
    [(reason, count)] = report.skips.items()
    assert "sample 'a' has cells of 2 patients" in reason
    assert count == 2


def test_labels_table_join(tmp_path: Path, spec: FeatureSpec) -> None:
    x = integer_counts(3, 3)
    names = ["CD3D", "CD8A", "GZMB"]
    ids = [spec.gene_ids[n] for n in names]
    path = write_10x_v3(tmp_path / "S7" / "filtered_feature_bc_matrix.h5", x, names, ids)
    table = tmp_path / "labels.txt"
    table.write_text(
        "CellID\tCellType1\n"
        "S7_AAAC000000000000-1\tCD8 TEM\n"
        "AAAC000000000002-1\tCD4 CTL\n"
        "S8_AAAC000000000001-1\tDN TEM\n"
    )

    samples, report = read_one(tmp_path, spec, path, patient="P1", labels=table)

    assert samples["S7"].labels.tolist() == ["CD8 TEM", "", "CD4 CTL"]
    assert samples["S7"].labels.dtype == object
    assert report.counts["cells-labelled"] == 2


def test_labels_table_unreadable(tmp_path: Path, spec: FeatureSpec) -> None:
    path = write_h5ad(tmp_path / "s.h5ad", integer_counts(3, 4), GENES)
    table = tmp_path / "labels.tsv"
    table.write_text("Barcode\tState\ncell0\tCD8 TEM\n")

    samples, report = read_one(tmp_path, spec, path, patient="P1", labels=table)

    assert report.usable
    assert samples["s"].labels.tolist() == ["", "", ""]
    assert report.details["labels-error"].startswith(f"{table}: column 'CellID' not found")
    assert "set [cells] labels-cell-column" in report.details["labels-error"]


def test_sample_id_repeated(tmp_path: Path, spec: FeatureSpec) -> None:
    first = write_h5ad(tmp_path / "one" / "s.h5ad", integer_counts(3, 4), GENES)
    second = write_h5ad(tmp_path / "two" / "s.h5ad", integer_counts(2, 4), GENES)

    samples, reports = read_cell_samples(site(tmp_path, [first, second], patient="P1"), spec)

    assert list(samples) == ["s"]
    assert samples["s"].source == str(first)
    assert reports[0].usable
    assert not reports[1].usable
    assert f"already read from {first}" in reports[1].error


def test_folder_and_missing_path(tmp_path: Path, spec: FeatureSpec) -> None:
    folder = tmp_path / "cells"
    write_h5ad(folder / "b.h5ad", integer_counts(2, 4), GENES)
    write_h5ad(folder / "sub" / "a.h5ad", integer_counts(2, 4), GENES)
    (folder / "notes.txt").write_text("ignored\n")
    missing = tmp_path / "absent.h5ad"

    samples, reports = read_cell_samples(site(tmp_path, [folder, missing], patient="P1"), spec)

    assert [Path(r.path).name for r in reports] == ["b.h5ad", "a.h5ad", "absent.h5ad"]
    assert sorted(samples) == ["a", "b"]
    assert not reports[2].usable
    assert (
        reports[2].error == f"{missing}: file not found; fix the path in [site] cells of site.toml."
    )
