"""Twin state on disk at the site, per patient and task.

Layout under the site's state folder::

    twins/<patient key>/twin.json                     one entry per task
    twins/<patient key>/<task>.safetensors            the fine-tuned offset, when one is used
    twins/<patient key>/retired/<time>-<task>.json    twins of an earlier global model

The patient key is the id with characters outside [A-Za-z0-9._-] replaced, plus the first 8
hex digits of the id's SHA-256, so two ids never share a folder. Files are written to a
temporary name and moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save

__all__ = [
    "TaskState",
    "load_twin",
    "patient_folder",
    "read_offset",
    "retire_task",
    "save_task",
]

STATE_FILE = "twin.json"
TaskState = dict[str, Any]


def patient_folder(state_dir: Path, patient_id: str) -> Path:
    """Return the twin folder of a patient under the site's state folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id)[:64]
    digest = hashlib.sha256(patient_id.encode()).hexdigest()[:8]
    return state_dir / "twins" / f"{safe}-{digest}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_twin(state_dir: Path, patient_id: str) -> dict[str, TaskState]:
    """Return task -> saved state of the patient's twin; empty when there is none."""
    path = patient_folder(state_dir, patient_id) / STATE_FILE
    if not path.is_file():
        return {}
    content = json.loads(path.read_text(encoding="utf-8"))
    tasks: dict[str, TaskState] = content.get("tasks", {})
    return tasks


def read_offset(state_dir: Path, patient_id: str, task: str) -> npt.NDArray[np.float32] | None:
    """Return the saved fine-tuned offset of a task, or None."""
    path = patient_folder(state_dir, patient_id) / f"{task}.safetensors"
    if not path.is_file():
        return None
    return np.asarray(load_file(str(path))["offset"], dtype=np.float32)


def save_task(
    state_dir: Path,
    patient_id: str,
    task: str,
    entry: TaskState,
    offset: npt.NDArray[np.float32] | None,
) -> None:
    """Store one task's twin state (and its offset) of the patient."""
    folder = patient_folder(state_dir, patient_id)
    offset_path = folder / f"{task}.safetensors"
    if offset is not None:
        _write_atomic(offset_path, save({"offset": np.asarray(offset, dtype=np.float32)}))
    else:
        offset_path.unlink(missing_ok=True)
    tasks = load_twin(state_dir, patient_id)
    tasks[task] = {**entry, "updated-utc": datetime.now(UTC).isoformat(timespec="seconds")}
    content = {"patient-id": patient_id, "tasks": tasks}
    _write_atomic(folder / STATE_FILE, (json.dumps(content, indent=2) + "\n").encode())


def retire_task(state_dir: Path, patient_id: str, task: str, reason: str) -> Path | None:
    """Move a task's twin to `retired/`, recording why; return the retired entry's file."""
    folder = patient_folder(state_dir, patient_id)
    tasks = load_twin(state_dir, patient_id)
    if task not in tasks:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    retired = folder / "retired" / f"{stamp}-{task}.json"
    entry = {**tasks.pop(task), "retired-utc": stamp, "retired-because": reason}
    _write_atomic(retired, (json.dumps(entry, indent=2) + "\n").encode())
    offset_path = folder / f"{task}.safetensors"
    if offset_path.is_file():
        os.replace(offset_path, retired.with_suffix(".safetensors"))
    content = {"patient-id": patient_id, "tasks": tasks}
    _write_atomic(folder / STATE_FILE, (json.dumps(content, indent=2) + "\n").encode())
    return retired
