"""`flwr run .` from the repository root: Flower's CLI starts a local SuperLink and runs the app."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.demo_cohort import generate_demo_cohort

pytestmark = pytest.mark.simulation

REPO_ROOT = Path(__file__).resolve().parent.parent


def _pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def _stop_processes_of(flwr_home: Path) -> None:
    """Stop the detached SuperLink this test started (its args name flwr_home) and its children."""
    superlinks = _pids(str(flwr_home))
    children = [pid for parent in superlinks for pid in _pids(f"--parent-pid {parent}")]
    for pid in children + superlinks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def test_flwr_run_repository_root(tmp_path: Path) -> None:
    cohort = generate_demo_cohort(tmp_path / "demo", num_sites=3, patients_per_site=12, seed=2)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedtwin-sim"\n\n[superlink.fedtwin-sim]\naddress = ":local:"\n'
    )
    runs = tmp_path / "runs"
    run_config = (
        f"consortium='{cohort.consortium}' spec='{cohort.spec}' task='crs-risk' "
        f"num-server-rounds=1 runs-dir='{runs}' run-name='flwr-run'"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    flwr = shutil.which("flwr", path=env["PATH"])
    assert flwr is not None, "the flwr command is not installed next to this Python"
    pyproject_before = (REPO_ROOT / "pyproject.toml").read_text()

    try:
        completed = subprocess.run(
            [
                *(flwr, "run", ".", "fedtwin-sim", "--stream"),
                *("--federation-config", "num-supernodes=3", "--run-config", run_config),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        _stop_processes_of(flwr_home)

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (REPO_ROOT / "pyproject.toml").read_text() == pyproject_before
    manifest = json.loads((runs / "flwr-run" / "round-1" / "manifest.json").read_text())
    assert manifest["aggregated"] is True
    assert {entry["site"] for entry in manifest["sites"]} == {"site-1", "site-2", "site-3"}
