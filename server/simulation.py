"""Run a federation in Flower's simulation engine, one simulated SuperNode per site folder."""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation
from flwr.supercore.object_ref import load_app

from server.app import make_server_app
from server.strategy import FedTwinResult

__all__ = ["REPO_ROOT", "count_sites", "run_federation"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIENT_APP = "client.app:app"


def count_sites(consortium: str | Path) -> int:
    """Return the number of site folders (subfolders with `site.toml`) in a consortium folder."""
    root = Path(consortium)
    if not root.is_dir():
        msg = f"Consortium folder {root} not found; create it with `fedtwin-coordinator partition`."
        raise FileNotFoundError(msg)
    return sum(1 for p in root.iterdir() if (p / "site.toml").is_file())


def _client_app() -> ClientApp:
    # The ClientApp is loaded by its component name, as `flwr run` does, so the
    # coordinator's code never imports the site package directly.
    reference = DEFAULT_CLIENT_APP
    pyproject_file = REPO_ROOT / "pyproject.toml"
    if pyproject_file.is_file():
        pyproject = tomllib.loads(pyproject_file.read_text(encoding="utf-8"))
        reference = pyproject["tool"]["flwr"]["app"]["components"]["clientapp"]
    app = load_app(reference, ValueError, str(REPO_ROOT))
    if not isinstance(app, ClientApp):
        msg = f"Component {reference!r} is not a Flower ClientApp."
        raise TypeError(msg)
    return app


def run_federation(
    run_config: dict[str, Any],
    *,
    cpus_per_site: float = 1.0,
    on_result: Callable[[FedTwinResult], None] | None = None,
) -> None:
    """Run the ServerApp with `run_config` and one simulated site per site folder."""
    consortium = Path(str(run_config["consortium"])).resolve()
    num_sites = count_sites(consortium)
    if num_sites == 0:
        msg = f"Consortium folder {consortium} has no site folders (subfolders with site.toml)."
        raise FileNotFoundError(msg)

    config = {**run_config, "consortium": str(consortium)}
    # Keep Ray's accelerator handling as it is and silence its warning about the change.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logger.info("Simulating %d sites of %s, task %s", num_sites, consortium, config.get("task"))
    run_simulation(
        server_app=make_server_app(config, on_result=on_result),
        client_app=_client_app(),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}},
    )
