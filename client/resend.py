"""A site's released updates, kept so that a repeated round request gets them again at no new spend.

When the coordinator restarts after the sites trained round r but before it wrote checkpoint r, it
resumes from checkpoint r − 1 and requests round r again, with the same global weights. A site that
already trained that round resends the update it released then. Publishing the same output twice
reveals nothing new, so the resend spends no privacy budget.

Layout, per site state folder:
`<state_dir>/releases/<task>/<run folder>/round-<n>.safetensors` holds the released weights and
`round-<n>.json` holds the reply's other fields. The JSON file also records the SHA-256 of the
global weights the update was trained from and the SHA-256 of the safetensors file. The JSON file
is written last, so a release counts as stored only when both files are complete. Nothing here is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = ["RELEASES_DIR", "Release", "ReleaseStore", "weights_sha256"]

logger = logging.getLogger(__name__)

RELEASES_DIR = "releases"
RELEASE_FORMAT = 1

# A run name from the coordinator becomes a folder name only when it cannot leave the folder.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-256 hex of a state_dict: names, dtypes, shapes and bytes, in name order.

    The hash depends on the values alone, not on the order of the mapping or on the
    tensors' memory layout, so the same global model received twice gives the same hash.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = f"{name}\0{tensor.dtype}\0{'x'.join(str(size) for size in tensor.shape)}\0"
        digest.update(header.encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Release:
    """One trained round's reply as the site sent it, with the global weights it came from.

    Attributes
    ----------
    run_name, server_round, task
        The round request that the update replied to.
    global_sha256
        `weights_sha256` of the global weights the site trained from.
    status, message, metrics, accountant, ledger_entry
        The reply's fields, as first sent.
    state_dict
        The released model weights.
    """

    run_name: str
    server_round: int
    task: str
    global_sha256: str
    status: str
    message: str
    metrics: dict[str, float]
    accountant: str
    ledger_entry: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def _folder_name(name: str) -> str:
    if _SAFE_NAME.fullmatch(name):
        return name
    return "run-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ReleaseStore:
    """The released updates of one task in a site's state folder.

    Parameters
    ----------
    state_dir
        The site's state folder.
    task
        Task name; each task has its own folder.
    """

    def __init__(self, state_dir: str | Path, task: str) -> None:
        self.folder = Path(state_dir) / RELEASES_DIR / _folder_name(task)
        self.task = task

    def paths(self, run_name: str, server_round: int) -> tuple[Path, Path]:
        """Return the JSON and safetensors paths of one (run, round) release."""
        stem = self.folder / _folder_name(run_name) / f"round-{server_round}"
        return stem.with_suffix(".json"), stem.with_suffix(".safetensors")

    def save(self, release: Release) -> Path:
        """Store a release, replacing an earlier one of the same (run, round); return its JSON path.

        Raises
        ------
        OSError
            When a file cannot be written; a release stored before stays in place.
        """
        json_path, weights_path = self.paths(release.run_name, release.server_round)
        json_path.parent.mkdir(parents=True, exist_ok=True)

        # Weights first, then the JSON that names their hash: a crash in between leaves the old
        # JSON, whose hash no longer matches, so `load` treats the release as absent.
        tensors = {
            name: tensor.detach().cpu().contiguous() for name, tensor in release.state_dict.items()
        }
        weights = save_safetensors(tensors)
        _write_atomic(weights_path, weights)

        content = {
            "format": RELEASE_FORMAT,
            "run_name": release.run_name,
            "server_round": release.server_round,
            "task": release.task,
            "global_sha256": release.global_sha256,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "keys": list(release.state_dict),
            "status": release.status,
            "message": release.message,
            "metrics": release.metrics,
            "accountant": release.accountant,
            "ledger_entry": release.ledger_entry,
            "stored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_atomic(json_path, json.dumps(content, indent=1, sort_keys=True).encode("utf-8"))
        return json_path

    def load(self, run_name: str, server_round: int) -> Release | None:
        """Return the stored release of (run, round), or None when there is none.

        A damaged or incomplete release is logged as a WARNING and treated as absent, so the
        site trains the round anew and accounts for it.
        """
        json_path, weights_path = self.paths(run_name, server_round)
        if not json_path.is_file():
            return None
        try:
            content = json.loads(json_path.read_text(encoding="utf-8"))
            weights = weights_path.read_bytes()
            release = self._parse(content, weights, run_name, server_round)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning(
                "Stored release %s cannot be used (%s); the round will be trained anew.",
                json_path,
                err,
            )
            return None
        return release

    def _parse(self, content: Any, weights: bytes, run_name: str, server_round: int) -> Release:
        if not isinstance(content, dict) or content.get("format") != RELEASE_FORMAT:
            msg = f"not a release file of format {RELEASE_FORMAT}"
            raise ValueError(msg)
        if (content["run_name"], content["server_round"], content["task"]) != (
            run_name,
            server_round,
            self.task,
        ):
            msg = "it belongs to another run, round or task"
            raise ValueError(msg)
        if hashlib.sha256(weights).hexdigest() != content["weights_sha256"]:
            msg = "the safetensors file does not match the SHA-256 in the JSON file"
            raise ValueError(msg)

        tensors = load_safetensors(weights)
        keys = [str(key) for key in content["keys"]]
        if sorted(keys) != sorted(tensors):
            msg = "the safetensors file holds other tensors than the JSON file lists"
            raise ValueError(msg)
        ledger_entry = content["ledger_entry"]
        return Release(
            run_name=run_name,
            server_round=server_round,
            task=self.task,
            global_sha256=str(content["global_sha256"]),
            status=str(content["status"]),
            message=str(content["message"]),
            metrics={str(key): float(value) for key, value in content["metrics"].items()},
            accountant=str(content["accountant"]),
            ledger_entry=dict(ledger_entry) if ledger_entry is not None else None,
            state_dict={key: tensors[key] for key in keys},
        )
