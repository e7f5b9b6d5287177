"""FHIR readers: real Bulk Data folders and Bundles, and the bad-input corpus in tests/fixtures."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from client.fhir import FhirTables, read_fhir
from client.fhir.dates import DateError, add_site_offset, parse_fhir_time, site_timezone
from client.fhir.extract import patient_id_of
from models.spec import FeatureSpec, load_spec

BAD = Path(__file__).parent / "fixtures" / "bad"


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _panel_key(spec: FeatureSpec, concept: dict[str, Any]) -> str | None:
    """Map a CodeableConcept to a panel key straight from the spec's code lists."""
    for coding in concept.get("coding", []):
        for lab in spec.labs:
            if coding.get("system") == "http://loinc.org" and coding.get("code") in lab.loinc:
                return lab.key
            if f"{coding.get('system')}|{coding.get('code')}" in lab.local:
                return lab.key
    return None


def _source(tables: FhirTables, name: str) -> Any:
    matches = [s for s in tables.sources if Path(s.path).name == name]
    assert len(matches) == 1, [s.path for s in tables.sources]
    return matches[0]


# Dates


def test_dates_precision() -> None:
    berlin = site_timezone("Europe/Berlin")
    assert parse_fhir_time("2020", UTC) == (datetime(2020, 1, 1, tzinfo=UTC), "year")
    assert parse_fhir_time("2020-03", UTC)[1] == "month"
    assert parse_fhir_time("2020-03-04", berlin) == (datetime(2020, 3, 3, 23, tzinfo=UTC), "day")
    assert parse_fhir_time("2020-03-04T10:11:00Z", UTC)[1] == "minute"
    assert parse_fhir_time("2020-03-04T10:11:12.5+02:00", UTC) == (
        datetime(2020, 3, 4, 8, 11, 12, 500_000, tzinfo=UTC),
        "second",
    )


def test_dates_reject_invalid() -> None:
    with pytest.raises(DateError, match="not a FHIR date"):
        parse_fhir_time("04/03/2020", UTC)
    with pytest.raises(DateError, match="not a valid calendar date"):
        parse_fhir_time("2020-02-30", UTC)
    with pytest.raises(DateError, match="IANA"):
        site_timezone("Mars/Olympus")


def test_dates_site_offset() -> None:
    berlin = site_timezone("Europe/Berlin")
    assert add_site_offset("2020-07-01T09:00:00", berlin) == "2020-07-01T09:00:00+02:00"
    assert add_site_offset("2020-01-01T09:00", berlin) == "2020-01-01T09:00:00+01:00"
    assert add_site_offset("2020-01-01T09:00:00Z", berlin) is None


def test_patient_reference_forms() -> None:
    assert patient_id_of("Patient/abc") == "abc"
    assert patient_id_of("https://fhir.example.org/r4/Patient/abc") == "abc"
    assert patient_id_of("Patient/abc/_history/2") == "abc"
    assert patient_id_of("Group/abc") is None
    assert patient_id_of("urn:uuid:1234") is None


# Real data


@pytest.fixture(scope="module")
def mimic(shared_data: Path, spec: FeatureSpec) -> FhirTables:
    return read_fhir([shared_data / "mimic-iv-demo-fhir"], spec)


def test_mimic_counts(mimic: FhirTables, shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "mimic-iv-demo-fhir"
    patients = _lines(folder / "Patient.ndjson")
    observations = _lines(folder / "Observation.ndjson")
    expected_per_code = Counter(
        key for o in observations if (key := _panel_key(spec, o["code"])) is not None
    )

    assert len(mimic.patients) == len(patients) == 80
    assert len(observations) == 14_930
    report = _source(mimic, "Observation.ndjson")
    assert report.usable
    assert report.counts["observations"] == len(observations)
    assert report.counts["observations-mapped"] == sum(expected_per_code.values())
    assert Counter(mimic.timeline["code"]) == expected_per_code
    assert sum(report.skips.values()) == 0
    assert set(mimic.timeline["patient_id"]) <= set(mimic.patients.index)


def test_mimic_values(mimic: FhirTables, shared_data: Path, spec: FeatureSpec) -> None:
    observations = _lines(shared_data / "mimic-iv-demo-fhir" / "Observation.ndjson")
    raw = pd.DataFrame(
        {
            "code": [_panel_key(spec, o["code"]) for o in observations],
            "time": pd.to_datetime([o["effectiveDateTime"] for o in observations], utc=True),
            "raw": [o["valueQuantity"]["value"] for o in observations],
            "raw_unit": [o["valueQuantity"]["code"] for o in observations],
            "patient_id": [o["subject"]["reference"].split("/")[1] for o in observations],
        }
    )
    key = ["patient_id", "time", "code"]
    # Two platelet counts at the same minute exist in MIMIC; compare only unambiguous ones.
    platelets = mimic.timeline[mimic.timeline["code"] == "platelets"]
    platelets = platelets.drop_duplicates(key, keep=False)
    raw = raw[raw["raw_unit"] == "10*3/uL"].drop_duplicates(key, keep=False)
    merged = platelets.merge(raw, on=key)
    assert len(merged) > 1000
    assert (merged["value"] == merged["raw"]).all()
    assert (mimic.timeline["unit"] == mimic.timeline["code"].map(_canonical_units())).all()
    # MIMIC dates are shifted into the 22nd century; birth years in the future mark the shift.
    assert mimic.timeline["time"].min() > pd.Timestamp("2100-01-01", tz="UTC")


def _canonical_units() -> dict[str, str]:
    return {lab.key: lab.unit for lab in load_spec().labs}


def test_car22_cohort(shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "car22-cart-fhir"
    tables = read_fhir([folder], spec)
    conditions = _lines(folder / "Condition.ndjson")
    astct = {}
    for c in conditions:
        if c["code"]["coding"][0]["code"] != "crs":
            continue
        for stage in c["stage"]:
            if stage["type"]["coding"][0]["code"] == "astct-2019":
                patient = c["subject"]["reference"].split("/")[1]
                astct[patient] = float(stage["summary"]["coding"][0]["code"])

    assert len(tables.patients) == len(_lines(folder / "Patient.ndjson")) == 48
    assert tables.patients["infusion_time"].notna().sum() == 48
    assert tables.patients["crs_grade"].dropna().to_dict() == astct
    mapped = sum(1 for o in _lines(folder / "Observation.ndjson") if _panel_key(spec, o["code"]))
    assert len(tables.timeline) == mapped
    day0 = tables.timeline[tables.timeline["time"] == pd.Timestamp("2020-01-01", tz="UTC")]
    assert (day0["day"] == 0.0).all()


def test_bcma_cohort(shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "bcma-cart-fhir"
    tables = read_fhir([folder], spec)
    patients = _lines(folder / "Patient.ndjson")
    births = {p["id"]: int(p["birthDate"]) for p in patients}

    assert len(tables.patients) == 42
    ages = tables.patients["age_at_infusion"]
    for patient_id, year in births.items():
        # birthDate is a year, so the age uses mid-year: 2020-01-01 minus July of that year.
        assert math.isclose(ages[patient_id], 2019.5 - year, abs_tol=0.01)
    products = set(tables.patients["product"])
    assert any("ide-cel" in str(p) for p in products)
    icans = tables.events[tables.events["kind"] == "icans"]
    icans_lines = [c for c in _lines(folder / "Condition.ndjson") if "icans" in c["id"]]
    assert len(icans) == len(icans_lines) > 0
    copies = tables.timeline[tables.timeline["code"] == "car-copies-dna"]
    assert len(copies) > 0
    assert (copies["unit"] == "{copies}/ug").all()


def test_synthea_bundles(shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "synthea-r4-bundles"
    tables = read_fhir([folder], spec)
    expected_patients = set()
    expected_mapped = 0
    for path in sorted(folder.glob("*.json")):
        bundle = orjson.loads(path.read_bytes())
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                expected_patients.add(resource["id"])
            elif resource["resourceType"] == "Observation" and _panel_key(spec, resource["code"]):
                expected_mapped += 1

    assert len([s for s in tables.sources if s.kind == "fhir-bundle"]) == 8
    assert set(tables.patients.index) == expected_patients
    assert len(tables.timeline) == expected_mapped > 0
    assert set(tables.timeline["patient_id"]) <= expected_patients


def test_synthea_bulk(shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "synthea-bulk-ndjson-10"
    tables = read_fhir([folder], spec)
    assert len(tables.patients) == len(_lines(folder / "Patient.000.ndjson")) == 13
    conditions = _lines(folder / "Condition.000.ndjson")
    assert (tables.events["kind"] == "condition").sum() == len(conditions)
    assert all(s.usable for s in tables.sources)
    assert "log.ndjson" not in {Path(s.path).name for s in tables.sources}
    assert tables.timeline.empty


# Bad inputs


@pytest.fixture(scope="module")
def bad(spec: FeatureSpec) -> FhirTables:
    return read_fhir([BAD / "bulk"], spec, timezone="Europe/Berlin")


def test_bad_patient_file(bad: FhirTables) -> None:
    report = _source(bad, "Patient.ndjson")
    assert report.usable
    assert report.skips["duplicate-equal"] == 1
    assert report.skips["duplicate-conflict"] == 1
    assert report.details["duplicate-conflict"] == ["Patient/p2"]
    assert report.skips["resourceType: Observation in a Patient file"] == 1
    assert report.skips["invalid-json"] == 1
    assert report.details["invalid-json-lines"] == [7]
    assert report.skips["Patient.birthDate: before 1900 (value dropped, patient kept)"] == 1
    assert sorted(bad.patients.index) == ["p1", "p2", "p3"]
    assert bad.patients.loc["p2", "birth_date"] == "1955"  # the first of the conflicting two
    assert bad.patients.loc["p3", "birth_date"] is None


@pytest.mark.parametrize(
    "reason",
    [
        "Observation.subject: missing",
        "Observation.subject: Patient not found in the site's data",
        "unit-not-convertible: bananas -> mg/L",
        "Observation.valueQuantity.value: Decimal value string does not match spec regex.",
        "Observation.value[x]: not a Quantity (valueString)",
        "Observation.effectiveDateTime: in the future",
        "Observation.effectiveDateTime: before 1900",
        "invalid-json",
        "duplicate-equal",
    ],
)
def test_bad_observation_skips(bad: FhirTables, reason: str) -> None:
    report = _source(bad, "Observation.ndjson")
    assert report.skips[reason] == 1, dict(report.skips)


def test_bad_observation_kept(bad: FhirTables) -> None:
    timeline = bad.timeline.set_index(["patient_id", "code"])
    assert timeline.loc[("p1", "crp"), "value"] == 12.5
    assert timeline.loc[("p1", "crp"), "time"] == pd.Timestamp("2020-01-02T07:30:00Z")
    assert timeline.loc[("p1", "il6"), "censored"] == "<"
    assert math.isnan(timeline.loc[("p1", "hemoglobin"), "value"])
    assert math.isclose(timeline.loc[("p2", "creatinine"), "value"], 88.4 * 113.12 / 10_000)
    assert math.isclose(timeline.loc[("p2", "wbc"), "value"], 4.2)
    assert bool(timeline.loc[("p2", "platelets"), "out_of_range"])
    # A date-time without offset is site-local time: 09:00 in Berlin summer is 07:00 UTC.
    local = timeline.loc[("p2", "crp")]
    assert local["time"] == pd.Timestamp("2020-07-01T07:00:00Z")
    report = _source(bad, "Observation.ndjson")
    assert report.counts["dates-without-offset"] == 1
    assert report.details["not-in-panel"] == {
        "http://loinc.org|8302-2": 1,
        "component: http://loinc.org|4544-3": 1,
    }
    assert report.details["unit-conversions"]["creatinine: umol/L -> mg/dL"] == 1


def test_bad_events(bad: FhirTables) -> None:
    patients = bad.patients
    assert patients.loc["p1", "crs_grade"] == 2.0  # ASTCT wins over the Lee grade 3
    assert patients.loc["p2", "icans_grade"] == 3.0  # from ICD-10-CM G92.03
    assert patients.loc["p1", "product"] == "test CAR T product"
    assert patients.loc["p2", "product"] == "second CAR T product"
    # p1 infused on 2020-01-01 in Berlin, born June 1970 (mid-month used).
    assert patients.loc["p1", "infusion_time"] == pd.Timestamp("2019-12-31T23:00:00Z")
    assert math.isclose(patients.loc["p1", "age_at_infusion"], 49.54, abs_tol=0.01)
    assert math.isnan(patients.loc["p3", "age_at_infusion"])
    kinds = Counter(bad.events["kind"])
    assert kinds == {"infusion": 2, "crs": 1, "icans": 1, "condition": 1}
    crs = bad.events[bad.events["kind"] == "crs"].iloc[0]
    assert crs["day"] == 2.0
    assert crs["grading"] == "astct-2019"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("empty", "empty file"),
        ("no-data", "no FHIR files"),
        ("truncated-bundle.json", "invalid JSON"),
        ("does-not-exist", "not found"),
    ],
)
def test_bad_unusable_source(spec: FeatureSpec, path: str, message: str) -> None:
    tables = read_fhir([BAD / path, BAD / "bulk"], spec)
    unusable = [s for s in tables.sources if not s.usable]
    assert len(unusable) == 1
    assert message in unusable[0].error
    assert "\n" not in unusable[0].error
    assert len(tables.patients) == 3


def test_bundle_urn_references(tmp_path: Path, spec: FeatureSpec) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
                "resource": {"resourceType": "Patient", "id": "pat-a", "gender": "male"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:22222222-2222-2222-2222-222222222222",
                "resource": {
                    "resourceType": "Observation",
                    "id": "obs-a",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"},
                    "effectiveDateTime": "2021-05-01",
                    "valueQuantity": {
                        "value": 130,
                        "unit": "g/L",
                        "system": "http://unitsofmeasure.org",
                        "code": "g/L",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps(bundle))
    tables = read_fhir([path], spec)
    assert list(tables.timeline["patient_id"]) == ["pat-a"]
    assert list(tables.timeline["value"]) == [13.0]
    assert list(tables.timeline["precision"]) == ["day"]
