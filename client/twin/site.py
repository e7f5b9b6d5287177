"""The site side of a twin command: site config, data, verified checkpoints and calibration."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.dataset import SiteDataset, load_site_dataset
from client.fhir.dates import DateError
from client.site_config import SiteConfig, SiteConfigError, load_site_config
from client.twin.backtest import backtest
from client.twin.basis import ObservationRef, observation_refs
from client.twin.calibration import IntervalCalibration, calibrate_intervals, risk_calibration
from client.twin.checkpoint import GlobalModel, read_checkpoint
from client.twin.errors import InvalidCheckpointError, TwinError
from models.crs_risk import predict_risk
from models.examples import TaskExamples
from models.spec import FeatureSpec, SpecError, load_spec
from models.tasks import get_task, split_patients

__all__ = ["SiteCalibration", "SiteContext", "open_site", "site_calibration"]

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


@dataclass
class SiteContext:
    """A site's data and the verified global models of the tasks to predict."""

    config: SiteConfig
    spec: FeatureSpec
    dataset: SiteDataset
    models: dict[str, GlobalModel]
    networks: dict[str, nn.Module]
    examples: dict[str, TaskExamples]
    _refs: dict[str, list[ObservationRef]] | None = field(default=None, repr=False)

    def refs(self, patient_id: str) -> list[ObservationRef]:
        """Return the patient's panel Observations with an id (scanned once per site)."""
        if self._refs is None:
            self._refs = observation_refs(self.config.fhir, self.spec, self.config.timezone)
        return self._refs.get(patient_id, [])

    def known_patients(self) -> set[str]:
        """Return every patient id in the site's FHIR tables and single-cell samples."""
        ids = {str(p) for p in self.dataset.patients.index}
        ids |= {str(p) for p in self.dataset.timeline["patient_id"].unique()}
        ids |= {str(sample.patient_id) for sample in self.dataset.cells.values()}
        return ids


def open_site(site_config: Path, checkpoints: list[Path], *, progress: bool = False) -> SiteContext:
    """Read the site config, its data and each checkpoint, verifying weights and spec."""
    try:
        config = load_site_config(site_config)
        spec = load_spec(config.spec)
    except (SiteConfigError, SpecError) as err:
        raise TwinError(str(err)) from err

    models: dict[str, GlobalModel] = {}
    for folder in checkpoints:
        model = read_checkpoint(folder, spec)
        if model.task in models:
            msg = (
                f"{folder}: a second checkpoint of task {model.task} (the first is "
                f"{models[model.task].path}); pass one checkpoint per task."
            )
            raise InvalidCheckpointError(msg)
        models[model.task] = model
    networks = {task: model.build(spec) for task, model in models.items()}

    try:
        dataset = load_site_dataset(config, spec, progress=progress)
    except DateError as err:
        msg_0 = f"{config.path}: {err}"
        raise TwinError(msg_0) from err
    examples = {
        task: get_task(task).build_examples(
            spec, dataset.patients, dataset.timeline, dataset.events, dataset.cells
        )
        for task in models
        if task != "cell-state"
    }
    return SiteContext(config, spec, dataset, models, networks, examples)


@dataclass
class SiteCalibration:
    """Calibration of the site's twins on its held-out patients."""

    intervals: IntervalCalibration | None = None
    risk: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "intervals": None if self.intervals is None else self.intervals.to_json(),
            "risk": None
            if self.risk is None
            else {k: (v if v == v else None) for k, v in self.risk.items()},
        }


def _examples_sha256(examples: TaskExamples, indices: list[int]) -> str:
    digest = hashlib.sha256()
    for index in indices:
        digest.update(examples.patient_ids[index].encode())
        for tensor in examples.subset([index]).tensors:
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def site_calibration(context: SiteContext, horizon: int) -> SiteCalibration:
    """Calibrate intervals and risks on the site's held-out patients, cached in its state folder.

    The held-out patients are those `split_patients` holds out with the run's seed, the
    same patients that site evaluation used, so the global model never trained on them
    here. The cache key is the global model versions, the held-out patients' tensors and
    the horizon.
    """
    result = SiteCalibration()
    key_parts: dict[str, Any] = {"horizon": horizon}
    held_out: dict[str, list[int]] = {}
    for task, examples in context.examples.items():
        _, test = split_patients(examples.patient_ids, seed=context.models[task].seed)
        held_out[task] = test
        key_parts[task] = [context.models[task].version, _examples_sha256(examples, test)]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()

    cache = context.config.state_dir / "twins" / CALIBRATION_FILE
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached

    torch.set_num_threads(1)
    if "lab-forecast" in context.examples:
        records = backtest(
            context.networks["lab-forecast"],
            context.examples["lab-forecast"],
            held_out["lab-forecast"],
            horizon,
        )
        result.intervals = calibrate_intervals(records, horizon)
    if "crs-risk" in context.examples:
        test_examples = context.examples["crs-risk"].subset(held_out["crs-risk"])
        probability = predict_risk(context.networks["crs-risk"], test_examples)
        result.risk = risk_calibration(test_examples["label"].numpy(), probability)

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, **result.to_json()}, indent=2) + "\n")
    except OSError as err:
        logger.warning("Cannot write the calibration cache %s (%s)", cache, err)
    return result


def _read_cache(path: Path, key: str) -> SiteCalibration | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if content.get("key") != key:
        return None
    intervals = content.get("intervals")
    risk = content.get("risk")
    return SiteCalibration(
        intervals=None if intervals is None else IntervalCalibration.from_json(intervals),
        risk=None
        if risk is None
        else {k: float("nan") if v is None else float(v) for k, v in risk.items()},
    )
