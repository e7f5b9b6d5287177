"""UCUM unit conversion to the canonical unit of a lab panel entry, with cached factors."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from models.spec import LabCode

__all__ = ["Conversion", "UnitConverter", "strip_annotations"]

logger = logging.getLogger(__name__)

# A UCUM annotation is free text in curly braces, such as `{copies}` or `{cells}`; it
# has no effect on the unit's magnitude.
_ANNOTATION = re.compile(r"\{[^{}]*\}")


def strip_annotations(unit: str) -> tuple[str, tuple[str, ...]]:
    """Remove UCUM annotations from a unit.

    Parameters
    ----------
    unit
        A UCUM unit string, for example `{copies}/10*3{cells}`.

    Returns
    -------
    tuple
        The unit without annotations (`"1"` when nothing is left, as for `{score}`) and the
        sorted annotations that were removed.
    """
    annotations = tuple(sorted(_ANNOTATION.findall(unit)))
    bare = _ANNOTATION.sub("", unit)
    if bare in ("", "/"):
        bare = "1"
    elif bare.startswith("/"):
        bare = "1" + bare
    return bare, annotations


@dataclass(frozen=True)
class Conversion:
    """A conversion `canonical = scale * value + offset`; `offset` is 0 except for affine units."""

    scale: float
    offset: float = 0.0

    def apply(self, value: float) -> float:
        """Convert one value."""
        return self.scale * value + self.offset


_IDENTITY = Conversion(1.0)


class UnitConverter:
    """Converter from any UCUM unit to the canonical unit of a lab panel entry.

    UCUM strings are parsed with ucumvert's `PintUcumRegistry`, built once per process on
    first use, and each (from, to, molar mass) factor is computed once and
    cached, because parsing UCUM per value is far slower than a multiplication.

    Two units with different UCUM annotations never convert: `{copies}/ug` to `/ug` is
    rejected, whereas `{copies}/ug` to `{copies}/mg` converts through `/ug` to `/mg`.
    Mass and molar concentrations convert through `LabCode.molar_mass` (g/mol) when
    the panel entry gives one.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, float | None], Conversion | None] = {}

    def conversion(
        self, unit: str, canonical: str, molar_mass: float | None = None
    ) -> Conversion | None:
        """Return the conversion from `unit` to `canonical`, or None when none exists."""
        key = (unit, canonical, molar_mass)
        if key not in self._cache:
            self._cache[key] = self._compute(unit, canonical, molar_mass)
        return self._cache[key]

    def convert(self, value: float, unit: str, lab: LabCode) -> float | None:
        """Convert `value` in `unit` to the canonical unit of `lab`; None when not convertible."""
        conversion = self.conversion(unit, lab.unit, lab.molar_mass)
        if conversion is None:
            return None
        return conversion.apply(value)

    def _ucum(self, unit: str) -> Any:
        return _ucum_registry().from_ucum(unit)

    def _compute(self, unit: str, canonical: str, molar_mass: float | None) -> Conversion | None:
        if unit == canonical:
            return _IDENTITY
        bare_unit, unit_annotations = strip_annotations(unit)
        bare_canonical, canonical_annotations = strip_annotations(canonical)
        if unit_annotations != canonical_annotations:
            return None
        if bare_unit == bare_canonical:
            return _IDENTITY

        import pint
        from lark.exceptions import LarkError

        try:
            source = self._ucum(bare_unit)
            target = self._ucum(bare_canonical)
            conversion = _linear_conversion(source, target)
            if conversion is None and molar_mass is not None:
                per_mole = self._ucum("g/mol") * molar_mass
                conversion = _linear_conversion(source * per_mole, target)
                if conversion is None:
                    conversion = _linear_conversion(source / per_mole, target)
        except (LarkError, pint.PintError, ValueError, TypeError) as err:
            logger.debug("Unit %r does not convert to %r: %s", unit, canonical, err)
            return None
        if conversion is None:
            logger.debug("Unit %r has another dimension than %r", unit, canonical)
        return conversion


@lru_cache(maxsize=1)
def _ucum_registry() -> Any:
    """Build the UCUM registry once per process (it takes about 0.6 s)."""
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


def _linear_conversion(source: Any, target: Any) -> Conversion | None:
    """Return the conversion between two pint quantities, or None when dimensions differ."""
    if source.dimensionality != target.dimensionality:
        return None
    # Convert 0 and 1 (in units of `source`) rather than multiplying quantities, which pint
    # rejects for offset units such as degrees Celsius.
    quantity = type(source)
    at_zero = quantity(0 * source.magnitude, source.units).to(target.units).magnitude
    at_one = quantity(source.magnitude, source.units).to(target.units).magnitude
    at_zero, at_one = at_zero / target.magnitude, at_one / target.magnitude
    # Round away float noise from chained prefixes (ng/mL -> ug/L gives 1.0000000000000002).
    scale = float(f"{at_one - at_zero:.12g}")
    offset = float(f"{at_zero:.12g}")
    if not math.isfinite(scale) or scale == 0.0:
        return None
    return Conversion(scale, offset)
