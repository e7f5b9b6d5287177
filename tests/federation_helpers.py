"""Helpers shared by the tests that run a federation on the synthetic demo cohort."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.demo_cohort import DemoCohort


def read_manifest(round_dir: str | Path) -> dict[str, Any]:
    """Read the `manifest.json` of a checkpoint round folder."""
    return json.loads((Path(round_dir) / "manifest.json").read_text())


def demo_run_config(cohort: DemoCohort, runs_dir: Path, run_name: str) -> dict[str, Any]:
    """Return the run config of a 2-round crs-risk federation over a demo cohort."""
    return {
        "consortium": str(cohort.consortium),
        "task": "crs-risk",
        "num-server-rounds": 2,
        "spec": str(cohort.spec),
        "runs-dir": str(runs_dir),
        "run-name": run_name,
    }
