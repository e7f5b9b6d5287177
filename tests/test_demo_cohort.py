"""Tests of `fedtwin-coordinator demo-cohort`: the synthetic CAR T demo consortium."""

from __future__ import annotations

import tomllib
from collections import defaultdict
from importlib import resources
from pathlib import Path

import anndata
import numpy as np
import orjson
import pytest
import scanpy as sc
from fhir.resources.R4B import get_fhir_model_class
from ucumvert import PintUcumRegistry

from client.site_config import load_site_config
from models.spec import load_spec
from server.cli import main
from server.demo_cohort import SYNTHETIC_TAGS, derive_pbmc_counts, generate_demo_cohort

SITES = ("site-1", "site-2", "site-3")
TOXICITY = "https://example.org/fedtwin/CodeSystem/car-t-toxicity"


def read_ndjson(path: Path) -> list[dict]:
    with path.open("rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo_cohort(out, seed=0)
    return out


def fhir(demo: Path, site: str, kind: str) -> list[dict]:
    return read_ndjson(demo / "consortium" / site / "fhir" / f"{kind}.ndjson")


def max_crs_grades(demo: Path, site: str) -> dict[str, int]:
    grades = {p["id"]: 0 for p in fhir(demo, site, "Patient")}
    for condition in fhir(demo, site, "Condition"):
        if condition["code"]["coding"][0]["code"] == "crs":
            patient = condition["subject"]["reference"].removeprefix("Patient/")
            grade = int(condition["stage"][0]["summary"]["coding"][0]["code"])
            grades[patient] = max(grades[patient], grade)
    return grades


def test_demo_site_folders(demo: Path) -> None:
    for site in SITES:
        config = load_site_config(demo / "consortium" / site)
        assert config.name == site
        assert config.spec == (demo / "spec.toml").resolve()
        assert config.fhir == ((demo / "consortium" / site / "fhir").resolve(),)
        assert [path.name for path in config.cells] == [f"{site}.h5ad"]
        assert all(path.is_file() for path in config.cells)
    assert not (demo / "consortium" / "site-4").exists()


def test_demo_spec_replaces_states_only(demo: Path) -> None:
    default = tomllib.loads(resources.files("models").joinpath("default_spec.toml").read_text())
    written = tomllib.loads((demo / "spec.toml").read_text())
    labels = sorted(sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).unique())

    assert sorted(written["tasks"]["cell-state"]["states"]) == labels
    written["tasks"]["cell-state"]["states"] = default["tasks"]["cell-state"]["states"]
    assert written == default
    assert (
        load_spec(demo / "spec.toml").task("cell-state")["states"]
        != load_spec().task("cell-state")["states"]
    )


def test_demo_fhir_validates_r4b(demo: Path) -> None:
    counts: dict[str, int] = defaultdict(int)
    for site in SITES:
        for path in sorted((demo / "consortium" / site / "fhir").glob("*.ndjson")):
            for resource in read_ndjson(path):
                model = get_fhir_model_class(resource["resourceType"])
                model.model_validate(resource)
                assert resource["meta"]["tag"] == SYNTHETIC_TAGS
                counts[resource["resourceType"]] += 1
    assert counts["Patient"] == 72
    assert counts["Procedure"] == 72
    assert counts["Observation"] > 72 * 100
    assert counts["Condition"] > 0


def test_demo_crs_grades_both_classes(demo: Path) -> None:
    for site in SITES:
        grades = max_crs_grades(demo, site)
        assert any(g >= 2 for g in grades.values()), site
        assert any(g < 2 for g in grades.values()), site
        assert any(g == 1 for g in grades.values()), site

    condition = next(c for c in fhir(demo, "site-1", "Condition") if c["id"].endswith("-crs"))
    assert condition["code"]["coding"][0]["system"] == TOXICITY
    stage_type = condition["stage"][0]["type"]["coding"][0]
    assert stage_type["system"] == "https://example.org/fedtwin/CodeSystem/toxicity-grading-system"
    assert stage_type["code"] == "astct-2019"
    icans = [
        c for site in SITES for c in fhir(demo, site, "Condition") if c["id"].endswith("-icans")
    ]
    assert icans


def test_demo_crs_follows_inflammation(demo: Path) -> None:
    severe, mild = [], []
    for site in ("site-1", "site-2"):
        grades = max_crs_grades(demo, site)
        peak: dict[str, float] = defaultdict(float)
        for observation in fhir(demo, site, "Observation"):
            if observation["code"]["coding"][0]["code"] == "1988-5":
                patient = observation["subject"]["reference"].removeprefix("Patient/")
                peak[patient] = max(peak[patient], observation["valueQuantity"]["value"])
        severe += [peak[p] for p, g in grades.items() if g >= 2]
        mild += [peak[p] for p, g in grades.items() if g == 0]
    assert np.median(severe) > 3 * np.median(mild)


def test_demo_products_differ_by_site(demo: Path) -> None:
    products = []
    for site in SITES:
        procedures = fhir(demo, site, "Procedure")
        assert all(p["code"]["coding"][0]["code"] == "car-t-infusion" for p in procedures)
        products.append({p["usedCode"][0]["coding"][0]["code"] for p in procedures})
    assert products[0] != products[1]
    assert products[1] != products[2]
    assert not products[2] & (products[0] | products[1])


def test_demo_unit_variants(demo: Path) -> None:
    spec = load_spec(demo / "spec.toml")
    ureg = PintUcumRegistry()
    factors: dict[tuple[str, str], float] = {}
    units: dict[tuple[str, str], set[str]] = defaultdict(set)
    for site in SITES:
        for observation in fhir(demo, site, "Observation"):
            coding = observation["code"]["coding"][0]
            key = spec.match_coding(coding["system"], coding["code"])
            assert key is not None
            lab = spec.lab(key)
            quantity = observation["valueQuantity"]
            units[(site, key)].add(quantity["code"])

            if (key, quantity["code"]) not in factors:
                unit_quantity = ureg.Quantity(1.0, ureg.from_ucum(quantity["code"]).units)
                if quantity["code"] == "umol/L":
                    unit_quantity = unit_quantity * ureg.Quantity(lab.molar_mass, "g/mol")
                factors[(key, quantity["code"])] = unit_quantity.to(
                    ureg.from_ucum(lab.unit).units
                ).magnitude
            canonical = quantity["value"] * factors[(key, quantity["code"])]
            assert lab.low <= canonical <= lab.high, (site, key, quantity)

    assert units[("site-2", "creatinine")] == {"umol/L"}
    assert units[("site-1", "platelets")] == {"10*3/uL"}
    assert units[("site-3", "creatinine")] == {"mg/dL"}
    assert units[("site-3", "crp")] == {"mg/dL"}
    assert factors[("creatinine", "umol/L")] == pytest.approx(113.12 / 1e4)


def test_demo_h5ad_counts_and_labels(demo: Path) -> None:
    states = set(load_spec(demo / "spec.toml").task("cell-state")["states"])
    total = 0
    for site in SITES:
        adata = anndata.read_h5ad(demo / "consortium" / site / "cells" / f"{site}.h5ad")
        counts = adata.X.toarray()
        assert (counts >= 0).all()
        assert np.array_equal(counts, np.rint(counts))
        assert counts.sum() > 0
        assert set(adata.obs["cell_state"]) <= states
        assert adata.obs["cell_state"].notna().all()
        patients = {p["id"] for p in fhir(demo, site, "Patient")}
        assert set(adata.obs["patient"]) <= patients
        assert adata.obs["sample"].nunique() == adata.obs["patient"].nunique()
        total += adata.n_obs
    assert total == 700


def test_pbmc_counts_invert_log_normalisation() -> None:
    pbmc = sc.datasets.pbmc68k_reduced()

    counts = derive_pbmc_counts(pbmc)

    library = pbmc.obs["n_counts"].to_numpy()[:, None]
    restored = np.log1p(counts / library * 1e4)
    assert np.allclose(restored, pbmc.raw.X.toarray(), atol=0.02)
    assert counts.dtype.kind == "i"
    assert (counts.sum(axis=1) <= library[:, 0]).all()


def test_demo_deterministic_for_seed(demo: Path, tmp_path: Path) -> None:
    generate_demo_cohort(tmp_path, seed=0)

    for site in SITES:
        for kind in ("Patient", "Procedure", "Condition", "Observation"):
            relative = Path("consortium") / site / "fhir" / f"{kind}.ndjson"
            assert (tmp_path / relative).read_bytes() == (demo / relative).read_bytes()
        first = anndata.read_h5ad(demo / "consortium" / site / "cells" / f"{site}.h5ad")
        second = anndata.read_h5ad(tmp_path / "consortium" / site / "cells" / f"{site}.h5ad")
        assert first.obs.equals(second.obs)


def test_cli_demo_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["demo-cohort", "--out", str(tmp_path), "--sites", "2", "--patients-per-site", "5"])
        == 0
    )
    assert "site-2: 5 patients" in capsys.readouterr().out
    assert len(read_ndjson(tmp_path / "consortium" / "site-2" / "fhir" / "Patient.ndjson")) == 5

    assert main(["demo-cohort", "--out", str(tmp_path), "--sites", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--sites must be at least 1" in err
