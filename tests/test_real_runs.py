"""The three real-data federations with few rounds: MIMIC labs, two CAR T cohorts, CARPALL cells."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from federation_helpers import read_manifest

from server.cli import main as coordinator_main
from server.cli_run import simulate
from server.strategy import FedTwinResult

pytestmark = [pytest.mark.simulation, pytest.mark.shared_data]


def _run(consortium: Path, task: str, runs: Path) -> FedTwinResult:
    return simulate(
        {
            "consortium": str(consortium),
            "task": task,
            "num-server-rounds": 2,
            "runs-dir": str(runs),
            "run-name": task,
        }
    )


def _check_sites(manifest: dict[str, Any], expected: set[str]) -> None:
    assert {entry["site"] for entry in manifest["sites"]} == expected
    for entry in manifest["sites"]:
        assert entry["status"] == "ok", entry
        assert entry["accountant"] == "rdp"
        assert 0 < entry["delta"] < 1 / entry["patients"]
        assert entry["epsilon-total"] > entry["epsilon-round"] > 0


def test_lab_forecast_mimic_three_sites(shared_data: Path, tmp_path: Path) -> None:
    code = coordinator_main(
        [
            "-q",
            "partition",
            "--fhir",
            str(shared_data / "mimic-iv-demo-fhir"),
            "--sites",
            "3",
            "--seed",
            "0",
            "--out",
            str(tmp_path / "sites"),
        ]
    )
    assert code == 0
    result = _run(tmp_path / "sites", "lab-forecast", tmp_path / "runs")
    manifest = read_manifest(result.last_checkpoint)
    _check_sites(manifest, {"site-1", "site-2", "site-3"})
    assert sum(entry["patients"] for entry in manifest["sites"]) <= 80
    metrics = manifest["evaluate-metrics"]
    assert math.isfinite(metrics["mae"])
    assert 0 <= metrics["coverage-90"] <= 1


def test_crs_risk_car22_bcma(shared_data: Path, tmp_path: Path) -> None:
    code = coordinator_main(
        [
            "-q",
            "consortium",
            "--site",
            f"car22={shared_data / 'car22-cart-fhir'}",
            "--site",
            f"bcma={shared_data / 'bcma-cart-fhir'}",
            "--out",
            str(tmp_path / "sites"),
        ]
    )
    assert code == 0
    result = _run(tmp_path / "sites", "crs-risk", tmp_path / "runs")
    manifest = read_manifest(result.last_checkpoint)
    _check_sites(manifest, {"car22", "bcma"})
    patients = {entry["site"]: entry["patients"] for entry in manifest["sites"]}
    assert patients["car22"] <= 48
    assert patients["bcma"] <= 42
    assert 0 <= manifest["evaluate-metrics"]["brier"] <= 1


def test_cell_state_carpall_three_sites(shared_data: Path, tmp_path: Path) -> None:
    carpall = shared_data / "carpall-cart-scrna"
    code = coordinator_main(
        [
            "-q",
            "partition",
            "--cells",
            str(carpall / "gex"),
            "--sample-sheet",
            str(carpall / "CARPALL_scRNAseq_CART_metadata.txt"),
            "--labels",
            str(carpall / "CARTcell_barcodes.txt"),
            "--sites",
            "3",
            "--seed",
            "0",
            "--out",
            str(tmp_path / "sites"),
        ]
    )
    assert code == 0
    result = _run(tmp_path / "sites", "cell-state", tmp_path / "runs")
    manifest = read_manifest(result.last_checkpoint)
    _check_sites(manifest, {"site-1", "site-2", "site-3"})
    # 9 patients over 3 sites: each site holds out fewer patients than the minimum
    # cohort of 3, so its evaluation metrics are withheld, as the policy says.
    statuses = {entry["status"] for entry in manifest["evaluate-sites"]}
    assert statuses == {"below-min-cohort"}
