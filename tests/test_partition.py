"""Tests of `fedtwin-coordinator partition`: site folders from one dataset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anndata
import h5py
import numpy as np
import orjson
import pandas as pd
import pytest

from client.site_config import load_site_config
from server.cli import main
from server.partition import PartitionError, assign_patients, partition_dataset


def read_ndjson(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def subject_id(resource: dict) -> str:
    if resource["resourceType"] == "Patient":
        return resource["id"]
    reference = (resource.get("subject") or resource.get("patient"))["reference"]
    return reference.rsplit("/", 1)[-1]


def site_patients(out: Path, num_sites: int) -> list[set[str]]:
    return [
        {r["id"] for r in read_ndjson(out / f"site-{k}" / "fhir" / "Patient.ndjson")}
        for k in range(1, num_sites + 1)
    ]


def test_partition_mimic_by_patient(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "mimic-iv-demo-fhir"
    patients = {r["id"] for r in read_ndjson(source / "Patient.ndjson")}
    observations = read_ndjson(source / "Observation.ndjson")

    summary = partition_dataset(fhir=[source], cells=[], num_sites=3, out=tmp_path, seed=3)

    sets = site_patients(tmp_path, 3)
    assert len(patients) == 80
    assert sum(len(s) for s in sets) == len(patients)
    assert set().union(*sets) == patients
    for a in range(3):
        for b in range(a + 1, 3):
            assert not sets[a] & sets[b]
    sizes = [len(s) for s in sets]
    assert max(sizes) - min(sizes) <= 1
    assert [site.patients for site in summary.sites] == sizes

    written = 0
    for k, members in enumerate(sets, start=1):
        site_observations = read_ndjson(tmp_path / f"site-{k}" / "fhir" / "Observation.ndjson")
        assert {subject_id(r) for r in site_observations} <= members
        written += len(site_observations)
    assert len(observations) == 14_930
    assert written == len(observations)
    assert summary.dropped == {}

    stored = orjson.loads((tmp_path / "partition.json").read_bytes())
    assert [s["patient_ids"] for s in stored["sites"]] == [sorted(s) for s in sets]
    config = load_site_config(tmp_path / "site-2")
    assert config.fhir == ((tmp_path / "site-2" / "fhir").resolve(),)
    assert config.privacy.min_cohort == 3


def test_partition_deterministic_for_seed(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "mimic-iv-demo-fhir"
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        partition_dataset(fhir=[source], cells=[], num_sites=3, out=tmp_path / name, seed=seed)

    for k in range(1, 4):
        for kind in ("Patient", "Observation", "Condition"):
            first = (tmp_path / "a" / f"site-{k}" / "fhir" / f"{kind}.ndjson").read_bytes()
            second = (tmp_path / "b" / f"site-{k}" / "fhir" / f"{kind}.ndjson").read_bytes()
            assert first == second
    assert site_patients(tmp_path / "a", 3) != site_patients(tmp_path / "c", 3)


def test_partition_by_product(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "bcma-cart-fhir"
    product = {
        subject_id(r): r["usedCode"][0]["coding"][0]["code"]
        for r in read_ndjson(source / "Procedure.ndjson")
    }

    summary = partition_dataset(fhir=[source], cells=[], num_sites=3, out=tmp_path, by="usedCode")

    sets = site_patients(tmp_path, 3)
    assert sum(len(s) for s in sets) == len(product)
    for members in sets:
        assert members
        assert len({product[p] for p in members}) == 1
    assert set(summary.groups) == set(product.values())
    sites_of_groups = [name for names in summary.groups.values() for name in names]
    assert sorted(sites_of_groups) == ["site-1", "site-2", "site-3"]
    for k in range(1, 4):
        procedures = read_ndjson(tmp_path / f"site-{k}" / "fhir" / "Procedure.ndjson")
        assert {subject_id(r) for r in procedures} == sets[k - 1]


def test_partition_by_gender(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "bcma-cart-fhir"
    gender = {r["id"]: r["gender"] for r in read_ndjson(source / "Patient.ndjson")}

    partition_dataset(fhir=[source], cells=[], num_sites=3, out=tmp_path, by="gender", seed=5)

    sets = site_patients(tmp_path, 3)
    assert set().union(*sets) == set(gender)
    for members in sets:
        assert len({gender[p] for p in members}) == 1
    conditions = sum(
        len(read_ndjson(tmp_path / f"site-{k}/fhir/Condition.ndjson")) for k in (1, 2, 3)
    )
    assert conditions == len(read_ndjson(source / "Condition.ndjson"))


def test_partition_carpall_cells(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "carpall-cart-scrna"
    sheet_path = folder / "CARPALL_scRNAseq_CART_metadata.txt"
    labels = folder / "CARTcell_barcodes.txt"
    sheet = pd.read_csv(sheet_path, sep="\t").set_index("GEX_Sample")["Patient"].to_dict()
    files = sorted((folder / "gex").glob("*/filtered_feature_bc_matrix.h5"))
    barcodes = {}
    for path in files:
        with h5py.File(path, "r") as handle:
            barcodes[path.parent.name] = len(handle["matrix"]["barcodes"])

    summary = partition_dataset(
        fhir=[],
        cells=[folder / "gex"],
        num_sites=3,
        out=tmp_path,
        seed=0,
        sample_sheet=sheet_path,
        labels=labels,
    )

    seen_patients: list[set[str]] = []
    seen_samples: list[str] = []
    for k in range(1, 4):
        config = load_site_config(tmp_path / f"site-{k}")
        assert config.cells_config.sample_sheet == sheet_path.resolve()
        assert config.cells_config.labels == labels.resolve()
        samples = [path.parent.name for path in config.cells]
        assert all(path.is_absolute() and path.is_file() for path in config.cells)
        seen_samples.extend(samples)
        seen_patients.append({sheet[s] for s in samples})
        assert summary.sites[k - 1].cells == sum(barcodes[s] for s in samples)
    assert sorted(seen_samples) == sorted(barcodes)
    assert len(seen_samples) == 26
    assert len(set().union(*seen_patients)) == 9
    assert sum(len(p) for p in seen_patients) == 9
    assert sum(site.samples for site in summary.sites) == 26


def test_partition_h5ad_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(6)], 5)
    adata = anndata.AnnData(X=rng.poisson(1.0, size=(30, 4)).astype(np.float32))
    adata.obs["patient"] = patients
    adata.obs["sample"] = [f"{p}-s1" for p in patients]
    source = tmp_path / "cohort.h5ad"
    adata.write_h5ad(source)

    summary = partition_dataset(fhir=[], cells=[source], num_sites=2, out=tmp_path / "out")

    parts = [
        anndata.read_h5ad(tmp_path / "out" / f"site-{k}" / "cells" / "01-cohort.h5ad")
        for k in (1, 2)
    ]
    owners = [set(part.obs["patient"]) for part in parts]
    assert not owners[0] & owners[1]
    assert owners[0] | owners[1] == set(patients)
    assert sum(part.n_obs for part in parts) == 30
    assert [site.samples for site in summary.sites] == [len(o) for o in owners]
    config = load_site_config(tmp_path / "out" / "site-1")
    assert config.cells == ((tmp_path / "out" / "site-1" / "cells" / "01-cohort.h5ad").resolve(),)


def test_partition_bundle_and_bad_lines(tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:aa", "resource": {"resourceType": "Patient", "id": "aa"}},
            {"fullUrl": "urn:uuid:bb", "resource": {"resourceType": "Patient", "id": "bb"}},
            {"fullUrl": "urn:uuid:org", "resource": {"resourceType": "Organization", "id": "org"}},
            {
                "fullUrl": "urn:uuid:e1",
                "resource": {
                    "resourceType": "Encounter",
                    "id": "e1",
                    "subject": {"reference": "urn:uuid:aa"},
                    "serviceProvider": {"reference": "urn:uuid:org"},
                },
            },
        ],
    }
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bundle.json").write_bytes(orjson.dumps(bundle))
    lines = [
        orjson.dumps(
            {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/bb"}}
        ),
        b"{not json",
        orjson.dumps(
            {"resourceType": "Observation", "id": "o2", "subject": {"reference": "Group/g"}}
        ),
    ]
    (inputs / "Observation.ndjson").write_bytes(b"\n".join(lines) + b"\n")

    summary = partition_dataset(fhir=[inputs], cells=[], num_sites=2, out=tmp_path / "out", seed=1)

    encounters = [
        r for k in (1, 2) for r in read_ndjson(tmp_path / "out" / f"site-{k}/fhir/Encounter.ndjson")
    ]
    assert encounters[0]["subject"]["reference"] == "Patient/aa"
    assert encounters[0]["serviceProvider"]["reference"] == "Organization/org"
    assert summary.dropped == {
        "Observation.ndjson: invalid JSON": 1,
        "Observation: subject is not a Patient reference": 1,
        "Organization: no subject or patient reference": 1,
    }
    assert sum(site.resources for site in summary.sites) == 4


def test_assign_patients_fewer_groups_than_sites() -> None:
    patients = {f"f{i}": "female" for i in range(9)} | {f"m{i}": "male" for i in range(3)}

    assignment, groups = assign_patients(patients, 4, grouped=True, seed=0)

    assert len(groups["female"]) == 3
    assert len(groups["male"]) == 1
    counts = Counter(assignment.values())
    assert sorted(counts) == [0, 1, 2, 3]
    assert sorted(counts.values()) == [3, 3, 3, 3]


def test_assign_patients_too_many_sites() -> None:
    with pytest.raises(PartitionError, match="Cannot split 2 patient"):
        assign_patients({"a": None, "b": None}, 3, grouped=False, seed=0)


def test_cli_partition_errors(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(shared_data / "bcma-cart-fhir")

    code = main(["partition", "--fhir", source, "--sites", "43", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "Cannot split 42 patient(s) into 43 sites" in err

    code = main(
        [
            "partition",
            "--fhir",
            source,
            "--sites",
            "2",
            "--by",
            "identifier",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 2
    assert "'identifier' is not a single value" in capsys.readouterr().err


def test_cli_partition_prints_table(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sites"
    source = shared_data / "bcma-cart-fhir"
    argv = ["partition", "--fhir", str(source), "--sites", "2", "--out", str(out), "--seed", "4"]

    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "site-1" in table
    assert "site-2" in table

    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0

    expected = len(read_ndjson(source / "Patient.ndjson"))
    total = next(line for line in table.splitlines() if line.startswith("total"))
    assert int(total.split()[1]) == expected
