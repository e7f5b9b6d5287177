"""Read a site's FHIR inputs into patient, timeline and event tables with a per-file report."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from client.fhir.dates import midpoint, site_timezone
from client.fhir.extract import EventRow, Extractor, TimelineRow
from client.fhir.stream import (
    USED_RESOURCE_TYPES,
    FhirSource,
    discover_sources,
    iter_resources,
    validate_resource,
)
from client.report import SourceReport
from models.spec import FeatureSpec

__all__ = [
    "EVENT_COLUMNS",
    "PATIENT_COLUMNS",
    "TIMELINE_COLUMNS",
    "FhirTables",
    "read_fhir",
]

logger = logging.getLogger(__name__)

PATIENT_COLUMNS = (
    "sex",
    "birth_date",
    "age_at_infusion",
    "infusion_time",
    "product",
    "crs_grade",
    "icans_grade",
)
TIMELINE_COLUMNS = (
    "patient_id",
    "time",
    "precision",
    "day",
    "code",
    "value",
    "unit",
    "censored",
    "out_of_range",
    "source",
)
EVENT_COLUMNS = ("patient_id", "time", "day", "kind", "code", "grade", "grading", "source")

_MAX_LISTED_IDS = 20
_DAY = pd.Timedelta(days=1)
_YEAR_DAYS = 365.25


@dataclass
class FhirTables:
    """The FHIR part of a site dataset (see `client.dataset.SiteDataset` for the columns)."""

    patients: pd.DataFrame
    timeline: pd.DataFrame
    events: pd.DataFrame
    sources: list[SourceReport]


def read_fhir(
    paths: Iterable[Path],
    spec: FeatureSpec,
    *,
    timezone: str = "UTC",
    progress: bool = False,
    validate: bool = True,
) -> FhirTables:
    """Read FHIR NDJSON files, Bulk Data folders and Bundles.

    Parameters
    ----------
    paths
        Files and folders; see `client.fhir.stream.discover_sources`.
    spec
        The feature spec whose lab panel maps Observation codes.
    timezone
        IANA name of the site time zone, used for dates and for date-times without offset.
    progress
        Show a progress bar per file on stderr.
    validate
        Validate each used resource with its R4B model. Only benchmarks turn this off.

    Returns
    -------
    FhirTables
        Tables and one report per input file; unusable inputs have `usable=False`.
    """
    zone = site_timezone(timezone)
    extractor = Extractor(spec, zone)
    sources, problems = discover_sources(paths)
    reports = [SourceReport(str(source.path), source.kind) for source in sources]
    seen: dict[tuple[str, str], bytes] = {}

    for index, (source, report) in enumerate(zip(sources, reports, strict=True)):
        accepted = 0
        with _progress_bar(source, progress) as on_bytes:
            for raw in iter_resources(source, report, on_bytes):
                report.counts["resources"] += 1
                data = _checked(raw.data, source, report, zone, validate)
                if data is None or _is_duplicate(data, seen, report):
                    continue
                accepted += 1
                extractor.add(data, index, report)
        _fail_if_nothing_usable(source, report, accepted)

    for path, error in problems:
        unusable = SourceReport(str(path), "fhir")
        unusable.fail(error)
        reports.append(unusable)

    return _tables(extractor, sources, reports)


def _checked(
    data: dict[str, Any],
    source: FhirSource,
    report: SourceReport,
    zone: Any,
    validate: bool,
) -> dict[str, Any] | None:
    """Return the resource when it is of a used type and valid; count it otherwise."""
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        report.skip("resourceType: missing")
        return None
    if source.resource_type is not None and resource_type != source.resource_type:
        report.skip(f"resourceType: {resource_type} in a {source.resource_type} file")
        return None
    if resource_type not in USED_RESOURCE_TYPES:
        unused = report.details.setdefault("not-used", {})
        unused[resource_type] = unused.get(resource_type, 0) + 1
        return None
    if validate:
        reason, repaired = validate_resource(data, zone)
        if repaired:
            report.counts["dates-without-offset"] += 1
        if reason is not None:
            report.skip(reason)
            return None
    return data


def _is_duplicate(
    data: dict[str, Any], seen: dict[tuple[str, str], bytes], report: SourceReport
) -> bool:
    """Keep the first resource of each (type, id); count later ones as equal or conflicting."""
    resource_id = data.get("id")
    if resource_id is None:
        return False
    key = (str(data["resourceType"]), str(resource_id))
    digest = hashlib.blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS), digest_size=16)
    content = digest.digest()
    first = seen.get(key)
    if first is None:
        seen[key] = content
        return False
    if first == content:
        report.skip("duplicate-equal")
        return True
    report.skip("duplicate-conflict")
    conflicts: list[str] = report.details.setdefault("duplicate-conflict", [])
    if len(conflicts) < _MAX_LISTED_IDS:
        conflicts.append(f"{key[0]}/{key[1]}")
    logger.warning(
        "%s: %s/%s appears again with other content; the first one is kept",
        report.path,
        key[0],
        key[1],
    )
    return True


def _fail_if_nothing_usable(source: FhirSource, report: SourceReport, accepted: int) -> None:
    if not report.usable:
        return
    if report.counts["resources"] == 0:
        report.fail(f"{source.path}: no FHIR resources (empty Bundle or only invalid lines).")
    elif accepted == 0 and sum(report.skips.values()) > 0:
        reason, count = report.skips.most_common(1)[0]
        report.fail(
            f"{source.path}: none of {report.counts['resources']} resources is usable; "
            f"most common problem ({count}x): {reason}."
        )


@contextmanager
def _progress_bar(source: FhirSource, enabled: bool) -> Iterator[Any]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    total = source.path.stat().st_size
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=source.path.name, file=sys.stderr, leave=False
    ) as bar:
        yield bar.update


def _tables(
    extractor: Extractor, sources: list[FhirSource], reports: list[SourceReport]
) -> FhirTables:
    known = set(extractor.patients)
    _count_missing_patients(extractor, reports, known)
    shifted = {
        p.patient_id
        for p in extractor.patients.values()
        if p.birth_time is not None and p.birth_time > extractor.now
    }
    timeline_rows = _kept(extractor.timeline, known, shifted, extractor, reports)
    event_rows = _kept(extractor.events, known, shifted, extractor, reports)
    if shifted:
        logger.info(
            "%d patients have a birthDate in the future (date-shifted, de-identified data); "
            "their future dates are kept",
            len(shifted),
        )

    events = _event_frame(event_rows, sources)
    patients = _patient_frame(extractor, events)
    infusion = patients["infusion_time"]
    events["day"] = (events["time"] - events["patient_id"].map(infusion)) / _DAY
    timeline = _timeline_frame(timeline_rows, sources)
    timeline["day"] = (timeline["time"] - timeline["patient_id"].map(infusion)) / _DAY
    _count_mapped(timeline_rows, reports, len(sources))
    for report in reports[: len(sources)]:
        report.counts["patients-date-shifted"] = sum(
            1
            for p in extractor.patients.values()
            if p.patient_id in shifted and reports[p.source] is report
        )
        if report.counts["patients-date-shifted"] == 0:
            del report.counts["patients-date-shifted"]
    return FhirTables(
        patients,
        timeline.loc[:, list(TIMELINE_COLUMNS)],
        events.loc[:, list(EVENT_COLUMNS)],
        reports,
    )


def _count_missing_patients(
    extractor: Extractor, reports: list[SourceReport], known: set[str]
) -> None:
    for (source, resource_type, patient_id), count in extractor.references.items():
        if patient_id in known:
            continue
        element = "patient" if resource_type == "MedicationAdministration" else "subject"
        report = reports[source]
        report.skip(f"{resource_type}.{element}: Patient not found in the site's data", count)
        missing: list[str] = report.details.setdefault("patients-not-found", [])
        if len(missing) < _MAX_LISTED_IDS and patient_id not in missing:
            missing.append(patient_id)


def _kept(
    rows: list[Any],
    known: set[str],
    shifted: set[str],
    extractor: Extractor,
    reports: list[SourceReport],
) -> list[Any]:
    """Drop rows of unknown patients and rows dated in the future, counting each resource once."""
    now = extractor.now
    kept = []
    future: dict[tuple[int, str], set[int]] = defaultdict(set)
    for row in rows:
        if row.patient_id not in known:
            continue
        if row.time is not None and row.time > now and row.patient_id not in shifted:
            future[(row.source, row.time_path)].add(row.seq)
            continue
        kept.append(row)
    for (source, time_path), resources in future.items():
        reports[source].skip(f"{time_path}: in the future", len(resources))
    return kept


def _count_mapped(rows: list[TimelineRow], reports: list[SourceReport], n_sources: int) -> None:
    resources: dict[int, set[int]] = defaultdict(set)
    per_code: dict[int, Counter[str]] = defaultdict(Counter)
    for row in rows:
        resources[row.source].add(row.seq)
        per_code[row.source][row.code] += 1
    for index in range(n_sources):
        if index in resources:
            reports[index].counts["observations-mapped"] = len(resources[index])
            reports[index].counts["values"] = sum(per_code[index].values())
            reports[index].details["observations-per-code"] = dict(sorted(per_code[index].items()))
        else:
            reports[index].details.pop("observations-per-code", None)


def _timeline_frame(rows: list[TimelineRow], sources: list[FhirSource]) -> pd.DataFrame:
    paths = [str(s.path) for s in sources]
    return pd.DataFrame(
        {
            "patient_id": pd.Series([r.patient_id for r in rows], dtype=object),
            "time": pd.to_datetime([r.time for r in rows], utc=True).as_unit("ns"),
            "precision": pd.Series([r.precision for r in rows], dtype=object),
            "code": pd.Series([r.code for r in rows], dtype=object),
            "value": pd.Series([r.value for r in rows], dtype="float64"),
            "unit": pd.Series([r.unit for r in rows], dtype=object),
            "censored": pd.Series([r.censored for r in rows], dtype=object),
            "out_of_range": pd.Series([r.out_of_range for r in rows], dtype=bool),
            "source": pd.Series([paths[r.source] for r in rows], dtype=object),
        }
    )


def _event_frame(rows: list[EventRow], sources: list[FhirSource]) -> pd.DataFrame:
    paths = [str(s.path) for s in sources]
    return pd.DataFrame(
        {
            "patient_id": pd.Series([r.patient_id for r in rows], dtype=object),
            "time": pd.to_datetime([r.time for r in rows], utc=True).as_unit("ns"),
            "kind": pd.Series([r.kind for r in rows], dtype=object),
            "code": pd.Series([r.code for r in rows], dtype=object),
            "grade": pd.Series([r.grade for r in rows], dtype="float64"),
            "grading": pd.Series([r.grading for r in rows], dtype=object),
            "product": pd.Series([r.product for r in rows], dtype=object),
            "source": pd.Series([paths[r.source] for r in rows], dtype=object),
        }
    )


def _patient_frame(extractor: Extractor, events: pd.DataFrame) -> pd.DataFrame:
    patients = list(extractor.patients.values())
    frame = pd.DataFrame(
        {
            "sex": pd.array([p.sex for p in patients], dtype=object),
            "birth_date": pd.array([p.birth_date for p in patients], dtype=object),
        },
        index=pd.Index([p.patient_id for p in patients], name="patient_id", dtype=object),
    )

    infusions = events[events["kind"] == "infusion"].sort_values("time", kind="stable")
    first = infusions.drop_duplicates("patient_id").set_index("patient_id")
    frame["infusion_time"] = first["time"].reindex(frame.index)
    frame["infusion_time"] = pd.to_datetime(frame["infusion_time"], utc=True).dt.as_unit("ns")
    frame["product"] = first["product"].reindex(frame.index).astype(object)
    frame["product"] = frame["product"].where(frame["product"].notna(), None)

    birth_mid = pd.to_datetime(
        [
            midpoint(p.birth_time, p.birth_precision) if p.birth_time is not None else None
            for p in patients
        ],
        utc=True,
    ).as_unit("ns")
    age_days = (frame["infusion_time"] - pd.Series(birth_mid, index=frame.index)) / _DAY
    frame["age_at_infusion"] = (age_days / _YEAR_DAYS).astype("float64")

    for kind in ("crs", "icans"):
        grades = events[events["kind"] == kind].groupby("patient_id")["grade"].max()
        frame[f"{kind}_grade"] = grades.reindex(frame.index).astype("float64")
    return frame.loc[:, list(PATIENT_COLUMNS)]
