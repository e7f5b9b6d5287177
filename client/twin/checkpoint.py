"""Read a global model checkpoint at the site: safetensors weights and a JSON manifest.

The coordinator writes `<round folder>/manifest.json` with the task, the feature spec's
SHA-256 and the weights file with its SHA-256. This module reads the same layout without
importing the coordinator's code, and checks the SHA-256 of the weights before loading them.
Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from client.twin.errors import CheckpointMismatchError, InvalidCheckpointError
from models.spec import FeatureSpec
from models.tasks import TASKS, get_task

__all__ = ["GlobalModel", "read_checkpoint"]

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class GlobalModel:
    """A verified global model of one task.

    Attributes
    ----------
    task
        Task name from the manifest, such as ``"lab-forecast"``.
    path
        The round folder.
    state_dict
        Weights and buffers, loaded from the verified safetensors file.
    manifest
        The parsed manifest.
    weights_sha256
        SHA-256 of the weights file, as checked.
    """

    task: str
    path: Path
    state_dict: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    weights_sha256: str

    @property
    def version(self) -> str:
        """Return `<run-name>/round-<n>/<first 12 hex digits of the weights SHA-256>`."""
        run_name = self.manifest.get("run-name", "run")
        return f"{run_name}/round-{self.manifest.get('round')}/{self.weights_sha256[:12]}"

    @property
    def seed(self) -> int:
        """Return the run's seed, which fixes the split into training and held-out patients."""
        config = self.manifest.get("run-config") or {}
        try:
            return int(config.get("seed", 0))
        except (TypeError, ValueError):
            return 0

    def build(self, spec: FeatureSpec) -> nn.Module:
        """Return the task's network with these weights, in eval mode."""
        model = get_task(self.task).build_model(spec)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:
            msg = (
                f"{self.path / MANIFEST_FILE}: the weights do not fit the {self.task} network of "
                f"feature spec {spec.source} ({str(err).splitlines()[0]}); use a checkpoint "
                "trained with this spec."
            )
            raise CheckpointMismatchError(msg) from err
        model.eval()
        return model


def read_checkpoint(folder: str | Path, spec: FeatureSpec) -> GlobalModel:
    """Read and verify one round folder written by the coordinator.

    Raises
    ------
    InvalidCheckpointError
        The manifest is missing or malformed, the weights file is missing, its SHA-256
        differs from the manifest's, or it is not a safetensors file.
    CheckpointMismatchError
        The manifest's feature-spec SHA-256 is not the site spec's.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        msg = f"{manifest_path}: not found; pass a round folder such as runs/<run>/round-3."
        raise InvalidCheckpointError(msg) from err
    except (OSError, json.JSONDecodeError) as err:
        msg = f"{manifest_path}: not readable JSON ({err})."
        raise InvalidCheckpointError(msg) from err
    if not isinstance(manifest, dict):
        msg = f"{manifest_path}: the manifest is not a JSON object."
        raise InvalidCheckpointError(msg)

    # Task and feature spec
    task = manifest.get("task")
    if task not in TASKS:
        msg = f"{manifest_path}: field 'task' is {task!r}; expected one of {', '.join(TASKS)}."
        raise InvalidCheckpointError(msg)
    spec_sha256 = manifest.get("feature-spec-sha256")
    if spec_sha256 != spec.sha256:
        msg = (
            f"{manifest_path}: field 'feature-spec-sha256' is {str(spec_sha256)[:12]}..., but the "
            f"site's feature spec {spec.source} has {spec.sha256[:12]}...; use a checkpoint of "
            "this consortium's spec or point the site config at the spec it was trained with."
        )
        raise CheckpointMismatchError(msg)

    # Weights, verified before they are parsed
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or "file" not in weights or "sha256" not in weights:
        msg = f"{manifest_path}: field 'weights' lacks 'file' or 'sha256'."
        raise InvalidCheckpointError(msg)
    weights_path = folder / Path(str(weights["file"])).name
    try:
        data = weights_path.read_bytes()
    except OSError as err:
        msg = f"{weights_path}: cannot be read ({err}); the checkpoint is incomplete."
        raise InvalidCheckpointError(msg) from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != weights["sha256"]:
        msg = (
            f"{weights_path}: SHA-256 is {actual[:12]}..., but the manifest records "
            f"{str(weights['sha256'])[:12]}...; the file was changed or damaged. Copy the "
            "checkpoint again from the coordinator."
        )
        raise InvalidCheckpointError(msg)
    try:
        state_dict = load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types
        msg = f"{weights_path}: not a valid safetensors file ({err})."
        raise InvalidCheckpointError(msg) from err
    return GlobalModel(str(task), folder, state_dict, manifest, actual)
