"""Consortium feature spec: lab panel, gene panel and task settings shared by all sites."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SPEC_NAME", "FeatureSpec", "LabCode", "SpecError", "load_spec"]

DEFAULT_SPEC_NAME = "default_spec.toml"


class SpecError(ValueError):
    """Raised when a feature spec file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LabCode:
    """One analyte of the lab panel."""

    key: str
    name: str
    unit: str
    low: float
    high: float
    loinc: tuple[str, ...] = ()
    local: tuple[str, ...] = ()
    molar_mass: float | None = None
    transform: str = "identity"


@dataclass(frozen=True)
class FeatureSpec:
    """A versioned consortium feature spec.

    Attributes
    ----------
    version, name
        Version string and title from the file.
    labs
        The lab panel, in model input order.
    genes
        Gene symbols of the gene panel, in model input order.
    gene_ids
        Ensembl gene id per symbol, where known.
    tasks
        Settings per task name (`lab-forecast`, `crs-risk`, `cell-state`).
    sha256
        Hex SHA-256 of the canonical JSON form of the parsed content; equal
        content gives an equal hash whatever the file's layout or comments.
    source
        The file the spec was read from.
    """

    version: str
    name: str
    labs: tuple[LabCode, ...]
    genes: tuple[str, ...]
    gene_ids: dict[str, str]
    tasks: dict[str, dict[str, Any]]
    sha256: str
    source: str = ""
    _by_coding: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def lab(self, key: str) -> LabCode:
        """Return the panel entry with this key."""
        for lab in self.labs:
            if lab.key == key:
                return lab
        msg = f"Lab code {key!r} is not in feature spec {self.source or self.name!r}."
        raise SpecError(msg)

    def match_coding(self, system: str | None, code: str | None) -> str | None:
        """Return the panel key that a FHIR coding maps to, or None.

        LOINC codings match on the code alone; other systems match on
        `"system|code"` as listed under `local`.
        """
        if code is None:
            return None
        if system == "http://loinc.org":
            return self._by_coding.get(f"loinc|{code}")
        return self._by_coding.get(f"{system}|{code}")

    def task(self, name: str) -> dict[str, Any]:
        """Return the settings of one task."""
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks))
            msg = f"Task {name!r} is not in feature spec {self.source!r}; known tasks: {known}."
            raise SpecError(msg)
        return self.tasks[name]


def _parse_lab(entry: dict[str, Any], source: str) -> LabCode:
    try:
        return LabCode(
            key=str(entry["key"]),
            name=str(entry.get("name", entry["key"])),
            unit=str(entry["unit"]),
            low=float(entry["low"]),
            high=float(entry["high"]),
            loinc=tuple(str(c) for c in entry.get("loinc", [])),
            local=tuple(str(c) for c in entry.get("local", [])),
            molar_mass=float(entry["molar-mass"]) if "molar-mass" in entry else None,
            transform=str(entry.get("transform", "identity")),
        )
    except KeyError as err:
        msg = f"{source}: lab entry {entry.get('key', '?')!r} lacks field {err.args[0]!r}."
        raise SpecError(msg) from err


def parse_spec(content: dict[str, Any], source: str) -> FeatureSpec:
    """Build a FeatureSpec from parsed TOML content."""
    for key in ("version", "labs", "genes", "tasks"):
        if key not in content:
            msg = f"{source}: feature spec lacks the top-level key {key!r}."
            raise SpecError(msg)

    labs = tuple(_parse_lab(entry, source) for entry in content["labs"])
    by_coding: dict[str, str] = {}
    for lab in labs:
        if lab.transform not in ("identity", "log1p"):
            msg = (
                f"{source}: lab {lab.key!r} has transform {lab.transform!r}; use identity or log1p."
            )
            raise SpecError(msg)
        keys = [f"loinc|{c}" for c in lab.loinc] + list(lab.local)
        for coding in keys:
            if coding in by_coding and by_coding[coding] != lab.key:
                msg = (
                    f"{source}: code {coding!r} maps to both {by_coding[coding]!r} and {lab.key!r}."
                )
                raise SpecError(msg)
            by_coding[coding] = lab.key

    genes = content["genes"]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return FeatureSpec(
        version=str(content["version"]),
        name=str(content.get("name", "")),
        labs=labs,
        genes=tuple(str(g) for g in genes.get("symbols", [])),
        gene_ids={str(k): str(v) for k, v in genes.get("ensembl", {}).items()},
        tasks={str(k): dict(v) for k, v in content["tasks"].items()},
        sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        source=source,
        _by_coding=by_coding,
    )


def load_spec(path: str | Path | None = None) -> FeatureSpec:
    """Read a feature spec TOML file; without a path, read the packaged default spec."""
    if path is None or str(path) == "":
        text = resources.files("models").joinpath(DEFAULT_SPEC_NAME).read_text(encoding="utf-8")
        source = f"models/{DEFAULT_SPEC_NAME}"
    else:
        file = Path(path)
        if not file.is_file():
            msg = (
                f"Feature spec {file} not found; pass an existing TOML file "
                "or omit it for the default."
            )
            raise SpecError(msg)
        text = file.read_text(encoding="utf-8")
        source = str(file)
    try:
        content = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = f"{source}: invalid TOML ({err}); fix the file and retry."
        raise SpecError(msg) from err
    return parse_spec(content, source)
