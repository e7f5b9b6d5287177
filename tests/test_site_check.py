"""`load_site_dataset`, its cache, and `fedtwin-site check`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest

from client.cli import main
from client.dataset import load_site_dataset
from client.site_config import SiteConfig
from models.spec import FeatureSpec, load_spec

BAD = Path(__file__).parent / "fixtures" / "bad"


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec()


def _config(tmp_path: Path, fhir: list[Path], timezone: str = "UTC") -> SiteConfig:
    return SiteConfig(
        path=tmp_path / "site.toml",
        name="test-site",
        fhir=tuple(fhir),
        cells=(),
        spec=None,
        state_dir=tmp_path / "state",
        timezone=timezone,
    )


def test_dataset_totals(tmp_path: Path, shared_data: Path, spec: FeatureSpec) -> None:
    folder = shared_data / "bcma-cart-fhir"
    data = load_site_dataset(_config(tmp_path, [folder]), spec, cache=False)
    lines = (folder / "Observation.ndjson").read_bytes().splitlines()

    totals = data.report.totals
    assert totals["patients"] == 42
    assert totals["observations"] == len(lines)
    assert totals["observations-mapped"] == len(data.timeline)
    assert totals["skipped"] == 0
    assert totals["cells"] == totals["samples"] == totals["patients-with-both"] == 0
    assert data.report.usable
    assert data.spec_sha256 == spec.sha256
    assert data.cells == {}
    assert str(data.timeline["time"].dtype) == "datetime64[ns, UTC]"
    assert str(data.patients["infusion_time"].dtype) == "datetime64[ns, UTC]"
    assert data.patients.index.name == "patient_id"


def test_dataset_cache_roundtrip(tmp_path: Path, shared_data: Path, spec: FeatureSpec) -> None:
    source = tmp_path / "input"
    shutil.copytree(shared_data / "car22-cart-fhir", source)
    config = _config(tmp_path, [source])

    started = time.perf_counter()
    first = load_site_dataset(config, spec)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    second = load_site_dataset(config, spec)
    warm = time.perf_counter() - started

    assert warm < cold / 2, f"cached read {warm:.2f} s, first read {cold:.2f} s"
    pd.testing.assert_frame_equal(first.patients, second.patients)
    pd.testing.assert_frame_equal(first.timeline, second.timeline)
    pd.testing.assert_frame_equal(first.events, second.events)
    assert first.report.to_dict() == second.report.to_dict()
    cached = list((config.state_dir / "cache").glob("fhir-*/*"))
    assert cached
    assert all(path.suffix == ".json" for path in cached)

    # A changed file (size and mtime) makes the cache miss.
    patient_file = source / "Patient.ndjson"
    lines = patient_file.read_bytes().splitlines()
    patient_file.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    os.utime(patient_file, ns=(time.time_ns(), time.time_ns()))
    third = load_site_dataset(config, spec)
    assert len(third.patients) == len(first.patients) - 1


def test_check_json(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    folders = [shared_data / "car22-cart-fhir", shared_data / "bcma-cart-fhir"]
    code = main(["check", "--fhir", *map(str, folders), "--json", "--no-cache"])
    out = capsys.readouterr().out
    report = json.loads(out)

    assert code == 0
    assert report["usable"] is True
    assert report["totals"]["patients"] == 48 + 42
    expected_keys = {
        "patients",
        "observations",
        "observations-mapped",
        "resources",
        "skipped",
        "cells",
        "samples",
        "patients-with-cells",
        "patients-with-both",
    }
    assert expected_keys <= set(report["totals"])
    assert len(report["sources"]) == 8
    assert all(source["usable"] for source in report["sources"])


def test_check_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(
        ["check", "--fhir", str(BAD / "bulk"), str(BAD / "empty"), "--timezone", "Europe/Berlin"]
    )
    captured = capsys.readouterr()

    assert code == 0
    assert "usable: 3 patients" in captured.out
    assert "unit-not-convertible: bananas -> mg/L" in captured.out
    assert "creatinine: umol/L -> mg/dL" in captured.out
    assert "crp" in captured.out
    bad_lines = [line for line in captured.err.splitlines() if line.startswith("unusable:")]
    assert len(bad_lines) == 1
    assert "empty file" in bad_lines[0]
    assert "Traceback" not in captured.err


def test_check_unusable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = [BAD / "empty", BAD / "no-data", BAD / "truncated-bundle.json"]
    code = main(["check", "--fhir", *map(str, inputs)])
    err = capsys.readouterr().err

    assert code == 2
    bad_lines = [line for line in err.splitlines() if line.startswith("unusable:")]
    assert len(bad_lines) == 3
    assert "no usable patients" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check"], "No input given"),
        (["check", "--fhir", "x", "--timezone", "Mars/Olympus"], "IANA"),
        (["check", "--fhir", "x", "--spec", "missing.toml"], "not found"),
        (["check", "--site-config", "nowhere"], "not found"),
    ],
)
def test_check_bad_arguments(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_check_site_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(
        "[site]\n"
        'name = "leipzig"\n'
        f'fhir = ["{shared_data / "bcma-cart-fhir"}"]\n'
        'timezone = "Europe/Berlin"\n',
        encoding="utf-8",
    )
    assert main(["check", "--site-config", str(site), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["site"] == "leipzig"
    assert report["totals"]["patients"] == 42
    assert (site / "state" / "cache").is_dir()


def test_console_script(tmp_path: Path, shared_data: Path) -> None:
    script = Path(sys.executable).with_name("fedtwin-site")
    if not script.exists():
        pytest.skip(f"console script {script} is not installed; run `pip install -e .`")
    result = subprocess.run(
        [str(script), "check", "--fhir", str(shared_data / "bcma-cart-fhir"), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    patients = (shared_data / "bcma-cart-fhir" / "Patient.ndjson").read_bytes().splitlines()
    assert report["totals"]["patients"] == len(patients)
