"""Per-round checkpoints of the global model: safetensors weights plus a JSON manifest.

Layout: `<run_dir>/round-<n>/weights.safetensors` and `<run_dir>/round-<n>/manifest.json`,
plus `server-optimizer.safetensors` when the strategy keeps optimizer state (FedAdam).
Each file is written to a temporary name and moved into place with `os.replace`, and
the manifest last, so a round folder without a manifest is an interrupted write and is
skipped on resume. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

__all__ = [
    "MANIFEST_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "Rejection",
    "RoundRecord",
    "SiteEntry",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "fedtwin-checkpoint/1"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "server-optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
_ROUND_DIR = re.compile(r"round-(\d+)")


class CheckpointError(RuntimeError):
    """Raised when a checkpoint file is missing, damaged or does not match its manifest."""


@dataclass
class SiteEntry:
    """Training report of one site for one round, as stored in the manifest.

    `epsilon_round` and `epsilon_total` are the site's (epsilon, delta)-DP spend at
    `delta` under `accountant`, per `privacy_unit` (normally the patient); None when
    the site sent no privacy metrics (for example after a refusal). `ledger_entry` is
    the site's signed privacy-ledger entry for the round, stored as the site sent it,
    so a steward can verify it with the site's public key without access to the site.
    """

    site: str
    node_id: int
    status: str
    message: str = ""
    patients: int | None = None
    epsilon_round: float | None = None
    epsilon_total: float | None = None
    delta: float | None = None
    accountant: str = ""
    secure_rng: bool | None = None
    privacy_unit: str = ""
    ledger_entry: dict[str, Any] | None = None


@dataclass
class Rejection:
    """An update the coordinator left out of the aggregate, with the reason."""

    site: str
    node_id: int
    reason: str


@dataclass
class RoundRecord:
    """Outcome of one server round; kept in memory as history and written to the manifest.

    Attributes
    ----------
    server_round
        Round number, starting from 1.
    sites
        One entry per training reply that carried content (updates and refusals).
    rejected
        Updates that failed validation.
    errors
        Node ids and reasons of replies that carried an error instead of content.
    num_updates
        Updates that went into the aggregate.
    aggregated
        False when no valid update arrived and the global model stayed unchanged.
    train_metrics, evaluate_metrics
        Metrics averaged over sites, weighted by patients.
    evaluate_sites
        Per-site evaluation status and patients.
    checkpoint
        Folder of the round's checkpoint, once written.
    """

    server_round: int
    sites: list[SiteEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    num_updates: int = 0
    aggregated: bool = False
    train_metrics: dict[str, Any] = field(default_factory=dict)
    evaluate_metrics: dict[str, Any] = field(default_factory=dict)
    evaluate_sites: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str = ""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk, its SHA-256 checksums verified."""

    server_round: int
    path: Path
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)


def _fedtwin_version() -> str:
    try:
        return metadata.version("fedtwin")
    except metadata.PackageNotFoundError:
        return "unknown"


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None so the manifest stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _kebab_keys(entry: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in entry.items()}


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    # np.ascontiguousarray would turn 0-d arrays into shape (1,), so use order="C".
    data = save_safetensors({name: np.asarray(value, order="C") for name, value in arrays.items()})
    _atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(
    run_dir: str | Path,
    record: RoundRecord,
    arrays: Mapping[str, np.ndarray],
    *,
    run_name: str,
    run_config: Mapping[str, Any],
    task: str,
    spec_sha256: str,
    optimizer_state: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the global arrays and manifest of one round; return the round folder.

    Parameters
    ----------
    run_dir
        Folder of the run; `round-<n>` is created inside it.
    record
        Outcome of the round; its `server_round` names the folder.
    arrays
        Global model arrays after the round.
    run_name, run_config, task, spec_sha256
        Identity of the run, stored in the manifest.
    optimizer_state
        Server optimizer arrays to store beside the weights, if any.
    extra
        More top-level manifest fields, such as `secure-aggregation`; they must be
        JSON-serializable and must not reuse a field name that this function writes.

    Returns
    -------
    Path
        The round folder.

    Raises
    ------
    ValueError
        If a key of `extra` is a field name that this function writes itself.
    """
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "run-name": run_name,
        "round": record.server_round,
        "created-utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "fedtwin-version": _fedtwin_version(),
        "task": task,
        "feature-spec-sha256": spec_sha256,
        "run-config": dict(run_config),
        "weights": None,
        "aggregated": record.aggregated,
        "num-updates": record.num_updates,
        "train-metrics": record.train_metrics,
        "evaluate-metrics": record.evaluate_metrics,
        "sites": [_kebab_keys(asdict(entry)) for entry in record.sites],
        "rejected": [_kebab_keys(asdict(entry)) for entry in record.rejected],
        "errors": record.errors,
        "evaluate-sites": record.evaluate_sites,
    }
    taken = sorted(set(extra or {}) & (set(manifest) | {"server-optimizer"}))
    if taken:
        msg = f"write_checkpoint: extra manifest fields {taken} would replace fields it writes."
        raise ValueError(msg)

    # Files first, the manifest last: a round folder without a manifest is an interrupted write
    round_dir = Path(run_dir) / f"round-{record.server_round}"
    round_dir.mkdir(parents=True, exist_ok=True)
    weights_sha256 = _save_arrays(round_dir / WEIGHTS_FILE, arrays)
    manifest["weights"] = {"file": WEIGHTS_FILE, "sha256": weights_sha256}
    if optimizer_state:
        optimizer_sha256 = _save_arrays(round_dir / OPTIMIZER_FILE, optimizer_state)
        manifest["server-optimizer"] = {"file": OPTIMIZER_FILE, "sha256": optimizer_sha256}
    manifest.update(extra or {})

    text = json.dumps(_json_safe(manifest), indent=2, allow_nan=False) + "\n"
    _atomic_write(round_dir / MANIFEST_FILE, text.encode("utf-8"))
    record.checkpoint = str(round_dir)
    return round_dir


def _read_verified(round_dir: Path, entry: Any, what: str) -> dict[str, np.ndarray]:
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        msg = f"{round_dir / MANIFEST_FILE}: field {what!r} lacks 'file' or 'sha256'."
        raise CheckpointError(msg)
    file = round_dir / Path(str(entry["file"])).name
    if not file.is_file():
        msg = (
            f"Checkpoint file {file} is missing; delete {round_dir} to resume from the "
            f"round before."
        )
        raise CheckpointError(msg)
    data = file.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        msg = (
            f"Checkpoint file {file} has SHA-256 {actual}, but its manifest records "
            f"{entry['sha256']}; the file was changed or damaged. Delete {round_dir} to "
            f"resume from the round before."
        )
        raise CheckpointError(msg)
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types
        msg = f"Checkpoint file {file} is not a valid safetensors file ({err})."
        raise CheckpointError(msg) from err


def load_checkpoint(round_dir: str | Path) -> Checkpoint:
    """Read one round folder, verifying the SHA-256 of every file its manifest lists."""
    round_dir = Path(round_dir)
    manifest_path = round_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        msg = f"Checkpoint manifest {manifest_path} not found."
        raise CheckpointError(msg) from err
    except json.JSONDecodeError as err:
        msg = f"Checkpoint manifest {manifest_path} is not valid JSON ({err})."
        raise CheckpointError(msg) from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("round"), int):
        msg = f"Checkpoint manifest {manifest_path} lacks an integer field 'round'."
        raise CheckpointError(msg)
    folder = _ROUND_DIR.fullmatch(round_dir.name)
    if folder and int(folder.group(1)) != manifest["round"]:
        msg = (
            f"Checkpoint manifest {manifest_path} records round {manifest['round']}, "
            f"but its folder is {round_dir.name}; the folder was renamed or copied."
        )
        raise CheckpointError(msg)

    arrays = _read_verified(round_dir, manifest.get("weights"), "weights")
    optimizer_state: dict[str, np.ndarray] = {}
    if "server-optimizer" in manifest:
        optimizer_state = _read_verified(
            round_dir, manifest["server-optimizer"], "server-optimizer"
        )
    return Checkpoint(
        server_round=manifest["round"],
        path=round_dir,
        arrays=arrays,
        manifest=manifest,
        optimizer_state=optimizer_state,
    )


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """Return the checkpoint of the highest complete round in `run_dir`, or None if there is none.

    Round folders without a manifest (an interrupted write) are skipped with a warning.
    A damaged file in the highest complete round raises `CheckpointError`; the run does
    not fall back silently to an older round.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None

    rounds: list[tuple[int, Path]] = []
    for child in run_dir.iterdir():
        match = _ROUND_DIR.fullmatch(child.name)
        if not match or not child.is_dir():
            continue
        if not (child / MANIFEST_FILE).is_file():
            logger.warning("Skipping %s: it has no %s (interrupted write).", child, MANIFEST_FILE)
            continue
        rounds.append((int(match.group(1)), child))
    if not rounds:
        return None

    _, latest = max(rounds)
    return load_checkpoint(latest)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """Return `(round, arrays)` of the highest complete round in `run_dir`, or None.

    Raises
    ------
    CheckpointError
        If the weights file does not match the SHA-256 in its manifest; the message
        names the file.
    """
    checkpoint = load_latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    return checkpoint.server_round, checkpoint.arrays
