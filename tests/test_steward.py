"""`fedtwin-steward` commands and a site's ledger: keygen, verify, report, audit-mia."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import mannwhitneyu

from client.site_config import load_site_config
from client.site_task import RoundSettings, SiteTask
from models.wire import Status
from privacy.cli import EXIT_FAILED, EXIT_INPUT, EXIT_OK, build_parser, main
from privacy.keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, load_public_key
from privacy.ledger import LEDGER_FILE, verify_ledger
from privacy.mia import loss_threshold_audit
from server.checkpoint import RoundRecord, write_checkpoint
from server.demo_cohort import generate_demo_cohort


def _settings(server_round: int, **overrides: Any) -> RoundSettings:
    values: dict[str, Any] = {
        "run_name": "steward-test",
        "server_round": server_round,
        "local_epochs": 1,
        "learning_rate": 0.1,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.5,
        "target_epsilon_per_round": 0.0,
        "proximal_mu": 0.0,
        "seed": 0,
    }
    values.update(overrides)
    return RoundSettings(**values)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One synthetic site with a policy file: two trained crs-risk rounds, then a refusal."""
    out = tmp_path_factory.mktemp("steward")
    cohort = generate_demo_cohort(out, num_sites=1, patients_per_site=24, seed=1)
    folder = Path(cohort.consortium) / "site-1"
    site_toml = folder / "site.toml"
    text = site_toml.read_text()
    text = re.sub(r"\[privacy\][^\[]*", "", text)
    text = text.replace("[site]\n", '[site]\npolicy = "policy.toml"\n', 1)
    site_toml.write_text(text)
    (folder / "policy.toml").write_text(
        'epsilon-cap = 5.0\nmin-noise-multiplier = 0.5\nallowed-tasks = ["crs-risk"]\n'
        "min-cohort = 3\npatients-rounding = 5\n"
    )

    config = load_site_config(folder)
    task = SiteTask(config, "crs-risk")
    state_dict = task.task.build_model(task.spec).state_dict()
    outcomes = []
    for server_round in (1, 2, 3):
        outcome = task.train(state_dict, _settings(server_round))
        outcomes.append(outcome)
        if outcome.state_dict is not None:
            state_dict = outcome.state_dict

    record = RoundRecord(server_round=2)
    run_dir = out / "runs" / "steward-test"
    arrays = {name: tensor.detach().numpy() for name, tensor in state_dict.items()}
    write_checkpoint(
        run_dir,
        record,
        arrays,
        run_name="steward-test",
        run_config={"seed": 0},
        task="crs-risk",
        spec_sha256=task.spec.sha256,
    )
    return {
        "config": config,
        "outcomes": outcomes,
        "state": config.state_dir,
        "checkpoint": run_dir / "round-2",
        "out": out,
    }


# ---------------------------------------------------------------------------- site rounds


def test_site_rounds_in_ledger(site: dict[str, Any]) -> None:
    statuses = [outcome.status for outcome in site["outcomes"]]
    assert statuses[0] == Status.OK
    assert Status.REFUSED_BUDGET in statuses
    ledger = site["state"] / LEDGER_FILE
    result = verify_ledger(ledger, load_public_key(site["state"] / PUBLIC_KEY_FILE))
    assert result.intact, result.problem
    assert [entry["kind"] for entry in result.entries] == [
        "round" if status == Status.OK else "refusal" for status in statuses
    ]


def test_site_ledger_entry_sent(site: dict[str, Any]) -> None:
    entries = [outcome.ledger_entry for outcome in site["outcomes"]]
    stored = [json.loads(line) for line in (site["state"] / LEDGER_FILE).read_text().splitlines()]
    assert entries == stored


def test_site_entry_policy_fields(site: dict[str, Any]) -> None:
    first = site["outcomes"][0].ledger_entry
    assert first["patients"] % 5 == 0
    assert first["patients_rounding"] == 5
    assert first["model_version"].startswith("CrsRiskNet@")
    assert first["policy"]["epsilon-cap"] == 5.0
    assert first["epsilon_total"] <= 5.0
    refusal = next(o.ledger_entry for o in site["outcomes"] if o.status != Status.OK)
    assert refusal["rule"] == "epsilon-cap"
    assert refusal["epsilon_round"] == 0.0
    assert refusal["epsilon_projected"] > 5.0


def test_site_task_not_allowed(site: dict[str, Any]) -> None:
    task = SiteTask(site["config"], "lab-forecast")
    outcome = task.train(task.task.build_model(task.spec).state_dict(), _settings(1))
    assert outcome.status == Status.REFUSED_POLICY
    assert "allowed-tasks" in outcome.message
    assert outcome.ledger_entry is not None
    assert outcome.ledger_entry["rule"] == "task"


def test_site_private_key_mode(site: dict[str, Any]) -> None:
    assert stat.S_IMODE((site["state"] / PRIVATE_KEY_FILE).stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- keygen and verify


def test_keygen_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == EXIT_OK
    assert stat.S_IMODE((tmp_path / "keys" / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert load_public_key(tmp_path / "keys" / PUBLIC_KEY_FILE)
    assert "BEGIN" not in capsys.readouterr().out


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path)]) == EXIT_OK
    before = (tmp_path / PRIVATE_KEY_FILE).read_bytes()
    assert main(["keygen", "--out", str(tmp_path)]) == EXIT_INPUT
    assert "never overwritten" in capsys.readouterr().err
    assert (tmp_path / PRIVATE_KEY_FILE).read_bytes() == before


def test_verify_cli_intact(site: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    ledger = site["state"] / LEDGER_FILE
    key = site["state"] / PUBLIC_KEY_FILE
    assert main(["verify", str(ledger), "--public-key", str(key)]) == EXIT_OK
    assert "intact" in capsys.readouterr().out


def test_verify_cli_edited(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (site["state"] / LEDGER_FILE).read_text().splitlines()
    entry = json.loads(lines[0])
    entry["epsilon_total"] = 0.001
    lines[0] = json.dumps(entry)
    ledger = tmp_path / LEDGER_FILE
    ledger.write_text("\n".join(lines) + "\n")
    key = site["state"] / PUBLIC_KEY_FILE
    assert main(["verify", str(ledger), "--public-key", str(key)]) == EXIT_FAILED
    error = capsys.readouterr().err
    assert "edited" in error
    assert "line 1" in error


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-key", "public key file not found"),
        ("missing-ledger", "ledger not found"),
        ("empty-ledger", "ledger is empty"),
        ("bad-key", "not a PEM public key"),
    ],
)
def test_verify_cli_bad_input(
    site: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    ledger = site["state"] / LEDGER_FILE
    key = site["state"] / PUBLIC_KEY_FILE
    if case == "missing-key":
        key = tmp_path / "absent.pub"
    elif case == "missing-ledger":
        ledger = tmp_path / "absent.jsonl"
    elif case == "empty-ledger":
        ledger = tmp_path / "empty.jsonl"
        ledger.write_text("")
    else:
        key = tmp_path / "bad.pub"
        key.write_text("not a key\n")
    assert main(["verify", str(ledger), "--public-key", str(key)]) == EXIT_INPUT
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_verify_cli_other_site(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--out", str(tmp_path)]) == EXIT_OK
    ledger = site["state"] / LEDGER_FILE
    other = tmp_path / PUBLIC_KEY_FILE
    assert main(["verify", str(ledger), "--public-key", str(other)]) == EXIT_FAILED
    assert "wrong-key" in capsys.readouterr().err


# ---------------------------------------------------------------------------- report


def test_report_json(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = site["state"] / LEDGER_FILE
    assert main(["report", str(ledger), "--out", str(tmp_path), "--json"]) == EXIT_OK
    content = json.loads(capsys.readouterr().out)
    (summary,) = content["sites"]
    assert summary["verified"] is True
    assert summary["compliant"] is True
    assert summary["secure_rng"] is False
    task = next(task for task in summary["tasks"] if task["task"] == "crs-risk")
    assert task["epsilon"] <= task["epsilon_cap"] == 5.0
    assert task["epsilon_remaining"] == pytest.approx(5.0 - task["epsilon"])
    assert len(task["refusals"]) >= 1


def test_report_page_self_contained(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = site["state"] / LEDGER_FILE
    assert main(["report", str(ledger), "--out", str(tmp_path)]) == EXIT_OK
    table = capsys.readouterr().out
    assert "crs-risk" in table
    assert "verified" in table
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "http://" not in page
    assert "https://" not in page
    assert "cryptographically secure" in page


def test_report_tampered_fails(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (site["state"] / LEDGER_FILE).read_text().splitlines()
    ledger = tmp_path / "state" / LEDGER_FILE
    ledger.parent.mkdir()
    ledger.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    shutil.copy(site["state"] / PUBLIC_KEY_FILE, ledger.parent / PUBLIC_KEY_FILE)
    assert main(["report", str(ledger), "--out", str(tmp_path / "out")]) == EXIT_FAILED
    assert "FAILED" in capsys.readouterr().out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_chromium(site: dict[str, Any], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`, see .ci/run)")
    ledger = site["state"] / LEDGER_FILE
    assert main(["report", str(ledger), "--out", str(tmp_path)]) == EXIT_OK
    page = (tmp_path / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]

    # The DOM after load contains the page's heading and its plot.
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<img" in dom.stdout
    assert "Privacy budget per site" in dom.stdout

    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [browser, *flags, f"--screenshot={screenshot}", "--window-size=1100,1400", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    pixels = imread(screenshot)
    assert pixels.shape[0] == 1400
    # A drawn plot leaves many distinct colours; a blank or broken page leaves a few.
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50


# ---------------------------------------------------------------------------- membership inference


def test_mia_auc_matches_mann_whitney() -> None:
    rng = np.random.default_rng(0)
    members = rng.normal(0.8, 0.3, 40)
    non_members = rng.normal(1.0, 0.3, 30)
    audit = loss_threshold_audit(members, non_members)
    statistic = mannwhitneyu(non_members, members).statistic
    assert audit.auc == pytest.approx(statistic / (40 * 30))
    assert audit.ci_low < audit.auc < audit.ci_high
    assert 0 <= audit.advantage <= 1


def test_mia_separated_groups() -> None:
    audit = loss_threshold_audit([0.1, 0.2, 0.3], [1.0, 1.1, 1.2, 1.3])
    assert audit.auc == 1.0
    assert audit.advantage == 1.0


def test_mia_too_few() -> None:
    with pytest.raises(ValueError, match="at least 2 training and 2 held-out"):
        loss_threshold_audit([0.1], [0.2, 0.3])


def test_audit_mia_registered() -> None:
    help_text = build_parser().format_help()
    assert "audit-mia" in help_text


def test_audit_mia_on_site(site: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    site_toml = site["config"].path
    arguments = ["audit-mia", "--checkpoint", str(site["checkpoint"]), "--site-config"]
    assert main([*arguments, str(site_toml), "--json"]) == EXIT_OK
    content = json.loads(capsys.readouterr().out)
    assert content["site"] == "site-1"
    assert content["task"] == "crs-risk"
    assert 0 <= content["ci_low"] <= content["auc"] <= content["ci_high"] <= 1
    assert content["members"] + content["non_members"] >= 20
    assert content["ledger_entry"]["kind"] == "round"


def test_audit_mia_altered_weights(
    site: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "round-2"
    shutil.copytree(site["checkpoint"], copy)
    weights = copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    arguments = ["audit-mia", "--checkpoint", str(copy), "--site-config"]
    assert main([*arguments, str(site["config"].path)]) == EXIT_INPUT
    assert "differs from the manifest" in capsys.readouterr().err
