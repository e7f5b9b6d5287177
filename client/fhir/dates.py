"""FHIR date, dateTime and instant values as UTC instants with their precision."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "EARLIEST",
    "DateError",
    "add_site_offset",
    "midpoint",
    "parse_fhir_time",
    "site_timezone",
]

# Dates before this are implausible for any living patient's record and are rejected.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)

_FHIR_TIME = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d+)?)?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_WITHOUT_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?")


class DateError(ValueError):
    """Raised when a FHIR date or dateTime string cannot be read."""


def site_timezone(name: str) -> tzinfo:
    """Return the IANA time zone `name`, such as `Europe/Berlin`; raise DateError if unknown."""
    if name in ("", "UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        msg = f"Unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'."
        raise DateError(msg) from err


def parse_fhir_time(text: str, zone: tzinfo) -> tuple[datetime, str]:
    """Read a FHIR date, dateTime or instant string.

    Parameters
    ----------
    text
        `YYYY`, `YYYY-MM`, `YYYY-MM-DD` or a date-time with or without seconds and offset.
    zone
        The site time zone. It places dates (local midnight, or the first day of the month
        or year) and date-times without an offset.

    Returns
    -------
    tuple
        The start of the value as an aware UTC datetime, and its precision: `year`, `month`,
        `day`, `minute` (no seconds, or seconds written as `:00` without a fraction) or
        `second`.
    """
    match = _FHIR_TIME.fullmatch(text.strip())
    if match is None:
        msg = f"{text!r} is not a FHIR date or dateTime"
        raise DateError(msg)
    parts = match.groupdict()
    year = int(parts["year"])
    month = int(parts["month"] or 1)
    day = int(parts["day"] or 1)
    hour = int(parts["hour"] or 0)
    minute = int(parts["minute"] or 0)
    second = int(parts["second"] or 0)
    microsecond = round(float(parts["fraction"]) * 1_000_000) if parts["fraction"] else 0

    if parts["hour"] is not None:
        seconds_given = parts["second"] is not None and (second != 0 or microsecond != 0)
        precision = "second" if seconds_given else "minute"
    elif parts["day"] is not None:
        precision = "day"
    elif parts["month"] is not None:
        precision = "month"
    else:
        precision = "year"

    offset = parts["offset"]
    local_zone = zone if offset is None else _fixed_offset(offset)
    try:
        value = datetime(
            year, month, day, hour, minute, min(second, 59), microsecond, tzinfo=local_zone
        )
    except ValueError as err:
        msg = f"{text!r} is not a valid calendar date or time ({err})"
        raise DateError(msg) from err
    return value.astimezone(UTC), precision


def midpoint(start: datetime, precision: str) -> datetime:
    """Return the middle of the interval that a partial date covers (the start for day or finer)."""
    if precision == "year":
        return start + timedelta(days=365.25 / 2)
    if precision == "month":
        return start + timedelta(days=30.44 / 2)
    return start


def add_site_offset(text: str, zone: tzinfo) -> str | None:
    """Append the site's UTC offset to a date-time written without one.

    FHIR requires an offset on every date-time with a time; exports that omit it mean the
    site's local time. Returns None when `text` is not such a date-time.
    """
    if not _WITHOUT_OFFSET.fullmatch(text):
        return None
    value = datetime.fromisoformat(text).replace(tzinfo=zone)
    offset = value.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    with_seconds = text if text.count(":") == 2 else f"{text}:00"
    return f"{with_seconds}{sign}{hours:02d}:{rest:02d}"


@lru_cache(maxsize=64)
def _fixed_offset(offset: str) -> tzinfo:
    if offset == "Z":
        return UTC
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))
