"""Ids of the site's FHIR Observations behind a twin's outputs (RiskAssessment.basis, derivedFrom).

The site tables keep values, not resource ids, so the site's FHIR inputs are scanned once
more for Observations with an id, a Patient subject and a code of the lab panel.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from client.fhir.dates import DateError, parse_fhir_time, site_timezone
from client.fhir.extract import patient_id_of
from client.fhir.stream import discover_sources, iter_resources
from client.report import SourceReport
from models.spec import FeatureSpec

__all__ = ["ObservationRef", "observation_refs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObservationRef:
    """One panel Observation at the site: its id, panel code and effective time (UTC)."""

    resource_id: str
    code: str
    time: datetime


def _codes(data: dict[str, object], spec: FeatureSpec) -> set[str]:
    concepts = [data.get("code")]
    concepts += [c.get("code") for c in data.get("component") or [] if isinstance(c, dict)]  # type: ignore[attr-defined]
    keys = set()
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding") or []:
            key = spec.match_coding(coding.get("system"), coding.get("code"))
            if key is not None:
                keys.add(key)
    return keys


def observation_refs(
    fhir: tuple[Path, ...], spec: FeatureSpec, timezone: str, patients: set[str] | None = None
) -> dict[str, list[ObservationRef]]:
    """Return patient id -> its panel Observations with an id, for all or the given patients."""
    zone = site_timezone(timezone)
    found: dict[str, list[ObservationRef]] = defaultdict(list)
    sources, _ = discover_sources(fhir)
    for source in sources:
        if source.resource_type not in (None, "Observation"):
            continue
        report = SourceReport(str(source.path), source.kind)
        for raw in iter_resources(source, report):
            data = raw.data
            if data.get("resourceType") != "Observation" or not data.get("id"):
                continue
            subject = data.get("subject")
            reference = subject.get("reference") if isinstance(subject, dict) else None
            patient_id = patient_id_of(str(reference)) if reference else None
            if patient_id is None or (patients is not None and patient_id not in patients):
                continue
            text = data.get("effectiveDateTime") or (data.get("effectivePeriod") or {}).get("start")
            if not isinstance(text, str):
                continue
            try:
                time, _ = parse_fhir_time(text, zone)
            except DateError:
                continue
            for key in _codes(data, spec):
                found[patient_id].append(ObservationRef(str(data["id"]), key, time))
    logger.info("Found panel Observation ids of %d patients", len(found))
    return dict(found)
