"""Codes that mark the CAR T infusion and the CAR T toxicities (CRS, ICANS) in FHIR data."""

from __future__ import annotations

__all__ = [
    "CRS_CODES",
    "ICANS_CODES",
    "ICD10CM",
    "INFUSION_CODES",
    "LOCAL_TOXICITY",
    "icd10_grade",
    "toxicity_kind",
]

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOCAL_TOXICITY = "https://example.org/fedtwin/CodeSystem/car-t-toxicity"

# Codings (`system|code`) of a CAR T cell infusion, in Procedure.code or
# MedicationAdministration.medicationCodeableConcept / category. The local fedtwin code
# is the one the bundled cohorts use. ICD-10-PCS XW033C3 / XW043C3 (engineered autologous
# CAR T cell immunotherapy into a peripheral / central vein) and CPT 0540T (CAR T cell
# administration) are standard procedure codes for the same act.
# NOTE: the ICD-10-PCS and CPT codes were written from the code systems' published titles
# and not checked against a code table. Extend this set for a site's local codes.
INFUSION_CODES = frozenset(
    {
        "https://example.org/fedtwin/CodeSystem/cell-therapy|car-t-infusion",
        "http://www.cms.gov/Medicare/Coding/ICD10|XW033C3",
        "http://www.cms.gov/Medicare/Coding/ICD10|XW043C3",
        "http://www.ama-assn.org/go/cpt|0540T",
    }
)

CRS_CODES = frozenset({f"{LOCAL_TOXICITY}|crs"})
ICANS_CODES = frozenset({f"{LOCAL_TOXICITY}|icans"})

# ICD-10-CM D89.831..D89.835 are CRS grade 1..5 and D89.839 CRS of unspecified grade;
# G92.01..G92.05 are ICANS grade 1..5 and G92.00 ICANS of unspecified grade.
_ICD10_PREFIX = {"D89.83": "crs", "G92.0": "icans"}


def toxicity_kind(system: str | None, code: str | None) -> str | None:
    """Return `crs`, `icans` or None for one Condition.code coding."""
    coding = f"{system}|{code}"
    if coding in CRS_CODES:
        return "crs"
    if coding in ICANS_CODES:
        return "icans"
    if system == ICD10CM and code is not None:
        for prefix, kind in _ICD10_PREFIX.items():
            if code.startswith(prefix) and len(code) == len(prefix) + 1:
                return kind
    return None


def icd10_grade(code: str) -> float | None:
    """Return the grade that an ICD-10-CM CRS or ICANS code carries (1-5), or None."""
    last = code[-1:]
    if last in {"1", "2", "3", "4", "5"}:
        return float(last)
    return None
