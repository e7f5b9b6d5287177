"""Per-source data report: what a site can use, what was skipped and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SiteReport", "SourceReport"]


@dataclass
class SourceReport:
    """What one input file (or NDJSON file of a Bulk Data folder) contributed.

    Attributes
    ----------
    path
        The file read.
    kind
        `fhir-ndjson`, `fhir-bundle`, `h5ad` or `10x-h5`.
    usable
        False when nothing in the file can be used; `error` then says why in one line.
    counts
        Totals, such as `resources`, `patients`, `observations`, `cells`, `genes-matched`.
    skips
        Skipped records per reason; a reason names the element path, for example
        `Observation.subject: missing`.
    details
        Structured extras: observations per panel code, unit conversions, per-sample cells.
    """

    path: str
    kind: str
    usable: bool = True
    error: str = ""
    counts: Counter[str] = field(default_factory=Counter)
    skips: Counter[str] = field(default_factory=Counter)
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        """Count `count` skipped records for `reason`."""
        self.skips[reason] += count

    def fail(self, error: str) -> None:
        """Mark the whole file unusable with a one-line reason."""
        self.usable = False
        self.error = error

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "path": self.path,
            "kind": self.kind,
            "usable": self.usable,
            "error": self.error,
            "counts": dict(self.counts),
            "skips": dict(self.skips),
            "details": self.details,
        }


@dataclass
class SiteReport:
    """The report of a whole site: one entry per source plus site-wide totals."""

    site: str
    spec_sha256: str
    sources: list[SourceReport] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """True when at least one source is usable and the site has at least one patient."""
        return any(s.usable for s in self.sources) and self.totals.get("patients", 0) > 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "site": self.site,
            "spec-sha256": self.spec_sha256,
            "usable": self.usable,
            "totals": self.totals,
            "sources": [s.to_dict() for s in self.sources],
        }
