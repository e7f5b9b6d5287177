"""The validated dataset of one site: patients, lab timeline, clinical events and single cells."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from client.fhir.dates import site_timezone
from client.fhir.load import EVENT_COLUMNS, PATIENT_COLUMNS, TIMELINE_COLUMNS, read_fhir
from client.fhir.stream import discover_sources
from client.report import SiteReport, SourceReport
from client.site_config import SiteConfig
from models.spec import FeatureSpec

__all__ = ["CACHE_FORMAT", "SiteDataset", "load_site_dataset", "site_totals"]

logger = logging.getLogger(__name__)

# Bump when the tables, their columns or the report change meaning, so old caches are ignored.
CACHE_FORMAT = 1
_TABLES = ("patients", "timeline", "events")


@dataclass
class SiteDataset:
    """Everything a site trains and predicts on.

    Attributes
    ----------
    site, spec_sha256
        Site name and the SHA-256 of the feature spec the data was mapped with.
    patients
        Index `patient_id` (str). Columns: `sex` (str or None), `birth_date` (str as given),
        `age_at_infusion` (float years, NaN), `infusion_time` (datetime64[ns, UTC], NaT),
        `product` (str or None), `crs_grade` (float: max ASTCT grade, or the only grading
        given; NaN without a CRS Condition), `icans_grade` (float, NaN).
    timeline
        One row per panel value. Columns: `patient_id`, `time` (datetime64[ns, UTC]),
        `precision` (`year`, `month`, `day`, `minute`, `second`), `day` (float days since
        infusion, NaN without infusion), `code` (panel key), `value` (float in the canonical
        unit, NaN when absent), `unit` (canonical UCUM), `censored` (`""`, `<`, `<=`, `>`,
        `>=`), `out_of_range` (bool) and `source` (file path).
    events
        `patient_id`, `time`, `day`, `kind` (`infusion`, `crs`, `icans`, `condition`),
        `code` (`system|code`), `grade` (float, NaN), `grading` (str), `source`.
    cells
        Sample id -> `client.cells.CellSample`; empty without single-cell input.
    report
        What each input file contributed and what was skipped.
    """

    site: str
    spec_sha256: str
    patients: pd.DataFrame
    timeline: pd.DataFrame
    events: pd.DataFrame
    cells: dict[str, Any] = field(default_factory=dict)
    report: SiteReport = field(default_factory=lambda: SiteReport("", ""))


def load_site_dataset(
    config: SiteConfig, spec: FeatureSpec, *, cache: bool = True, progress: bool = False
) -> SiteDataset:
    """Read and validate a site's FHIR and single-cell inputs.

    Parameters
    ----------
    config
        The site config: `fhir` and `cells` inputs, `timezone` and `state_dir`.
    spec
        The consortium feature spec; its lab panel maps codes and units.
    cache
        Reuse the FHIR tables from `state_dir/cache` when no input file changed. A change
        is detected from each file's path, size and modification time, not from its
        content (hashing gigabytes of NDJSON would cost as much as reading them).
    progress
        Show per-file progress bars on stderr when it is a terminal.

    Returns
    -------
    SiteDataset
        The tables and the report. Bad FHIR records and unusable files are counted in the
        report instead of raised. An unknown `timezone` raises `DateError` (a ValueError).
    """
    site_timezone(config.timezone)
    started = time.perf_counter()
    fhir = _cached_fhir(config, spec, progress) if cache else None
    if fhir is None:
        tables = read_fhir(config.fhir, spec, timezone=config.timezone, progress=progress)
        fhir = (tables.patients, tables.timeline, tables.events, tables.sources)
        if cache:
            _write_cache(config, spec, fhir)
    patients, timeline, events, sources = fhir
    logger.info("FHIR inputs of site %s read in %.2f s", config.name, time.perf_counter() - started)

    cells: dict[str, Any] = {}
    cell_reports: list[SourceReport] = []
    if config.cells:
        from client.cells import read_cell_samples

        cells, cell_reports = read_cell_samples(config, spec)

    report = SiteReport(config.name, spec.sha256, [*sources, *cell_reports])
    report.totals = site_totals(patients, timeline, report.sources, cells)
    return SiteDataset(config.name, spec.sha256, patients, timeline, events, cells, report)


def site_totals(
    patients: pd.DataFrame,
    timeline: pd.DataFrame,
    sources: list[SourceReport],
    cells: dict[str, Any],
) -> dict[str, Any]:
    """Return the site-wide totals of a report (keys documented in docs/data.md)."""
    counts: Counter[str] = Counter()
    for source in sources:
        counts.update(source.counts)
    patient_ids = set(patients.index)
    with_cells = {str(sample.patient_id) for sample in cells.values()}
    return {
        "patients": len(patient_ids | with_cells),
        "patients-fhir": len(patients),
        "patients-with-values": int(timeline["patient_id"].nunique()),
        "patients-with-infusion": int(patients["infusion_time"].notna().sum()),
        "resources": counts["resources"],
        "observations": counts["observations"],
        "observations-mapped": counts["observations-mapped"],
        "values": len(timeline),
        "skipped": sum(sum(source.skips.values()) for source in sources),
        "cells": sum(int(sample.counts.shape[0]) for sample in cells.values()),
        "samples": len(cells),
        "patients-with-cells": len(with_cells),
        "patients-with-both": len(with_cells & patient_ids),
    }


# Cache of the FHIR tables


def _cache_key(config: SiteConfig, spec: FeatureSpec) -> str:
    sources, problems = discover_sources(config.fhir)
    files = []
    for source in sources:
        stat = source.path.stat()
        files.append([str(source.path.resolve()), stat.st_size, stat.st_mtime_ns])
    content = {
        "format": CACHE_FORMAT,
        "spec": spec.sha256,
        "timezone": config.timezone,
        "files": files,
        "missing": [str(path) for path, _ in problems],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def _cache_dir(config: SiteConfig) -> Path:
    return config.state_dir / "cache"


def _cached_fhir(
    config: SiteConfig, spec: FeatureSpec, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[SourceReport]] | None:
    folder = _cache_dir(config) / f"fhir-{_cache_key(config, spec)}"
    if not (folder / "report.json").is_file():
        return None
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        frames = [_read_table(folder / f"{name}.json") for name in _TABLES]
    except (OSError, ValueError, KeyError) as err:
        logger.warning("Ignoring the damaged cache %s (%s); reading the inputs again", folder, err)
        return None
    patients, timeline, events = frames
    patients = _restore(patients, PATIENT_COLUMNS, object_columns=("sex", "birth_date", "product"))
    patients.index = patients.index.astype(object)
    patients.index.name = "patient_id"
    timeline = _restore(
        timeline,
        TIMELINE_COLUMNS,
        object_columns=("patient_id", "precision", "code", "unit", "censored", "source"),
    )
    events = _restore(
        events, EVENT_COLUMNS, object_columns=("patient_id", "kind", "code", "grading", "source")
    )
    sources = [_source_report(entry) for entry in report]
    logger.info("Using cached FHIR tables from %s", folder)
    return patients, timeline, events, sources


def _write_cache(
    config: SiteConfig,
    spec: FeatureSpec,
    fhir: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[SourceReport]],
) -> None:
    root = _cache_dir(config)
    folder = root / f"fhir-{_cache_key(config, spec)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fhir-", dir=root))
        for name, frame in zip(_TABLES, fhir[:3], strict=True):
            text = frame.to_json(orient="table", date_unit="ns")
            (staging / f"{name}.json").write_text(text, encoding="utf-8")
        report = [source.to_dict() for source in fhir[3]]
        (staging / "report.json").write_text(json.dumps(report), encoding="utf-8")
        for old in root.glob("fhir-*"):
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, folder)
    except OSError as err:
        logger.warning(
            "Cannot write the FHIR cache in %s (%s); the next run reads again", root, err
        )


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_json(io.StringIO(path.read_text(encoding="utf-8")), orient="table")


def _restore(
    frame: pd.DataFrame, columns: tuple[str, ...], object_columns: tuple[str, ...]
) -> pd.DataFrame:
    """Give columns that JSON turned into floats (all None) their object dtype back."""
    for column in object_columns:
        values = frame[column].astype(object)
        frame[column] = values.where(values.notna(), None)
    for column in columns:
        if column in ("time", "infusion_time"):
            frame[column] = pd.to_datetime(frame[column], utc=True).dt.as_unit("ns")
    return frame.loc[:, list(columns)]


def _source_report(entry: dict[str, Any]) -> SourceReport:
    report = SourceReport(str(entry["path"]), str(entry["kind"]))
    report.usable = bool(entry["usable"])
    report.error = str(entry["error"])
    report.counts = Counter(entry["counts"])
    report.skips = Counter(entry["skips"])
    report.details = dict(entry["details"])
    return report
