"""The twin's outputs as a FHIR R4 Bundle of type collection, validated with the R4B models.

Forecast values are Observations with status `preliminary`, the tag `model-output`, a
`method` naming the model and its version, a `device` reference to a Device that describes
the model, and `derivedFrom` the site's Observations of the same code that the model read.
The value is the forecast median. Each interval is one `prediction-interval` extension
(see `INTERVAL_URL`) with the sub-extensions `level` (valueDecimal, such as 0.9), `low`
and `high` (valueQuantity in the value's unit). CRS risk is a RiskAssessment whose `basis`
lists the Observations of the model's inputs.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from client.twin.basis import ObservationRef
from client.twin.patient import PatientTwin

__all__ = ["INTERVAL_URL", "MODEL_OUTPUT_TAG", "build_bundle"]

BASE = "https://example.org/fedtwin"
INTERVAL_URL = f"{BASE}/StructureDefinition/prediction-interval"
MODEL_OUTPUT_TAG = {
    "system": f"{BASE}/CodeSystem/data-flags",
    "code": "model-output",
    "display": "Computed by a model, not measured",
}
UCUM = "http://unitsofmeasure.org"


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": unit}


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _references(refs: list[ObservationRef]) -> list[dict[str, str]]:
    unique = sorted({ref.resource_id for ref in refs})
    return [{"reference": f"Observation/{resource_id}"} for resource_id in unique]


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource}


def _device(task: str, version: str) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": str(uuid.uuid4()),
        "meta": {"tag": [MODEL_OUTPUT_TAG]},
        "deviceName": [{"name": f"fedtwin {task} twin", "type": "model-name"}],
        "version": [{"value": version}],
        "type": {"text": "software: fedtwin virtual-twin model"},
    }


def _lab_observations(twin: PatientTwin, device_id: str, issued: str) -> list[dict[str, Any]]:
    lab = twin.lab
    assert lab is not None

    method = (
        f"fedtwin lab-forecast {twin.versions['lab-forecast']}; "
        + ("per-patient twin (fine-tuned output bias)" if lab.fit.used else "global model")
        + f"; intervals: {lab.calibration_method}"
    )
    observations = []
    for k, code in enumerate(lab.codes):
        derived = _references([ref for ref in lab.basis if ref.code == code])
        for day, (start, end) in enumerate(lab.periods):
            extensions = []
            for level, (low, high) in sorted(lab.bounds.items()):
                if not (math.isfinite(low[day, k]) and math.isfinite(high[day, k])):
                    continue
                extensions.append(
                    {
                        "url": INTERVAL_URL,
                        "extension": [
                            {"url": "level", "valueDecimal": level},
                            {"url": "low", "valueQuantity": _quantity(low[day, k], lab.units[k])},
                            {
                                "url": "high",
                                "valueQuantity": _quantity(high[day, k], lab.units[k]),
                            },
                        ],
                    }
                )
            resource: dict[str, Any] = {
                "resourceType": "Observation",
                "id": str(uuid.uuid4()),
                "meta": {"tag": [MODEL_OUTPUT_TAG]},
                "status": "preliminary",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": twin_code(code, twin),
                "subject": {"reference": f"Patient/{twin.patient_id}"},
                "effectivePeriod": {"start": _time(start), "end": _time(end)},
                "issued": issued,
                "valueQuantity": _quantity(lab.median[day, k], lab.units[k]),
                "method": {"text": method},
                "device": {"reference": f"urn:uuid:{device_id}"},
                "note": [{"text": f"Forecast for day {day + 1} after the last lab day; median."}],
            }
            if extensions:
                resource["extension"] = extensions
            if derived:
                resource["derivedFrom"] = derived
            observations.append(resource)
    return observations


def twin_code(code: str, twin: PatientTwin) -> dict[str, Any]:
    """Return the CodeableConcept of a panel code: its first LOINC code, else the panel key."""
    loinc = twin.loinc.get(code, ())
    coding = [{"system": "http://loinc.org", "code": loinc[0]}] if loinc else []
    coding.append({"system": f"{BASE}/CodeSystem/lab-panel", "code": code})
    return {"coding": coding, "text": twin.names.get(code, code)}


def _risk_assessment(twin: PatientTwin, device_id: str, issued: str) -> dict[str, Any]:
    risk = twin.risk
    assert risk is not None
    figures = ", ".join(
        f"{name} {value:.3f}" for name, value in risk.calibration.items() if math.isfinite(value)
    )
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": str(uuid.uuid4()),
        "meta": {"tag": [MODEL_OUTPUT_TAG]},
        "status": "preliminary",
        "subject": {"reference": f"Patient/{twin.patient_id}"},
        "occurrenceDateTime": issued,
        "performer": {"reference": f"urn:uuid:{device_id}"},
        "method": {"text": f"fedtwin crs-risk {twin.versions['crs-risk']}"},
        "prediction": [
            {
                "outcome": {
                    "text": f"Cytokine release syndrome of ASTCT grade >= {risk.positive_grade:g}"
                },
                "probabilityDecimal": round(risk.probability, 6),
            }
        ],
        "note": [
            {
                "text": "Held-out patients of this site: "
                + (figures or "no calibration figures (too few held-out patients)")
            }
        ],
    }
    basis = _references(risk.basis)
    if basis:
        resource["basis"] = basis
    return resource


def _cell_observations(twin: PatientTwin, device_id: str, issued: str) -> list[dict[str, Any]]:
    cells = twin.cells
    assert cells is not None
    observations = []
    for sample_id, fractions in cells.fractions.iterrows():
        observations.append(
            {
                "resourceType": "Observation",
                "id": str(uuid.uuid4()),
                "meta": {"tag": [MODEL_OUTPUT_TAG]},
                "status": "preliminary",
                "code": {
                    "coding": [
                        {"system": f"{BASE}/CodeSystem/twin", "code": "cell-state-composition"}
                    ],
                    "text": "Predicted T-cell state composition",
                },
                "subject": {"reference": f"Patient/{twin.patient_id}"},
                "issued": issued,
                "specimen": {"display": f"single-cell sample {sample_id}"},
                "method": {"text": f"fedtwin cell-state {twin.versions['cell-state']}"},
                "device": {"reference": f"urn:uuid:{device_id}"},
                "note": [
                    {"text": f"Mean state probability over {cells.cells[str(sample_id)]} cells."}
                ],
                "component": [
                    {
                        "code": {
                            "coding": [
                                {"system": f"{BASE}/CodeSystem/cell-state", "code": str(state)}
                            ]
                        },
                        "valueQuantity": {
                            "value": round(float(value), 6),
                            "unit": "1",
                            "system": UCUM,
                            "code": "1",
                        },
                    }
                    for state, value in fractions.items()
                ],
            }
        )
    return observations


def build_bundle(twin: PatientTwin) -> dict[str, Any]:
    """Return the twin's Bundle (a dict), after validating it with the R4B models."""
    issued = _time(datetime.now(UTC))
    resources: list[dict[str, Any]] = []
    if twin.lab is not None:
        device = _device("lab-forecast", twin.versions["lab-forecast"])
        resources += [device, *_lab_observations(twin, device["id"], issued)]
    if twin.risk is not None:
        device = _device("crs-risk", twin.versions["crs-risk"])
        resources += [device, _risk_assessment(twin, device["id"], issued)]
    if twin.cells is not None:
        device = _device("cell-state", twin.versions["cell-state"])
        resources += [device, *_cell_observations(twin, device["id"], issued)]
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"tag": [MODEL_OUTPUT_TAG]},
        "type": "collection",
        "timestamp": issued,
        "entry": [_entry(resource) for resource in resources],
    }
    Bundle.model_validate(bundle)
    return bundle
