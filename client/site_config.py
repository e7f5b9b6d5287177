"""Site configuration: the `site.toml` file that names a site's data, state folder and policy."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.policy import PolicyError, SitePolicy, load_policy, parse_policy

__all__ = ["CellsConfig", "PrivacyConfig", "SiteConfig", "SiteConfigError", "load_site_config"]


class SiteConfigError(ValueError):
    """Raised when `site.toml` is missing, malformed or names a key that does not exist."""


@dataclass(frozen=True)
class CellsConfig:
    """How to find patient, sample and cell-state label of each cell."""

    patient_column: str = "patient"
    sample_column: str = "sample"
    label_column: str = "cell_state"
    sample_sheet: Path | None = None
    sample_sheet_sample: str = "GEX_Sample"
    sample_sheet_patient: str = "Patient"
    labels: Path | None = None
    labels_cell_column: str = "CellID"
    labels_label_column: str = "CellType1"
    patient: str = ""  # one patient for every file, when neither obs nor a sample sheet names one


# One parser in privacy/policy.py reads both a policy file and the inline [privacy] table.
# The old name stays for callers that import it from here.
PrivacyConfig = SitePolicy


@dataclass(frozen=True)
class SiteConfig:
    """A parsed `site.toml`; every path is absolute."""

    path: Path
    name: str
    fhir: tuple[Path, ...]
    cells: tuple[Path, ...]
    spec: Path | None
    state_dir: Path
    timezone: str
    cells_config: CellsConfig = field(default_factory=CellsConfig)
    privacy: SitePolicy = field(default_factory=SitePolicy)
    policy_file: Path | None = None


_SITE_KEYS = {"name", "fhir", "cells", "spec", "state-dir", "timezone", "policy"}
_CELLS_KEYS = {
    "patient-column",
    "sample-column",
    "label-column",
    "sample-sheet",
    "sample-sheet-sample",
    "sample-sheet-patient",
    "labels",
    "labels-cell-column",
    "labels-label-column",
    "patient",
}


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, path: Path) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        msg = (
            f"{path}: unknown key(s) {', '.join(unknown)} in [{where}]; "
            f"allowed keys: {', '.join(sorted(allowed))}."
        )
        raise SiteConfigError(msg)


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a `site.toml` file, or `site.toml` inside a site folder."""
    file = Path(path)
    if file.is_dir():
        file = file / "site.toml"
    if not file.is_file():
        msg = f"Site config {file} not found; create it (see docs/data.md) or pass the site folder."
        raise SiteConfigError(msg)
    try:
        content = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        msg = f"{file}: invalid TOML ({err})."
        raise SiteConfigError(msg) from err

    _check_keys(content, {"site", "cells", "privacy"}, "top level", file)
    site = content.get("site", {})
    cells = content.get("cells", {})
    privacy = content.get("privacy", {})
    _check_keys(site, _SITE_KEYS, "site", file)
    _check_keys(cells, _CELLS_KEYS, "cells", file)
    base = file.parent.resolve()

    def optional_path(value: str) -> Path | None:
        return _resolve(base, value) if value else None

    cells_config = CellsConfig(
        patient_column=cells.get("patient-column", "patient"),
        sample_column=cells.get("sample-column", "sample"),
        label_column=cells.get("label-column", "cell_state"),
        sample_sheet=optional_path(cells.get("sample-sheet", "")),
        sample_sheet_sample=cells.get("sample-sheet-sample", "GEX_Sample"),
        sample_sheet_patient=cells.get("sample-sheet-patient", "Patient"),
        labels=optional_path(cells.get("labels", "")),
        labels_cell_column=cells.get("labels-cell-column", "CellID"),
        labels_label_column=cells.get("labels-label-column", "CellType1"),
        patient=cells.get("patient", ""),
    )
    policy_file = optional_path(site.get("policy", ""))
    policy = _load_policy(file, policy_file, privacy)

    return SiteConfig(
        path=file.resolve(),
        name=str(site.get("name", base.name)),
        fhir=tuple(_resolve(base, p) for p in site.get("fhir", [])),
        cells=tuple(_resolve(base, p) for p in site.get("cells", [])),
        spec=optional_path(site.get("spec", "")),
        state_dir=_resolve(base, site.get("state-dir", "state")),
        timezone=str(site.get("timezone", "UTC")),
        cells_config=cells_config,
        privacy=policy,
        policy_file=policy_file,
    )


def _load_policy(file: Path, policy_file: Path | None, privacy: dict[str, Any]) -> SitePolicy:
    """Read the site's policy from `[site] policy` or the inline `[privacy]` table, not both."""
    try:
        if policy_file is None:
            return parse_policy(privacy, f"{file} [privacy]")
        if privacy:
            msg = (
                f"{file}: both [site] policy = {policy_file} and a [privacy] table are set; "
                "keep one, since the policy must have a single source."
            )
            raise SiteConfigError(msg)
        return load_policy(policy_file)
    except PolicyError as err:
        raise SiteConfigError(str(err)) from err
