"""End-to-end federations in Flower's simulation engine: the demo cohort and bad sites.

Each fixture runs one real simulation (Ray actors, real Opacus, real files) and the
tests below it read what that run wrote.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from federation_helpers import demo_run_config, read_manifest
from safetensors.numpy import load_file

from privacy.accountant import AccountantStore
from server.cli import main as coordinator_main
from server.cli_run import simulate
from server.demo_cohort import generate_demo_cohort
from server.strategy import FedTwinResult

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic 3-site cohort and one 2-round crs-risk federation over it."""
    out = tmp_path_factory.mktemp("demo")
    cohort = generate_demo_cohort(out, num_sites=3, patients_per_site=16, seed=0)
    run_config = demo_run_config(cohort, out / "runs", "demo-crs")
    result = simulate(run_config)
    return {"out": out, "cohort": cohort, "run_config": run_config, "result": result}


def test_demo_checkpoint_per_round(demo: dict[str, Any]) -> None:
    run_dir = demo["out"] / "runs" / "demo-crs"
    assert sorted(p.name for p in run_dir.iterdir()) == ["round-1", "round-2"]
    for round_dir in run_dir.iterdir():
        manifest = read_manifest(round_dir)
        weights = round_dir / "weights.safetensors"
        assert manifest["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert manifest["task"] == "crs-risk"
        assert manifest["aggregated"] is True
        assert manifest["num-updates"] == 3


def test_demo_weights_finite(demo: dict[str, Any]) -> None:
    arrays = load_file(str(Path(demo["result"].last_checkpoint) / "weights.safetensors"))
    assert arrays
    for name, array in arrays.items():
        assert math.isfinite(float(abs(array).sum())), name


def test_demo_manifest_states_privacy(demo: dict[str, Any]) -> None:
    manifest = read_manifest(demo["result"].last_checkpoint)
    assert {entry["site"] for entry in manifest["sites"]} == {"site-1", "site-2", "site-3"}
    for entry in manifest["sites"]:
        assert entry["status"] == "ok"
        assert entry["accountant"] == "rdp"
        assert entry["privacy-unit"] == "patient"
        assert entry["secure-rng"] is False
        assert 0 < entry["delta"] < 1 / entry["patients"]
        assert entry["epsilon-total"] > entry["epsilon-round"] > 0


def test_demo_epsilon_cumulative_on_disk(demo: dict[str, Any]) -> None:
    manifest = read_manifest(demo["result"].last_checkpoint)
    for entry in manifest["sites"]:
        state_dir = Path(demo["cohort"].consortium) / entry["site"] / "state"
        store = AccountantStore(state_dir, "crs-risk")
        assert len(store.rounds()) == 2
        assert store.epsilon(entry["delta"]) == pytest.approx(entry["epsilon-total"], rel=1e-6)


def test_demo_evaluation_metrics(demo: dict[str, Any]) -> None:
    result: FedTwinResult = demo["result"]
    assert len(result.history) == 2
    for record in result.history:
        metrics = record.evaluate_metrics
        assert 0 <= metrics["brier"] <= 1
        assert math.isfinite(metrics["log-loss"])
        assert metrics["num-examples"] > 0


def test_demo_resume_runs_remaining_rounds(demo: dict[str, Any]) -> None:
    """Starting the same run with more rounds trains only the new round, from round 2's weights."""
    run_config = {**demo["run_config"], "num-server-rounds": 3}
    result = simulate(run_config)
    assert [record.server_round for record in result.history] == [3]
    manifest = read_manifest(demo["out"] / "runs" / "demo-crs" / "round-3")
    for entry in manifest["sites"]:
        store = AccountantStore(
            Path(demo["cohort"].consortium) / entry["site"] / "state", "crs-risk"
        )
        assert len(store.rounds()) == 3


def _set_spec(site_toml: Path, spec: Path) -> None:
    lines = site_toml.read_text().splitlines()
    lines = [f'spec = "{spec}"' if line.startswith("spec =") else line for line in lines]
    site_toml.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def bad_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A consortium of one good site, one site with no data and one site with another spec."""
    out = tmp_path_factory.mktemp("bad-sites")
    cohort = generate_demo_cohort(out / "demo", num_sites=1, patients_per_site=16, seed=1)
    consortium = out / "consortium"
    consortium.mkdir()
    spec = Path(cohort.spec).resolve()
    shutil.copytree(Path(cohort.consortium) / "site-1", consortium / "a-good")
    _set_spec(consortium / "a-good" / "site.toml", spec)

    empty = consortium / "b-empty"
    (empty / "fhir").mkdir(parents=True)
    (empty / "site.toml").write_text(
        f'[site]\nname = "b-empty"\nfhir = ["fhir"]\nspec = "{spec}"\n'
    )

    other_spec = out / "other-spec.toml"
    other_spec.write_text(Path(cohort.spec).read_text().replace('version = "', 'version = "other-'))
    shutil.copytree(Path(cohort.consortium) / "site-1", consortium / "c-other-spec")
    _set_spec(consortium / "c-other-spec" / "site.toml", other_spec)
    toml = (consortium / "c-other-spec" / "site.toml").read_text()
    (consortium / "c-other-spec" / "site.toml").write_text(
        toml.replace('"site-1"', '"c-other-spec"')
    )

    run_config = {
        "consortium": str(consortium),
        "task": "crs-risk",
        "num-server-rounds": 1,
        "spec": str(cohort.spec),
        "runs-dir": str(out / "runs"),
        "run-name": "bad-sites",
    }
    result = simulate(run_config)
    return {"out": out, "result": result, "manifest": read_manifest(result.last_checkpoint)}


def test_bad_sites_run_goes_on(bad_sites: dict[str, Any]) -> None:
    manifest = bad_sites["manifest"]
    assert manifest["aggregated"] is True
    assert manifest["num-updates"] == 1
    by_site = {entry["site"]: entry for entry in manifest["sites"]}
    assert by_site["site-1"]["status"] == "ok"
    assert by_site["site-1"]["patients"] > 0


def test_bad_sites_statuses_name_site(bad_sites: dict[str, Any]) -> None:
    by_site = {entry["site"]: entry for entry in bad_sites["manifest"]["sites"]}
    assert by_site["b-empty"]["status"] in {"no-data", "error"}
    assert by_site["b-empty"]["message"]
    assert by_site["c-other-spec"]["status"] == "spec-mismatch"
    assert "feature spec" in by_site["c-other-spec"]["message"]


@pytest.fixture(scope="module")
def no_usable_site(tmp_path_factory: pytest.TempPathFactory) -> FedTwinResult:
    """A consortium where no site has a usable patient: a round with zero examples everywhere."""
    out = tmp_path_factory.mktemp("no-usable")
    for name in ("site-a", "site-b"):
        (out / "consortium" / name / "fhir").mkdir(parents=True)
        (out / "consortium" / name / "site.toml").write_text(
            f'[site]\nname = "{name}"\nfhir = ["fhir"]\n'
        )
    run_config = {
        "consortium": str(out / "consortium"),
        "task": "lab-forecast",
        "num-server-rounds": 1,
        "runs-dir": str(out / "runs"),
        "run-name": "no-usable",
    }
    return simulate(run_config)


def test_zero_examples_keeps_model(no_usable_site: FedTwinResult) -> None:
    record = no_usable_site.history[0]
    assert record.aggregated is False
    assert record.num_updates == 0
    manifest = read_manifest(no_usable_site.last_checkpoint)
    arrays = load_file(str(Path(no_usable_site.last_checkpoint) / "weights.safetensors"))
    for name, array in arrays.items():
        assert math.isfinite(float(abs(array).sum())), name
    assert {entry["status"] for entry in manifest["sites"]} <= {"no-data", "error"}


def test_unknown_run_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = coordinator_main(
        ["simulate", "--consortium", str(tmp_path), "--run-config", "num-rounds=3"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "num-rounds" in err
    assert "num-server-rounds" in err
