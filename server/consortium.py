"""Assemble a consortium folder from existing per-site data folders, without copying data."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_consortium"]


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_consortium(
    sites: dict[str, tuple[list[Path], list[Path]]],
    out: Path,
    *,
    spec: Path | None = None,
    epsilon_cap: float = 10.0,
    min_cohort: int = 3,
) -> list[Path]:
    """Write one site folder with a `site.toml` per site, pointing at the data in place.

    Parameters
    ----------
    sites
        Site name -> (FHIR paths, single-cell paths). Paths are stored as absolute paths.
    out
        The consortium folder to create.
    spec
        Feature spec file for every site; None keeps the packaged default.
    epsilon_cap, min_cohort
        The `[privacy]` policy written for every site.

    Returns
    -------
    list[Path]
        The `site.toml` files written.
    """
    if not sites:
        msg = "No sites given; pass at least one --site NAME=PATH."
        raise ValueError(msg)

    written = []
    for name, (fhir, cells) in sites.items():
        for path in [*fhir, *cells]:
            if not path.exists():
                msg = f"Site {name}: data path {path} not found."
                raise FileNotFoundError(msg)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            "[site]",
            f"name = {_toml_string(name)}",
            "fhir = [" + ", ".join(_toml_string(str(p.resolve())) for p in fhir) + "]",
            "cells = [" + ", ".join(_toml_string(str(p.resolve())) for p in cells) + "]",
            f"spec = {_toml_string(str(spec.resolve()) if spec else '')}",
            'state-dir = "state"',
            'timezone = "UTC"',
            "",
            "[privacy]",
            f"epsilon-cap = {float(epsilon_cap)}",
            f"min-cohort = {int(min_cohort)}",
            "",
        ]
        target = folder / "site.toml"
        target.write_text("\n".join(lines), encoding="utf-8")
        written.append(target)
    return written
