"""Turn validated FHIR resources into patient, timeline and event rows."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from client.fhir.codes import INFUSION_CODES, icd10_grade, toxicity_kind
from client.fhir.dates import EARLIEST, DateError, parse_fhir_time
from client.report import SourceReport
from client.units import UnitConverter
from models.spec import FeatureSpec

__all__ = ["EventRow", "Extractor", "PatientRow", "TimelineRow", "patient_id_of"]

_CENSORING = ("<", "<=", ">", ">=")
_UCUM = "http://unitsofmeasure.org"
_DROPPED_STATUS = {"entered-in-error", "cancelled", "not-done"}


@dataclass(slots=True)
class PatientRow:
    """The fields of one Patient resource that fedtwin uses."""

    patient_id: str
    sex: str | None
    birth_date: str | None
    birth_time: datetime | None
    birth_precision: str
    source: int


@dataclass(slots=True)
class TimelineRow:
    """One panel value of one patient; `seq` numbers the resource it came from."""

    patient_id: str
    time: datetime
    precision: str
    time_path: str
    code: str
    value: float
    unit: str
    censored: str
    out_of_range: bool
    source: int
    seq: int


@dataclass(slots=True)
class EventRow:
    """One infusion or Condition of one patient; `time` is None when the resource gives none."""

    patient_id: str
    time: datetime | None
    time_path: str
    kind: str
    code: str
    grade: float
    grading: str
    product: str | None
    source: int
    seq: int


@dataclass
class Extractor:
    """Collects rows from validated resources and counts what it cannot use.

    Rows keep the patient id as written; rows of patients that no Patient resource
    defines, and future dates, are filtered once every source is read.
    """

    spec: FeatureSpec
    zone: tzinfo
    converter: UnitConverter = field(default_factory=UnitConverter)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    patients: dict[str, PatientRow] = field(default_factory=dict)
    timeline: list[TimelineRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    references: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    seq: int = 0

    def add(self, data: dict[str, Any], source: int, report: SourceReport) -> None:
        """Extract the rows of one validated resource."""
        self.seq += 1
        resource_type = data["resourceType"]
        if resource_type == "Patient":
            self._patient(data, source, report)
        elif resource_type == "Observation":
            self._observation(data, source, report)
        elif resource_type == "Condition":
            self._condition(data, source, report)
        elif resource_type in ("Procedure", "MedicationAdministration"):
            self._administration(data, source, report)

    # Patient

    def _patient(self, data: dict[str, Any], source: int, report: SourceReport) -> None:
        patient_id = str(data.get("id", ""))
        if not patient_id:
            report.skip("Patient.id: missing")
            return
        birth_date = data.get("birthDate")
        birth_time: datetime | None = None
        precision = ""
        if birth_date is not None:
            try:
                birth_time, precision = parse_fhir_time(birth_date, self.zone)
            except DateError:
                birth_time = None
            if birth_time is not None and birth_time < EARLIEST:
                report.skip("Patient.birthDate: before 1900 (value dropped, patient kept)")
                birth_date, birth_time, precision = None, None, ""
        self.patients.setdefault(
            patient_id,
            PatientRow(patient_id, data.get("gender"), birth_date, birth_time, precision, source),
        )
        report.counts["patients"] += 1

    # Observation

    def _observation(self, data: dict[str, Any], source: int, report: SourceReport) -> None:
        report.counts["observations"] += 1
        patient_id = self._subject(data, report)
        if patient_id is None:
            return

        key = self._match(data.get("code"))
        components = [
            (component, self._match(component.get("code")))
            for component in data.get("component") or []
        ]
        if key is None and not any(k is not None for _, k in components):
            _count_not_in_panel(report, data.get("code"))
            return

        when = self._effective(data, report)
        if when is None:
            return

        rows_before = len(self.timeline)
        if key is not None:
            self._value(data, "Observation", key, patient_id, when, source, report)
        for component, component_key in components:
            if component_key is None:
                _count_not_in_panel(report, component.get("code"), "component")
                continue
            self._value(
                component, "Observation.component", component_key, patient_id, when, source, report
            )
        if len(self.timeline) > rows_before:
            self.references[(source, "Observation", patient_id)] += 1

    def _match(self, concept: Any) -> str | None:
        if not isinstance(concept, dict):
            return None
        for coding in concept.get("coding") or []:
            key = self.spec.match_coding(coding.get("system"), coding.get("code"))
            if key is not None:
                return key
        return None

    def _effective(
        self, data: dict[str, Any], report: SourceReport
    ) -> tuple[datetime, str, str] | None:
        candidates = (
            ("effectiveDateTime", data.get("effectiveDateTime")),
            ("effectivePeriod.start", (data.get("effectivePeriod") or {}).get("start")),
            ("effectiveInstant", data.get("effectiveInstant")),
        )
        for name, text in candidates:
            if text is None:
                continue
            path = f"Observation.{name}"
            return self._time(text, path, report)
        report.skip("Observation.effective[x]: missing")
        return None

    def _time(self, text: str, path: str, report: SourceReport) -> tuple[datetime, str, str] | None:
        try:
            time, precision = parse_fhir_time(text, self.zone)
        except DateError as err:
            report.skip(f"{path}: {err}")
            return None
        if time < EARLIEST:
            report.skip(f"{path}: before 1900")
            return None
        return time, precision, path

    def _value(
        self,
        element: dict[str, Any],
        path: str,
        key: str,
        patient_id: str,
        when: tuple[datetime, str, str],
        source: int,
        report: SourceReport,
    ) -> None:
        lab = self.spec.lab(key)
        quantity = element.get("valueQuantity")
        censored = ""
        if quantity is None:
            if element.get("dataAbsentReason") is not None:
                value, unit = math.nan, lab.unit
                report.counts["values-absent"] += 1
            else:
                other = next((k for k in element if k.startswith("value")), None)
                problem = f"not a Quantity ({other})" if other else "missing"
                report.skip(f"{path}.value[x]: {problem}")
                return
        else:
            raw_value = quantity.get("value")
            unit_text = _unit_of(quantity)
            if raw_value is None:
                report.skip(f"{path}.valueQuantity.value: missing")
                return
            if unit_text is None:
                report.skip(f"{path}.valueQuantity.code: missing (no UCUM unit)")
                return
            converted = self.converter.convert(float(raw_value), unit_text, lab)
            if converted is None:
                report.skip(f"unit-not-convertible: {unit_text} -> {lab.unit}")
                return
            if unit_text != lab.unit:
                conversions = report.details.setdefault("unit-conversions", {})
                name = f"{key}: {unit_text} -> {lab.unit}"
                conversions[name] = conversions.get(name, 0) + 1
            value, unit = converted, lab.unit
            comparator = quantity.get("comparator")
            censored = comparator if comparator in _CENSORING else ""

        out_of_range = not math.isnan(value) and not lab.low <= value <= lab.high
        time, precision, time_path = when
        self.timeline.append(
            TimelineRow(
                patient_id,
                time,
                precision,
                time_path,
                key,
                value,
                unit,
                censored,
                out_of_range,
                source,
                self.seq,
            )
        )

    def _subject(self, data: dict[str, Any], report: SourceReport) -> str | None:
        resource_type = data["resourceType"]
        element = "patient" if resource_type == "MedicationAdministration" else "subject"
        if resource_type == "MedicationAdministration" and "patient" not in data:
            element = "subject"
        reference = data.get(element)
        if not isinstance(reference, dict) or not reference.get("reference"):
            report.skip(f"{resource_type}.{element}: missing")
            return None
        patient_id = patient_id_of(str(reference["reference"]))
        if patient_id is None:
            report.skip(f"{resource_type}.{element}: not a Patient reference")
            return None
        return patient_id

    # Condition

    def _condition(self, data: dict[str, Any], source: int, report: SourceReport) -> None:
        report.counts["conditions"] += 1
        status = _first_code(data.get("verificationStatus"))
        if status in ("refuted", "entered-in-error"):
            report.skip(f"Condition.verificationStatus: {status}")
            return
        patient_id = self._subject(data, report)
        if patient_id is None:
            return

        kind, code = "condition", ""
        for coding in (data.get("code") or {}).get("coding") or []:
            found = toxicity_kind(coding.get("system"), coding.get("code"))
            if found is not None:
                kind, code = found, f"{coding.get('system')}|{coding.get('code')}"
                break
        if not code:
            code = _first_coding(data.get("code"))

        candidates = (
            ("onsetDateTime", data.get("onsetDateTime")),
            ("onsetPeriod.start", (data.get("onsetPeriod") or {}).get("start")),
            ("recordedDate", data.get("recordedDate")),
        )
        time: datetime | None = None
        time_path = ""
        for name, text in candidates:
            if text is None:
                continue
            when = self._time(text, f"Condition.{name}", report)
            if when is None:
                return
            time, _, time_path = when
            break

        grade, grading = math.nan, ""
        if kind != "condition":
            grade, grading = _toxicity_grade(data)
        self.events.append(
            EventRow(
                patient_id, time, time_path, kind, code, grade, grading, None, source, self.seq
            )
        )
        self.references[(source, "Condition", patient_id)] += 1

    # Procedure and MedicationAdministration: the infusion

    def _administration(self, data: dict[str, Any], source: int, report: SourceReport) -> None:
        resource_type = data["resourceType"]
        if resource_type == "Procedure":
            concepts = [data.get("code")]
        else:
            concepts = [data.get("medicationCodeableConcept"), *(data.get("category") or [])]
            if isinstance(data.get("category"), dict):
                concepts = [data.get("medicationCodeableConcept"), data.get("category")]
        if not any(_has_coding(c, INFUSION_CODES) for c in concepts):
            _count_unused(report, resource_type)
            return
        if data.get("status") in _DROPPED_STATUS:
            report.skip(f"{resource_type}.status: {data.get('status')}")
            return
        patient_id = self._subject(data, report)
        if patient_id is None:
            return

        prefix = "performed" if resource_type == "Procedure" else "effective"
        candidates = (
            (f"{prefix}DateTime", data.get(f"{prefix}DateTime")),
            (f"{prefix}Period.start", (data.get(f"{prefix}Period") or {}).get("start")),
        )
        when = None
        for name, text in candidates:
            if text is not None:
                when = self._time(text, f"{resource_type}.{name}", report)
                if when is None:
                    return
                break
        if when is None:
            report.skip(f"{resource_type}.{prefix}[x]: missing (infusion without a time)")
            return

        code = next(
            f"{coding.get('system')}|{coding.get('code')}"
            for concept in concepts
            if isinstance(concept, dict)
            for coding in concept.get("coding") or []
            if f"{coding.get('system')}|{coding.get('code')}" in INFUSION_CODES
        )
        self.events.append(
            EventRow(
                patient_id,
                when[0],
                when[2],
                "infusion",
                code,
                math.nan,
                "",
                _product(data),
                source,
                self.seq,
            )
        )
        report.counts["infusions"] += 1
        self.references[(source, resource_type, patient_id)] += 1


def patient_id_of(reference: str) -> str | None:
    """Return the Patient id of a reference such as `Patient/123` or `https://x/fhir/Patient/123`."""
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _unit_of(quantity: dict[str, Any]) -> str | None:
    code = quantity.get("code")
    if code and quantity.get("system") in (None, _UCUM):
        return str(code)
    unit = quantity.get("unit")
    if unit:
        return str(unit)
    if code:
        return str(code)
    return None


def _first_code(concept: Any) -> str | None:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or []:
            return str(coding.get("code"))
    return None


def _first_coding(concept: Any) -> str:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or []:
            return f"{coding.get('system')}|{coding.get('code')}"
        if concept.get("text"):
            return f"text|{concept['text']}"
    return ""


def _has_coding(concept: Any, codes: frozenset[str]) -> bool:
    if not isinstance(concept, dict):
        return False
    return any(
        f"{coding.get('system')}|{coding.get('code')}" in codes
        for coding in concept.get("coding") or []
    )


def _count_not_in_panel(report: SourceReport, concept: Any, where: str = "code") -> None:
    report.counts["not-in-panel"] += 1
    codes = report.details.setdefault("not-in-panel", {})
    name = _first_coding(concept) or "(no code)"
    if where != "code":
        name = f"{where}: {name}"
    codes[name] = codes.get(name, 0) + 1


def _count_unused(report: SourceReport, resource_type: str) -> None:
    unused = report.details.setdefault("not-used", {})
    name = f"{resource_type} (not a CAR T infusion)"
    unused[name] = unused.get(name, 0) + 1


def _product(data: dict[str, Any]) -> str | None:
    if data["resourceType"] == "Procedure":
        for concept in data.get("usedCode") or []:
            name = _concept_name(concept)
            if name:
                return name
        return None
    name = _concept_name(data.get("medicationCodeableConcept"))
    if name:
        return name
    reference = data.get("medicationReference") or {}
    display = reference.get("display")
    return str(display) if display else None


def _concept_name(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding.get("code"))
    return None


def _toxicity_grade(data: dict[str, Any]) -> tuple[float, str]:
    """Return (grade, grading system) of a CRS or ICANS Condition.

    ASTCT grades (`stage.type` codes containing `astct`) win over other gradings. Without
    them, the maximum of a single grading system is used. Without any stage, the grade
    that an ICD-10-CM code carries is used.
    """
    graded: dict[str, float] = {}
    for stage in data.get("stage") or []:
        summary = _first_code(stage.get("summary"))
        try:
            grade = float(summary) if summary is not None else math.nan
        except ValueError:
            continue
        if math.isnan(grade):
            continue
        grading = _first_code(stage.get("type")) or "unspecified"
        graded[grading] = max(grade, graded.get(grading, -math.inf))

    astct = {k: v for k, v in graded.items() if "astct" in k.lower()}
    if astct:
        grading = max(astct, key=lambda k: astct[k])
        return astct[grading], grading
    if len(graded) == 1:
        ((grading, grade),) = graded.items()
        return grade, grading
    if graded:
        return math.nan, "conflicting: " + ", ".join(sorted(graded))

    for coding in (data.get("code") or {}).get("coding") or []:
        if toxicity_kind(coding.get("system"), coding.get("code")) and coding.get(
            "system", ""
        ).endswith("icd-10-cm"):
            icd_grade = icd10_grade(str(coding.get("code")))
            if icd_grade is not None:
                return icd_grade, "icd-10-cm"
    return math.nan, ""
