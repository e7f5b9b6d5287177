"""Split one dataset into N site folders to simulate a consortium.

Patients are the unit of the split: every resource follows its patient, and every single-cell
sample follows the patient it was taken from. Two modes assign patients to sites:

- ``by="patient"``: a seeded random permutation of the patients, cut into N parts whose sizes
  differ by at most one (an IID split).
- ``by=ATTRIBUTE``: patients are grouped by one value per patient and whole groups go to sites
  (a non-IID split). ``ATTRIBUTE`` is a top-level scalar field of the Patient resource
  (``gender``, ``birthDate``, ``deceasedBoolean``, ...) or ``usedCode``, the product coded on
  the patient's first Procedure that has one (the CAR T product of an infusion).
  With at least N groups, the largest groups are placed first, each on the site with the
  fewest patients so far. With fewer groups than sites, each group gets one site or more,
  extra sites going to the group with the most patients per site, and its patients are split
  at random over its sites. Patients without the value form the group ``unknown``.

FHIR input is read as NDJSON (one resource per line, streamed) and as JSON files holding one
resource or a Bundle. Each site receives ``fhir/<ResourceType>.ndjson``; NDJSON lines are copied
byte for byte, Bundle entries are written with their ``urn:uuid:`` references rewritten to
``<ResourceType>/<id>`` so that they resolve outside the Bundle. Resources without a Patient
reference in ``subject`` or ``patient`` (Organization, Practitioner, ...) are dropped and counted.
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np
import orjson
import tomli_w

__all__ = [
    "PATIENT_MODE",
    "PRODUCT_ATTRIBUTE",
    "PartitionError",
    "PartitionSummary",
    "SiteSummary",
    "assign_patients",
    "format_summary",
    "partition_dataset",
    "write_site_toml",
]

logger = logging.getLogger(__name__)

PATIENT_MODE = "patient"
PRODUCT_ATTRIBUTE = "usedCode"
UNKNOWN_GROUP = "unknown"

_FHIR_SUFFIXES = (".ndjson", ".json")
_MAX_LOGGED_PROBLEMS = 5


class PartitionError(ValueError):
    """Raised when the inputs or options of a partition are invalid."""


@dataclass
class SiteSummary:
    """Counts and patient ids of one site folder."""

    name: str
    patients: int = 0
    resources: int = 0
    samples: int = 0
    cells: int = 0
    patient_ids: list[str] = field(default_factory=list)


@dataclass
class PartitionSummary:
    """The result of a partition, as written to ``partition.json``.

    Attributes
    ----------
    by, seed
        The assignment mode (``patient`` or an attribute name) and the random seed.
    sites
        One summary per site, in site order.
    groups
        Attribute value -> names of the sites holding its patients; empty for ``by="patient"``.
    dropped
        ``"<ResourceType or file>: <reason>"`` -> number of items not written to any site.
    """

    out: str
    by: str
    seed: int
    sites: list[SiteSummary]
    groups: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------
# Reading FHIR resources
# ---------------------------------------------------------------------------


def _fhir_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _FHIR_SUFFIXES)
            if not found:
                msg = (
                    f"FHIR folder {path} holds no .ndjson or .json files; "
                    "pass an NDJSON export or a folder of Bundles."
                )
                raise PartitionError(msg)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            msg = (
                f"FHIR input {path} not found; pass an existing NDJSON file, Bundle file or folder."
            )
            raise PartitionError(msg)
    return files


def _rewrite_references(node: Any, targets: dict[str, str]) -> Any:
    """Return a copy of a resource with Bundle-local `urn:uuid:` references replaced."""
    if isinstance(node, dict):
        copy = {key: _rewrite_references(value, targets) for key, value in node.items()}
        reference = copy.get("reference")
        if isinstance(reference, str) and reference in targets:
            copy["reference"] = targets[reference]
        return copy
    if isinstance(node, list):
        return [_rewrite_references(item, targets) for item in node]
    return node


def _bundle_resources(content: dict[str, Any]) -> Iterator[dict[str, Any]]:
    entries = [e for e in content.get("entry", []) if isinstance(e, dict)]
    targets: dict[str, str] = {}
    for entry in entries:
        resource = entry.get("resource")
        full_url = entry.get("fullUrl")
        if isinstance(resource, dict) and isinstance(full_url, str) and "id" in resource:
            targets[full_url] = f"{resource.get('resourceType')}/{resource['id']}"
    for entry in entries:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            yield _rewrite_references(resource, targets)


class _Problems:
    """Dropped items counted per kind, logging the first few of each kind.

    Invalid input is logged as a warning. Resources dropped by design (no Patient reference)
    are logged at debug level only, because the summary reports their count.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, detail: str, *, invalid: bool = True) -> None:
        self.counts[kind] += 1
        level = logging.WARNING if invalid else logging.DEBUG
        if self.counts[kind] <= _MAX_LOGGED_PROBLEMS:
            logger.log(level, "Dropped %s (%s).", detail, kind)
        elif self.counts[kind] == _MAX_LOGGED_PROBLEMS + 1:
            logger.log(level, "Dropped more items of kind %r; the summary has the total.", kind)


def _iter_resources(
    files: list[Path], problems: _Problems | None
) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """Yield (resource, original NDJSON line or None) for every resource in the files.

    Invalid lines are counted in `problems` (when given) and skipped.
    """
    for file in files:
        if file.suffix == ".ndjson":
            with file.open("rb") as handle:
                for number, line in enumerate(handle, start=1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        resource = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        if problems is not None:
                            problems.add(f"{file.name}: invalid JSON", f"{file} line {number}")
                        continue
                    if not isinstance(resource, dict) or "resourceType" not in resource:
                        if problems is not None:
                            problems.add(f"{file.name}: no resourceType", f"{file} line {number}")
                        continue
                    yield resource, line
            continue

        try:
            content = orjson.loads(file.read_bytes())
        except orjson.JSONDecodeError:
            if problems is not None:
                problems.add(f"{file.name}: invalid JSON", str(file))
            continue
        if not isinstance(content, dict) or "resourceType" not in content:
            if problems is not None:
                problems.add(f"{file.name}: no resourceType", str(file))
            continue
        if content["resourceType"] == "Bundle":
            for resource in _bundle_resources(content):
                yield resource, None
        else:
            yield content, None


def _patient_reference(resource: dict[str, Any]) -> tuple[str | None, str]:
    """Return (patient id, "") or (None, reason) for one resource."""
    if resource.get("resourceType") == "Patient":
        patient_id = resource.get("id")
        return (str(patient_id), "") if patient_id else (None, "Patient without id")

    for key in ("subject", "patient"):
        value = resource.get(key)
        if not isinstance(value, dict):
            continue
        reference = value.get("reference")
        if not isinstance(reference, str):
            continue
        parts = reference.split("/")
        for index in range(len(parts) - 2, -1, -1):
            if parts[index] == "Patient" and parts[index + 1]:
                return parts[index + 1], ""
        return None, f"{key} is not a Patient reference"
    return None, "no subject or patient reference"


# ---------------------------------------------------------------------------
# Patient attributes and the assignment to sites
# ---------------------------------------------------------------------------


def _procedure_product(resource: dict[str, Any]) -> str | None:
    for concept in resource.get("usedCode", []) or []:
        for coding in concept.get("coding", []) or []:
            if coding.get("code"):
                return str(coding["code"])
        if concept.get("text"):
            return str(concept["text"])
    return None


def _patient_value(resource: dict[str, Any], attribute: str, source: str) -> str | None:
    value = resource.get(attribute)
    if value is None:
        return None
    if isinstance(value, dict | list):
        msg = (
            f"{source}: Patient field {attribute!r} is not a single value; "
            f"use --by with gender, birthDate or another scalar field, or {PRODUCT_ATTRIBUTE}."
        )
        raise PartitionError(msg)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _site_names(num_sites: int) -> list[str]:
    return [f"site-{index + 1}" for index in range(num_sites)]


def assign_patients(
    patients: dict[str, str | None], num_sites: int, *, grouped: bool, seed: int
) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Assign each patient to a site index.

    Parameters
    ----------
    patients
        Patient id -> group value (None when the patient lacks it). Values are ignored
        unless `grouped` is True.
    num_sites
        Number of sites N; must not exceed the number of patients.
    grouped
        False for a balanced random split, True to keep each group's patients together.
    seed
        Seed of the random permutation and of the order of equally sized groups.

    Returns
    -------
    tuple[dict[str, int], dict[str, list[int]]]
        Patient id -> site index (0-based), and group value -> site indices (empty when
        not grouped).
    """
    if num_sites < 1:
        msg = f"--sites must be at least 1, got {num_sites}."
        raise PartitionError(msg)
    if num_sites > len(patients):
        msg = (
            f"Cannot split {len(patients)} patient(s) into {num_sites} sites: "
            "every site needs at least one patient; lower --sites."
        )
        raise PartitionError(msg)

    rng = np.random.default_rng(seed)
    ordered = sorted(patients)
    if not grouped:
        permuted = [ordered[i] for i in rng.permutation(len(ordered))]
        parts = np.array_split(np.arange(len(permuted)), num_sites)
        assignment = {permuted[i]: site for site, part in enumerate(parts) for i in part}
        return assignment, {}

    groups: dict[str, list[str]] = defaultdict(list)
    for patient in ordered:
        value = patients[patient]
        groups[UNKNOWN_GROUP if value is None else value].append(patient)
    names = sorted(groups)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    by_size = sorted(shuffled, key=lambda name: -len(groups[name]))

    group_sites: dict[str, list[int]] = {}
    if len(by_size) >= num_sites:
        load = [0] * num_sites
        for name in by_size:
            site = min(range(num_sites), key=lambda s: (load[s], s))
            group_sites[name] = [site]
            load[site] += len(groups[name])
    else:
        counts = {name: 1 for name in by_size}
        for _ in range(num_sites - len(by_size)):
            open_groups = [n for n in by_size if counts[n] < len(groups[n])]
            chosen = max(open_groups, key=lambda n: len(groups[n]) / counts[n])
            counts[chosen] += 1
        next_site = 0
        for name in by_size:
            group_sites[name] = list(range(next_site, next_site + counts[name]))
            next_site += counts[name]

    assignment = {}
    for name, sites in group_sites.items():
        members = groups[name]
        permuted = [members[i] for i in rng.permutation(len(members))]
        parts = np.array_split(np.arange(len(permuted)), len(sites))
        for site, part in zip(sites, parts, strict=True):
            for i in part:
                assignment[permuted[i]] = site
    return assignment, group_sites


# ---------------------------------------------------------------------------
# Single-cell inputs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _SampleFile:
    """A 10x `.h5` file holding one sample of one patient."""

    path: Path
    sample: str
    patient: str
    cells: int


def _read_sample_sheet(path: Path, sample_column: str, patient_column: str) -> dict[str, str]:
    if not path.is_file():
        msg = f"Sample sheet {path} not found; pass the TSV that maps samples to patients."
        raise PartitionError(msg)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = reader.fieldnames or []
        for column in (sample_column, patient_column):
            if column not in columns:
                msg = (
                    f"{path}: column {column!r} not found (columns: {', '.join(columns)}); "
                    "pass the tab-separated sheet or set the column option."
                )
                raise PartitionError(msg)
        return {
            row[sample_column]: row[patient_column]
            for row in reader
            if row.get(sample_column) and row.get(patient_column)
        }


def _count_10x_cells(path: Path) -> int:
    try:
        with h5py.File(path, "r") as handle:
            group = handle["matrix"] if "matrix" in handle else next(iter(handle.values()), None)
            if not isinstance(group, h5py.Group) or "shape" not in group:
                msg = f"{path}: no 10x matrix group with a 'shape' dataset; pass a Cell Ranger .h5."
                raise PartitionError(msg)
            return int(group["shape"][1])
    except OSError as err:
        msg = f"{path}: not a readable HDF5 file ({err})."
        raise PartitionError(msg) from err


def _split_cell_paths(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    h5_files: list[Path] = []
    h5ad_files: list[Path] = []
    for path in paths:
        if path.is_dir():
            h5_files.extend(sorted(path.rglob("*.h5")))
            h5ad_files.extend(sorted(path.rglob("*.h5ad")))
        elif path.suffix == ".h5" and path.is_file():
            h5_files.append(path)
        elif path.suffix == ".h5ad" and path.is_file():
            h5ad_files.append(path)
        elif not path.exists():
            msg = (
                f"Single-cell input {path} not found; pass .h5 or .h5ad files or a folder of them."
            )
            raise PartitionError(msg)
        else:
            msg = f"Single-cell input {path} is neither a 10x .h5 nor an .h5ad file."
            raise PartitionError(msg)
    if paths and not h5_files and not h5ad_files:
        msg = f"No .h5 or .h5ad files found under {', '.join(map(str, paths))}."
        raise PartitionError(msg)
    return h5_files, h5ad_files


def _sample_files(
    h5_files: list[Path], sheet: dict[str, str] | None, problems: _Problems
) -> list[_SampleFile]:
    if h5_files and sheet is None:
        msg = (
            "10x .h5 inputs need --sample-sheet: a TSV mapping each sample (the .h5 file's "
            "folder name) to its patient."
        )
        raise PartitionError(msg)
    samples = []
    for path in h5_files:
        sample = path.resolve().parent.name
        patient = (sheet or {}).get(sample)
        if patient is None:
            problems.add(".h5: sample not in the sample sheet", f"{path} (sample {sample})")
            continue
        samples.append(_SampleFile(path.resolve(), sample, patient, _count_10x_cells(path)))
    return samples


# ---------------------------------------------------------------------------
# Writing site folders
# ---------------------------------------------------------------------------


def write_site_toml(
    folder: Path,
    *,
    name: str,
    fhir: list[str],
    cells: list[str],
    spec: str = "",
    cells_table: dict[str, str] | None = None,
    epsilon_cap: float = 10.0,
    min_cohort: int = 3,
) -> Path:
    """Write `<folder>/site.toml` in the format that `client.site_config` reads.

    Paths are written as given: relative paths resolve against the site folder.
    """
    site: dict[str, Any] = {"name": name, "fhir": fhir, "cells": cells}
    if spec:
        site["spec"] = spec
    site["state-dir"] = "state"
    site["timezone"] = "UTC"
    content: dict[str, Any] = {"site": site}
    if cells_table:
        content["cells"] = cells_table
    content["privacy"] = {"epsilon-cap": float(epsilon_cap), "min-cohort": int(min_cohort)}

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "site.toml"
    target.write_text(tomli_w.dumps(content), encoding="utf-8")
    return target


class _NdjsonWriters:
    """Open `<site>/fhir/<ResourceType>.ndjson` files on first use."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.handles: dict[tuple[int, str], IO[bytes]] = {}

    def write(self, site: int, resource_type: str, line: bytes) -> None:
        key = (site, resource_type)
        if key not in self.handles:
            folder = self.folders[site] / "fhir"
            folder.mkdir(parents=True, exist_ok=True)
            self.handles[key] = (folder / f"{resource_type}.ndjson").open("wb")
        self.handles[key].write(line + b"\n")

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def _prepare_out(out: Path, num_sites: int, overwrite: bool) -> list[Path]:
    folders = [out / name for name in _site_names(num_sites)]
    existing = sorted(p for p in out.glob("site-*") if (p / "site.toml").is_file())
    if (existing or (out / "partition.json").exists()) and not overwrite:
        msg = (
            f"{out} already holds a partition; pass --overwrite to replace it "
            "or choose another --out."
        )
        raise PartitionError(msg)
    for folder in existing:
        shutil.rmtree(folder)
    for folder in folders:
        if folder.exists():
            msg = f"{folder} exists and is not a site folder; remove it or choose another --out."
            raise PartitionError(msg)
        folder.mkdir(parents=True)
    return folders


def _split_h5ad(
    path: Path,
    relative: str,
    assignment: dict[str, int],
    folders: list[Path],
    patient_column: str,
    sample_column: str,
    sites: list[SiteSummary],
) -> list[str | None]:
    """Write one `.h5ad` per site with that site's cells; return the file name per site."""
    import anndata

    adata = anndata.read_h5ad(path)
    patients = adata.obs[patient_column].astype(str).to_numpy()
    site_of_cell = np.array([assignment[p] for p in patients])
    written: list[str | None] = []
    for index, folder in enumerate(folders):
        mask = site_of_cell == index
        if not mask.any():
            written.append(None)
            continue
        subset = adata[mask].copy()
        (folder / "cells").mkdir(exist_ok=True)
        subset.write_h5ad(folder / relative)
        sites[index].cells += int(subset.n_obs)
        if sample_column in subset.obs:
            sites[index].samples += int(subset.obs[sample_column].astype(str).nunique())
        else:
            sites[index].samples += int(np.unique(patients[mask]).size)
        written.append(relative)
    return written


def _h5ad_patients(path: Path, patient_column: str) -> list[str]:
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except OSError as err:
        msg = f"{path}: not a readable .h5ad file ({err})."
        raise PartitionError(msg) from err
    try:
        if patient_column not in adata.obs:
            msg = (
                f"{path}: obs has no column {patient_column!r}; an .h5ad with many patients needs "
                "one, or set --patient-column."
            )
            raise PartitionError(msg)
        return sorted(adata.obs[patient_column].astype(str).unique())
    finally:
        adata.file.close()


# ---------------------------------------------------------------------------
# The partition
# ---------------------------------------------------------------------------


def _collect_patients(
    files: list[Path], attribute: str | None, problems: _Problems
) -> dict[str, str | None]:
    """First pass over the FHIR input: every patient id and its group value."""
    values: dict[str, str | None] = {}
    for resource, _ in _iter_resources(files, problems):
        patient, _reason = _patient_reference(resource)
        if patient is None:
            continue
        values.setdefault(patient, None)
        if attribute is None:
            continue
        kind = resource["resourceType"]
        if attribute == PRODUCT_ATTRIBUTE and kind == "Procedure":
            product = _procedure_product(resource)
            if product is not None and values[patient] is None:
                values[patient] = product
        elif attribute != PRODUCT_ATTRIBUTE and kind == "Patient":
            values[patient] = _patient_value(resource, attribute, f"Patient/{patient}")
    return values


def _write_fhir(
    files: list[Path],
    assignment: dict[str, int],
    folders: list[Path],
    sites: list[SiteSummary],
    problems: _Problems,
) -> None:
    """Second pass over the FHIR input: write each resource to its patient's site."""
    writers = _NdjsonWriters(folders)
    try:
        for resource, line in _iter_resources(files, None):
            kind = str(resource["resourceType"])
            patient, reason = _patient_reference(resource)
            if patient is None:
                detail = f"{kind}/{resource.get('id', '?')}"
                problems.add(f"{kind}: {reason}", detail, invalid=False)
                continue
            site = assignment[patient]
            writers.write(site, kind, line if line is not None else orjson.dumps(resource))
            sites[site].resources += 1
    finally:
        writers.close()


def partition_dataset(
    *,
    fhir: list[Path],
    cells: list[Path],
    num_sites: int,
    out: Path,
    by: str = PATIENT_MODE,
    seed: int = 0,
    sample_sheet: Path | None = None,
    labels: Path | None = None,
    spec: Path | None = None,
    sheet_sample_column: str = "GEX_Sample",
    sheet_patient_column: str = "Patient",
    patient_column: str = "patient",
    sample_column: str = "sample",
    epsilon_cap: float = 10.0,
    min_cohort: int = 3,
    overwrite: bool = False,
) -> PartitionSummary:
    """Split FHIR and single-cell data into `num_sites` site folders under `out`.

    Parameters
    ----------
    fhir
        NDJSON files, Bundle/resource JSON files, or folders of them.
    cells
        10x `.h5` files with one sample each (sample id = parent folder name), `.h5ad` files
        with a `patient_column` in obs, or folders of them.
    num_sites
        Number of sites N.
    out
        Folder that receives `site-1` ... `site-N` and `partition.json`.
    by
        ``"patient"`` for a balanced random split, else the attribute that groups patients
        (see the module docstring).
    seed
        Random seed; the same inputs and seed give the same partition.
    sample_sheet, labels
        TSV files written into every site's `[cells]` table; the sample sheet also maps each
        `.h5` sample to its patient (columns `sheet_sample_column`, `sheet_patient_column`).
    spec
        Feature spec file referenced by every site, by absolute path.
    patient_column, sample_column
        obs columns of `.h5ad` inputs.
    epsilon_cap, min_cohort
        The `[privacy]` policy written for every site.
    overwrite
        Replace an earlier partition in `out` (its `site-*` folders and `partition.json`).

    Returns
    -------
    PartitionSummary
        What each site received; also written to `out/partition.json`.
    """
    if not fhir and not cells:
        msg = "Nothing to partition; pass --fhir and/or --cells."
        raise PartitionError(msg)
    if spec is not None and not spec.is_file():
        msg = f"Feature spec {spec} not found; pass an existing TOML file."
        raise PartitionError(msg)
    if labels is not None and not labels.is_file():
        msg = f"Labels file {labels} not found; pass the TSV of cell labels."
        raise PartitionError(msg)
    problems = _Problems()
    attribute = None if by == PATIENT_MODE else by

    # Collect patients from every input
    fhir_files = _fhir_files(fhir)
    patients = _collect_patients(fhir_files, attribute, problems)
    if attribute is not None and fhir_files and all(v is None for v in patients.values()):
        msg = (
            f"No patient has a value for --by {attribute}; use a Patient field such as gender, "
            f"or {PRODUCT_ATTRIBUTE} for the Procedure product."
        )
        raise PartitionError(msg)

    h5_files, h5ad_files = _split_cell_paths(cells)
    sheet = None
    if sample_sheet is not None:
        sheet = _read_sample_sheet(sample_sheet, sheet_sample_column, sheet_patient_column)
    samples = _sample_files(h5_files, sheet, problems)
    for sample in samples:
        patients.setdefault(sample.patient, None)
    for path in h5ad_files:
        for patient in _h5ad_patients(path, patient_column):
            patients.setdefault(patient, None)

    # Assign patients to sites
    assignment, group_indices = assign_patients(
        patients, num_sites, grouped=attribute is not None, seed=seed
    )
    names = _site_names(num_sites)
    sites = [SiteSummary(name=name) for name in names]
    for patient, index in sorted(assignment.items()):
        sites[index].patient_ids.append(patient)
    for site in sites:
        site.patients = len(site.patient_ids)

    # Write the data of each site
    folders = _prepare_out(out, num_sites, overwrite)
    if fhir_files:
        _write_fhir(fhir_files, assignment, folders, sites, problems)
    site_cells: list[list[str]] = [[] for _ in folders]
    for sample in samples:
        index = assignment[sample.patient]
        site_cells[index].append(str(sample.path))
        sites[index].samples += 1
        sites[index].cells += sample.cells
    for number, path in enumerate(h5ad_files, start=1):
        relative = f"cells/{number:02d}-{path.stem}.h5ad"
        written = _split_h5ad(
            path, relative, assignment, folders, patient_column, sample_column, sites
        )
        for index, site_file in enumerate(written):
            if site_file is not None:
                site_cells[index].append(site_file)

    cells_table: dict[str, str] = {}
    if sample_sheet is not None:
        cells_table["sample-sheet"] = str(sample_sheet.resolve())
        if sheet_sample_column != "GEX_Sample":
            cells_table["sample-sheet-sample"] = sheet_sample_column
        if sheet_patient_column != "Patient":
            cells_table["sample-sheet-patient"] = sheet_patient_column
    if labels is not None:
        cells_table["labels"] = str(labels.resolve())
    if patient_column != "patient":
        cells_table["patient-column"] = patient_column
    if sample_column != "sample":
        cells_table["sample-column"] = sample_column
    for index, folder in enumerate(folders):
        write_site_toml(
            folder,
            name=names[index],
            fhir=["fhir"] if fhir_files else [],
            cells=site_cells[index],
            spec=str(spec.resolve()) if spec is not None else "",
            cells_table=cells_table,
            epsilon_cap=epsilon_cap,
            min_cohort=min_cohort,
        )

    summary = PartitionSummary(
        out=str(out.resolve()),
        by=by,
        seed=seed,
        sites=sites,
        groups={
            value: [names[i] for i in indices] for value, indices in sorted(group_indices.items())
        },
        dropped=dict(sorted(problems.counts.items())),
    )
    (out / "partition.json").write_bytes(
        orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2)
    )
    logger.info("Wrote %d site folders under %s", num_sites, out)
    return summary


def format_summary(summary: PartitionSummary) -> str:
    """Return the per-site table and the dropped items as text."""
    header = f"{'site':<10} {'patients':>8} {'resources':>10} {'samples':>8} {'cells':>8}"
    lines = [header, "-" * len(header)]
    for site in summary.sites:
        lines.append(
            f"{site.name:<10} {site.patients:>8} {site.resources:>10} {site.samples:>8} "
            f"{site.cells:>8}"
        )
    total = (
        f"{'total':<10} {sum(s.patients for s in summary.sites):>8} "
        f"{sum(s.resources for s in summary.sites):>10} "
        f"{sum(s.samples for s in summary.sites):>8} {sum(s.cells for s in summary.sites):>8}"
    )
    lines.extend(["-" * len(header), total])
    for value, names in summary.groups.items():
        lines.append(f"group {value!r}: {', '.join(names)}")
    for kind, count in summary.dropped.items():
        lines.append(f"dropped {count} ({kind})")
    return "\n".join(lines)
