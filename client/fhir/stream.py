"""Stream FHIR resources from Bulk Data NDJSON files and Bundles, validated with R4B models."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any

import orjson
import pydantic

from client.fhir.dates import add_site_offset
from client.report import SourceReport

__all__ = [
    "USED_RESOURCE_TYPES",
    "FhirSource",
    "RawResource",
    "discover_sources",
    "iter_resources",
    "validate_resource",
]

logger = logging.getLogger(__name__)

# The resource types fedtwin extracts data from; other types are counted and not validated.
USED_RESOURCE_TYPES = (
    "Patient",
    "Observation",
    "Condition",
    "Procedure",
    "MedicationAdministration",
)

# `Observation.ndjson` as the Bulk Data spec names files, `Observation.000.ndjson` as
# Synthea writes them.
_NDJSON_NAME = re.compile(r"(?P<type>[A-Z][A-Za-z]+)(?:\.\d+)?\.ndjson")
_MAX_LISTED_LINES = 20


@dataclass(frozen=True)
class FhirSource:
    """One input file.

    Attributes
    ----------
    path
        The file.
    kind
        `fhir-ndjson` (one resource per line) or `fhir-bundle` (a JSON Bundle, or one
        JSON resource).
    resource_type
        The type that the NDJSON file name promises (`Observation` for
        `Observation.000.ndjson`), or None when the name gives no type.
    """

    path: Path
    kind: str
    resource_type: str | None = None


@dataclass(frozen=True)
class RawResource:
    """A parsed, not yet validated resource and where it came from (`line 12`, `entry 3`)."""

    data: dict[str, Any]
    location: str


def discover_sources(paths: Iterable[Path]) -> tuple[list[FhirSource], list[tuple[Path, str]]]:
    """Find the FHIR input files under the given files and folders.

    A folder contributes its `*.ndjson` files named after a resource type and its `*.json`
    files (Bundles). Other files in it, such as a Bulk Data export's `log.ndjson`, are
    ignored. A file given by name is always read.

    Returns
    -------
    tuple
        The sources, with Patient files first so that later files can be checked against
        known patients, and a list of (path, one-line error) for unusable inputs.
    """
    sources: list[FhirSource] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            found = _folder_sources(path)
            if not found:
                problems.append(
                    (path, f"{path}: no FHIR files (*.ndjson or Bundle *.json) in this folder.")
                )
            sources.extend(found)
        elif path.is_file():
            sources.append(_file_source(path))
        else:
            problems.append((path, f"{path}: not found; pass an existing file or folder."))
    sources.sort(key=lambda s: (s.resource_type != "Patient", str(s.path)))
    return sources, problems


def _file_source(path: Path) -> FhirSource:
    if path.name.endswith(".ndjson"):
        match = _NDJSON_NAME.fullmatch(path.name)
        return FhirSource(path, "fhir-ndjson", match["type"] if match else None)
    return FhirSource(path, "fhir-bundle")


def _folder_sources(folder: Path) -> list[FhirSource]:
    found: list[FhirSource] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.name.endswith(".ndjson"):
            match = _NDJSON_NAME.fullmatch(path.name)
            if match is None:
                logger.info("Ignoring %s: its name does not start with a FHIR resource type", path)
                continue
            found.append(FhirSource(path, "fhir-ndjson", match["type"]))
        elif path.suffix == ".json":
            found.append(FhirSource(path, "fhir-bundle"))
    return found


def iter_resources(
    source: FhirSource,
    report: SourceReport,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[RawResource]:
    """Yield the resources of one source; count unreadable lines and mark unusable files.

    NDJSON files are read line by line, so only one resource is in memory at a time. A Bundle is
    one JSON document and is parsed whole. `on_bytes` receives the size of each line read
    (for progress bars).
    """
    if source.path.stat().st_size == 0:
        report.fail(f"{source.path}: empty file; export the resources again or remove it.")
        return
    if source.kind == "fhir-ndjson":
        yield from _iter_ndjson(source, report, on_bytes)
    else:
        yield from _iter_bundle(source, report, on_bytes)


def _iter_ndjson(
    source: FhirSource, report: SourceReport, on_bytes: Callable[[int], None] | None
) -> Iterator[RawResource]:
    lines_read = 0
    with source.path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if on_bytes is not None:
                on_bytes(len(line))
            if not line.strip():
                continue
            lines_read += 1
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError:
                _count_invalid_json(report, number)
                continue
            if not isinstance(data, dict):
                _count_invalid_json(report, number)
                continue
            yield RawResource(data, f"line {number}")
    if lines_read == 0:
        report.fail(f"{source.path}: no resources (only blank lines); export them again.")


def _count_invalid_json(report: SourceReport, number: int) -> None:
    report.skip("invalid-json")
    lines: list[int] = report.details.setdefault("invalid-json-lines", [])
    if len(lines) < _MAX_LISTED_LINES:
        lines.append(number)


def _iter_bundle(
    source: FhirSource, report: SourceReport, on_bytes: Callable[[int], None] | None
) -> Iterator[RawResource]:
    raw = source.path.read_bytes()
    if on_bytes is not None:
        on_bytes(len(raw))
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        report.fail(f"{source.path}: invalid JSON ({err}); the file is truncated or not JSON.")
        return
    if not isinstance(document, dict) or "resourceType" not in document:
        report.fail(f"{source.path}: not a FHIR resource (no resourceType); pass a Bundle.")
        return
    if document["resourceType"] != "Bundle":
        yield RawResource(document, "file")
        return

    entries = document.get("entry") or []
    full_urls = _full_url_targets(entries)
    for number, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            report.skip("Bundle.entry.resource: missing")
            continue
        _resolve_bundle_references(resource, full_urls)
        yield RawResource(resource, f"entry {number}")


def _full_url_targets(entries: list[Any]) -> dict[str, str]:
    """Map each entry's fullUrl (such as `urn:uuid:...`) to `Type/id`."""
    targets: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        full_url = entry.get("fullUrl")
        if isinstance(resource, dict) and isinstance(full_url, str) and "id" in resource:
            targets[full_url] = f"{resource.get('resourceType')}/{resource['id']}"
    return targets


def _resolve_bundle_references(resource: dict[str, Any], full_urls: dict[str, str]) -> None:
    """Rewrite `subject` and `patient` references to other bundle entries as `Type/id`."""
    for key in ("subject", "patient"):
        reference = resource.get(key)
        if isinstance(reference, dict):
            target = full_urls.get(str(reference.get("reference")))
            if target is not None:
                reference["reference"] = target


def _model(resource_type: str) -> type[Any]:
    from fhir.resources.R4B import get_fhir_model_class

    model: type[Any] = get_fhir_model_class(resource_type)
    return model


def validate_resource(data: dict[str, Any], zone: tzinfo) -> tuple[str | None, bool]:
    """Validate a resource with its `fhir.resources.R4B` model.

    A date-time without a UTC offset (invalid FHIR) is given the site time zone's offset
    in place and the resource is validated again.

    Returns
    -------
    tuple
        None when valid, else the skip reason naming the element path (for example
        `Observation.valueQuantity.value: Decimal value string does not match spec
        regex.`), and whether an offset was added.
    """
    resource_type = str(data["resourceType"])
    model = _model(resource_type)
    repaired = False
    for _ in range(2):
        try:
            model.model_validate(data)
        except pydantic.ValidationError as err:
            errors = err.errors()
            if not repaired and _add_missing_offsets(data, errors, zone):
                repaired = True
                continue
            return _reason(resource_type, errors[0]), repaired
        return None, repaired
    return None, repaired


def _add_missing_offsets(data: dict[str, Any], errors: list[Any], zone: tzinfo) -> bool:
    fixed = False
    for error in errors:
        loc = error.get("loc", ())
        parent: Any = data
        for step in loc[:-1]:
            try:
                parent = parent[step]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        if not loc or not isinstance(parent, dict):
            continue
        value = parent.get(loc[-1])
        if isinstance(value, str):
            with_offset = add_site_offset(value, zone)
            if with_offset is not None:
                parent[loc[-1]] = with_offset
                fixed = True
    return fixed


def _reason(resource_type: str, error: Any) -> str:
    steps = [str(step) for step in error.get("loc", ()) if not isinstance(step, int)]
    path = ".".join([resource_type, *steps])
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{path}: {message}"
