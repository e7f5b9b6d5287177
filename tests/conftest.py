"""Shared pytest fixtures: the real data folder and Flower environment settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Return the real data folder: FEDTWIN_SHARED_DATA, or ../shared/data beside the repository."""
    return Path(os.environ.get("FEDTWIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real data folder; tests that use it skip when it is absent (a fresh clone without data)."""
    folder = shared_data_dir()
    if not folder.is_dir():
        pytest.skip(
            f"real data folder {folder} is absent; set FEDTWIN_SHARED_DATA to run this test"
        )
    return folder


@pytest.fixture(autouse=True, scope="session")
def _flower_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep Flower's home in a temporary folder and switch off telemetry and update checks."""
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
