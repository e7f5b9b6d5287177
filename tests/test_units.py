"""Unit conversion to the panel's canonical UCUM units."""

from __future__ import annotations

import math
import time

import pytest

from client.units import UnitConverter, strip_annotations
from models.spec import FeatureSpec, load_spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec()


@pytest.fixture(scope="module")
def converter() -> UnitConverter:
    return UnitConverter()


@pytest.mark.parametrize(
    ("unit", "key", "value", "expected"),
    [
        ("10*3/uL", "wbc", 4.2, 4.2),
        ("/uL", "wbc", 4200.0, 4.2),
        ("10*9/L", "platelets", 150.0, 150.0),
        ("umol/L", "creatinine", 88.4, 88.4 * 113.12 / 10_000),
        ("mmol/L", "creatinine", 0.0884, 0.0884 * 113.12 * 100 / 1000),
        ("mg/dL", "crp", 1.0, 10.0),
        ("ng/mL", "ferritin", 250.0, 250.0),
        ("umol/L", "bilirubin", 17.1, 17.1 * 584.66 / 10_000),
        ("g/L", "hemoglobin", 120.0, 12.0),
        ("{copies}/ug", "car-copies-dna", 1234.0, 1234.0),
        ("{copies}/mg", "car-copies-dna", 1000.0, 1.0),
        ("{copies}/10*3{cells}", "car-copies-cells", 17.0, 17.0),
    ],
    ids=lambda v: str(v),
)
def test_convert_to_canonical(
    converter: UnitConverter, spec: FeatureSpec, unit: str, key: str, value: float, expected: float
) -> None:
    converted = converter.convert(value, unit, spec.lab(key))
    assert converted is not None
    assert math.isclose(converted, expected, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("unit", "key"),
    [
        ("bananas", "crp"),
        ("K/uL", "wbc"),
        ("%", "wbc"),
        ("mg/dL", "wbc"),
        ("/ug", "car-copies-dna"),
        ("{cells}/ug", "car-copies-dna"),
        ("umol/L", "crp"),
    ],
)
def test_convert_rejects_unit(
    converter: UnitConverter, spec: FeatureSpec, unit: str, key: str
) -> None:
    assert converter.convert(1.0, unit, spec.lab(key)) is None


def test_conversion_factor_cached(converter: UnitConverter, spec: FeatureSpec) -> None:
    lab = spec.lab("creatinine")
    first = converter.conversion("umol/L", lab.unit, lab.molar_mass)
    assert first is converter.conversion("umol/L", lab.unit, lab.molar_mass)

    started = time.perf_counter()
    for _ in range(100_000):
        converter.convert(88.4, "umol/L", lab)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"100k cached conversions took {elapsed:.2f} s"


def test_celsius_is_affine(converter: UnitConverter) -> None:
    conversion = converter.conversion("[degF]", "Cel")
    assert conversion is not None
    assert math.isclose(conversion.apply(212.0), 100.0, rel_tol=1e-9)
    assert math.isclose(conversion.apply(32.0), 0.0, abs_tol=1e-9)


def test_strip_annotations_cases() -> None:
    assert strip_annotations("{copies}/ug") == ("1/ug", ("{copies}",))
    assert strip_annotations("{copies}/10*3{cells}") == ("1/10*3", ("{cells}", "{copies}"))
    assert strip_annotations("{score}") == ("1", ("{score}",))
    assert strip_annotations("mg/dL") == ("mg/dL", ())
