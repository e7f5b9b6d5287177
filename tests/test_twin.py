"""Per-patient twin: checkpoint checks, fine-tuning guard, calibration, FHIR output, state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fhir.resources.R4B.bundle import Bundle

from client.cli import main
from client.site_config import load_site_config
from client.training import train_plain
from client.twin.calibration import calibration_slope, conformal_quantile
from client.twin.errors import (
    EXIT_BAD_CHECKPOINT,
    EXIT_NO_OBSERVATIONS,
    EXIT_NO_TWIN,
    EXIT_SPEC_MISMATCH,
    EXIT_UNKNOWN_PATIENT,
)
from client.twin.fhir_bundle import INTERVAL_URL
from client.twin.forecast import MIN_TARGET_BINS, _HeadCache, fine_tune, twin_model
from client.twin.state import load_twin, patient_folder
from models.spec import load_spec
from models.tasks import get_task
from server.checkpoint import RoundRecord, write_checkpoint
from server.demo_cohort import generate_demo_cohort


def _checkpoint(site: Path, task: str, run_dir: Path, *, epochs: int, seed: int = 0) -> Path:
    from client.dataset import load_site_dataset

    config = load_site_config(site)
    spec = load_spec(config.spec)
    data = load_site_dataset(config, spec)
    twin_task = get_task(task)
    examples = twin_task.build_examples(spec, data.patients, data.timeline, data.events, data.cells)
    torch.manual_seed(seed)
    model = twin_task.build_model(spec)
    train_plain(
        model,
        examples.dataset(),
        twin_task.loss,
        epochs=epochs,
        learning_rate=0.05,
        batch_size=8,
        seed=seed,
    )
    arrays = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    return write_checkpoint(
        run_dir,
        RoundRecord(server_round=1, aggregated=True),
        arrays,
        run_name=run_dir.name,
        run_config={"seed": 0},
        task=task,
        spec_sha256=spec.sha256,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twin-demo")
    generate_demo_cohort(root, num_sites=1, patients_per_site=16, seed=3)
    site = root / "consortium" / "site-1"
    return {
        "site": site,
        "lab": _checkpoint(site, "lab-forecast", root / "runs" / "lab", epochs=3),
        "crs": _checkpoint(site, "crs-risk", root / "runs" / "crs", epochs=3),
        "root": root,
    }


def _site_copy(demo: dict[str, Path], tmp_path: Path) -> Path:
    # Each test gets its own site folder, so twin state does not leak between tests.
    site = tmp_path / "site-1"
    shutil.copytree(demo["site"], site, ignore=shutil.ignore_patterns("state"))
    text = (
        (site / "site.toml").read_text().replace("../../spec.toml", str(demo["root"] / "spec.toml"))
    )
    (site / "site.toml").write_text(text)
    return site


def _predict(site: Path, checkpoints: list[Path], patient: str, out: Path, *extra: str) -> int:
    argv = ["predict", "--site-config", str(site), "--patient", patient, "--out", str(out)]
    for checkpoint in checkpoints:
        argv += ["--checkpoint", str(checkpoint)]
    return main([*argv, *extra])


def test_predict_bundle_valid(demo: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    code = _predict(site, [demo["lab"], demo["crs"]], "demo-s1-002", out, "--horizon-days", "2")
    assert code == 0
    bundles = list(out.glob("*.bundle.json"))
    assert len(bundles) == 1
    assert len(list(out.glob("*.forecast.png"))) == 1
    content = json.loads(bundles[0].read_text())
    Bundle.model_validate(content)

    resources = [entry["resource"] for entry in content["entry"]]
    forecasts = [r for r in resources if r["resourceType"] == "Observation"]
    risks = [r for r in resources if r["resourceType"] == "RiskAssessment"]
    assert forecasts
    assert len(risks) == 1
    assert all(r["status"] == "preliminary" for r in forecasts)
    assert all(r["meta"]["tag"][0]["code"] == "model-output" for r in forecasts)
    assert 0.0 <= risks[0]["prediction"][0]["probabilityDecimal"] <= 1.0
    assert "crs-risk" in risks[0]["method"]["text"]

    # Interval bounds enclose the median, and the 95% interval contains the 80% one
    for observation in forecasts:
        bounds = {}
        for extension in observation["extension"]:
            assert extension["url"] == INTERVAL_URL
            parts = {e["url"]: e for e in extension["extension"]}
            bounds[parts["level"]["valueDecimal"]] = (
                parts["low"]["valueQuantity"]["value"],
                parts["high"]["valueQuantity"]["value"],
            )
        median = observation["valueQuantity"]["value"]
        assert bounds[0.8][0] <= median <= bounds[0.8][1]
        assert bounds[0.95][0] <= bounds[0.8][0]
        assert bounds[0.95][1] >= bounds[0.8][1]
    assert "Patient demo-s1-002" in capsys.readouterr().out


def test_basis_ids_exist(demo: dict[str, Path], tmp_path: Path) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    assert _predict(site, [demo["crs"]], "demo-s1-002", out) == 0
    content = json.loads(next(out.glob("*.bundle.json")).read_text())
    risk = next(
        e["resource"] for e in content["entry"] if e["resource"]["resourceType"] == "RiskAssessment"
    )

    ids = set()
    for line in (site / "fhir" / "Observation.ndjson").read_bytes().splitlines():
        resource = orjson.loads(line)
        if resource["subject"]["reference"] == "Patient/demo-s1-002":
            ids.add(resource["id"])
    basis = {ref["reference"].split("/")[1] for ref in risk["basis"]}
    assert basis
    assert basis <= ids


def test_update_unchanged_then_new(demo: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    assert _predict(site, [demo["lab"]], "demo-s1-004", out) == 0
    state_dir = load_site_config(site).state_dir
    before = load_twin(state_dir, "demo-s1-004")["lab-forecast"]["data-sha256"]

    argv = [
        "update",
        "--site-config",
        str(site),
        "--checkpoint",
        str(demo["lab"]),
        "--patient",
        "demo-s1-004",
    ]
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out

    # A new observation: a copy of the patient's latest one, one day later
    path = site / "fhir" / "Observation.ndjson"
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    own = [r for r in rows if r["subject"]["reference"] == "Patient/demo-s1-004"]
    latest = max(own, key=lambda r: r["effectiveDateTime"])
    new = dict(latest, id="new-observation-1")
    moment = np.datetime64(
        latest["effectiveDateTime"].replace("Z", "").split("+")[0]
    ) + np.timedelta64(1, "D")
    new["effectiveDateTime"] = str(moment) + "Z"
    path.write_bytes(path.read_bytes() + orjson.dumps(new) + b"\n")

    assert main(argv) == 0
    assert "updated: lab-forecast" in capsys.readouterr().out
    after = load_twin(state_dir, "demo-s1-004")["lab-forecast"]["data-sha256"]
    assert after != before


def test_new_model_retires_twin(demo: dict[str, Path], tmp_path: Path) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    assert _predict(site, [demo["lab"]], "demo-s1-005", out) == 0
    newer = _checkpoint(site, "lab-forecast", tmp_path / "runs" / "lab-2", epochs=1, seed=1)
    argv = [
        "update",
        "--site-config",
        str(site),
        "--checkpoint",
        str(newer),
        "--patient",
        "demo-s1-005",
    ]
    assert main(argv) == 0

    state_dir = load_site_config(site).state_dir
    retired = list(
        (patient_folder(state_dir, "demo-s1-005") / "retired").glob("*-lab-forecast.json")
    )
    assert len(retired) == 1
    assert "replaced" in json.loads(retired[0].read_text())["retired-because"]
    assert load_twin(state_dir, "demo-s1-005")["lab-forecast"]["global-model"].startswith("lab-2/")


def test_update_without_twin(demo: dict[str, Path], tmp_path: Path) -> None:
    site = _site_copy(demo, tmp_path)
    argv = [
        "update",
        "--site-config",
        str(site),
        "--checkpoint",
        str(demo["lab"]),
        "--patient",
        "demo-s1-006",
    ]
    assert main(argv) == EXIT_NO_TWIN


def test_unknown_patient(demo: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    assert _predict(site, [demo["lab"]], "nobody", out) == EXIT_UNKNOWN_PATIENT
    assert "'nobody' is not in the data" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_patient_without_observations(demo: dict[str, Path], tmp_path: Path) -> None:
    site = _site_copy(demo, tmp_path)
    patient = {"resourceType": "Patient", "id": "empty-1", "gender": "female", "birthDate": "1970"}
    path = site / "fhir" / "Patient.ndjson"
    path.write_bytes(path.read_bytes() + orjson.dumps(patient) + b"\n")
    out = tmp_path / "out"
    assert _predict(site, [demo["lab"]], "empty-1", out) == EXIT_NO_OBSERVATIONS
    assert not out.exists() or not any(out.iterdir())


def test_tampered_weights(demo: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = _site_copy(demo, tmp_path)
    checkpoint = tmp_path / "round-1"
    shutil.copytree(demo["lab"], checkpoint)
    weights = checkpoint / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert _predict(site, [checkpoint], "demo-s1-002", out) == EXIT_BAD_CHECKPOINT
    assert "SHA-256" in capsys.readouterr().err
    assert not out.exists()


def test_other_spec_checkpoint(demo: dict[str, Path], tmp_path: Path, capsys) -> None:
    site = _site_copy(demo, tmp_path)
    checkpoint = tmp_path / "round-1"
    shutil.copytree(demo["lab"], checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["feature-spec-sha256"] = "0" * 64
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert _predict(site, [checkpoint], "demo-s1-002", out) == EXIT_SPEC_MISMATCH
    assert "feature-spec-sha256" in capsys.readouterr().err
    assert not out.exists()


def test_all_patients(demo: dict[str, Path], tmp_path: Path) -> None:
    site = _site_copy(demo, tmp_path)
    out = tmp_path / "out"
    argv = [
        "predict",
        "--site-config",
        str(site),
        "--checkpoint",
        str(demo["crs"]),
        "--all-patients",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    patients = [
        orjson.loads(line)["id"]
        for line in (site / "fhir" / "Patient.ndjson").read_bytes().splitlines()
    ]
    assert len(list(out.glob("*.bundle.json"))) == len(patients)


def _lab_row(demo: dict[str, Path]) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from client.dataset import load_site_dataset
    from client.twin.checkpoint import read_checkpoint

    config = load_site_config(demo["site"])
    spec = load_spec(config.spec)
    model = read_checkpoint(demo["lab"], spec).build(spec)
    data = load_site_dataset(config, spec, cache=False)
    examples = get_task("lab-forecast").build_examples(
        spec, data.patients, data.timeline, data.events, {}
    )
    return model, examples.subset([0]).tensors


def test_head_cache_matches_forward(demo: dict[str, Path]) -> None:
    model, row = _lab_row(demo)
    offset = torch.linspace(-0.3, 0.3, model.get_parameter("head.bias").numel())
    twin = twin_model(model, offset.numpy())
    with torch.no_grad():
        mean, log_var = twin(*row)
        cache = _HeadCache(model, row)
        cached_mean, cached_log_var = cache.outputs(model.get_parameter("head.bias") + offset)
    assert torch.allclose(mean[0], cached_mean, atol=1e-5)
    assert torch.allclose(log_var[0], cached_log_var, atol=1e-5)


def test_fine_tune_short_history(demo: dict[str, Path]) -> None:
    model, row = _lab_row(demo)
    short = tuple(t[:, :MIN_TARGET_BINS] for t in row)
    # Keep only the first bins: too few targets, so the global model is kept.
    outcome = fine_tune(model, short)
    assert not outcome.used
    assert "fewer than" in outcome.reason
    assert not outcome.offset.any()


def test_fine_tune_keeps_global_weights(demo: dict[str, Path]) -> None:
    model, row = _lab_row(demo)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = fine_tune(model, row)
    twin = twin_model(model, outcome.offset)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
        if name != "head.bias":
            assert torch.equal(twin.state_dict()[name], value)


def test_conformal_quantile_rank() -> None:
    scores = np.arange(1, 20, dtype=float)  # 19 scores: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(scores, 0.9) == 18.0
    assert conformal_quantile(scores[:5], 0.95) == float("inf")


def test_calibration_slope_recovers() -> None:
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 2, 4000)
    labels = rng.random(4000) < 1 / (1 + np.exp(-0.5 * logit))
    probability = 1 / (1 + np.exp(-logit))
    assert calibration_slope(labels, probability) == pytest.approx(0.5, abs=0.08)


def test_real_car22_risk(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "car22-cart-fhir"
    site = tmp_path / "car22"
    site.mkdir()
    (site / "site.toml").write_text(
        f'[site]\nname = "car22"\nfhir = ["{source}"]\nstate-dir = "state"\n'
    )
    checkpoint = _checkpoint(site, "crs-risk", tmp_path / "runs" / "crs", epochs=5)
    patient_ids = [
        orjson.loads(line)["id"] for line in (source / "Patient.ndjson").read_bytes().splitlines()
    ]
    out = tmp_path / "out"
    assert _predict(site, [checkpoint], patient_ids[0], out) == 0
    content = json.loads(next(out.glob("*.bundle.json")).read_text())
    Bundle.model_validate(content)
    risks = [
        e["resource"] for e in content["entry"] if e["resource"]["resourceType"] == "RiskAssessment"
    ]
    assert len(risks) == 1
    assert risks[0]["subject"]["reference"] == f"Patient/{patient_ids[0]}"
