"""A site's privacy policy: ε caps, δ, minimum noise, privacy unit, allowed tasks and models.

The same fields are read from a policy TOML file (`[site] policy = FILE` in `site.toml`, or
`fedtwin-steward policy check FILE`) and from the inline `[privacy]` table of `site.toml`. Keys are
kebab-case:

```toml
epsilon-cap = 8.0            # cumulative ε per task
epsilon-cap-total = 12.0     # cumulative ε over all tasks of the site (optional)
delta = 1e-4                 # optional; default 1 / (10 x patients); must stay below 1 / patients
min-noise-multiplier = 0.5
privacy-unit = "patient"     # or "record"
allowed-tasks = ["crs-risk"] # default: every task
allowed-models = []          # model class names, default: every model
min-cohort = 5               # smallest patient count of any metric that leaves the site
patients-rounding = 5        # patient counts in the ledger are rounded to this multiple
```
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tasks import TASKS

__all__ = [
    "KNOWN_MODELS",
    "POLICY_KEYS",
    "PRIVACY_UNITS",
    "PolicyError",
    "SitePolicy",
    "load_policy",
    "parse_policy",
    "round_patients",
]

PRIVACY_UNITS = ("patient", "record")

# The class names of the networks that `models.tasks` builds, one per task.
KNOWN_MODELS = ("LabForecastNet", "CrsRiskNet", "CellStateNet")

POLICY_KEYS = (
    "epsilon-cap",
    "epsilon-cap-total",
    "delta",
    "min-noise-multiplier",
    "privacy-unit",
    "allowed-tasks",
    "allowed-models",
    "min-cohort",
    "patients-rounding",
)


class PolicyError(ValueError):
    """Raised when a policy file or `[privacy]` table has an invalid field."""


@dataclass(frozen=True)
class SitePolicy:
    """A site's privacy policy, enforced by the site before every round.

    Attributes
    ----------
    epsilon_cap
        Highest cumulative ε of one task at the site.
    epsilon_cap_total
        Highest cumulative ε over all tasks of the site together, or None for no such cap.
    delta
        δ of every ε; 0.0 means 1 / (10 x patients) of the round's training cohort.
    min_noise_multiplier
        Lowest noise_multiplier the site trains with.
    privacy_unit
        `patient`, or `record` when the policy allows it.
    allowed_tasks
        Task names the site trains; empty means every task.
    allowed_models
        Model class names the site trains; empty means every model.
    min_cohort
        Smallest number of patients behind any metric that leaves the site.
    patients_rounding
        Patient counts in ledger entries are rounded down to a multiple of this.
    source
        The file (and table) the policy came from, for messages.
    """

    epsilon_cap: float = 10.0
    epsilon_cap_total: float | None = None
    delta: float = 0.0
    min_noise_multiplier: float = 0.3
    privacy_unit: str = "patient"
    allowed_tasks: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    min_cohort: int = 5
    patients_rounding: int = 1
    source: str = "defaults"

    def allows_task(self, task: str) -> bool:
        """Return True when the policy lets the site train `task`."""
        return not self.allowed_tasks or task in self.allowed_tasks

    def allows_model(self, model: str) -> bool:
        """Return True when the policy lets the site train the model class `model`."""
        return not self.allowed_models or model in self.allowed_models

    def to_json(self) -> dict[str, Any]:
        """Return the policy with its file keys, as stored beside ledger entries."""
        return {
            "epsilon-cap": self.epsilon_cap,
            "epsilon-cap-total": self.epsilon_cap_total,
            "delta": self.delta,
            "min-noise-multiplier": self.min_noise_multiplier,
            "privacy-unit": self.privacy_unit,
            "allowed-tasks": list(self.allowed_tasks),
            "allowed-models": list(self.allowed_models),
            "min-cohort": self.min_cohort,
            "patients-rounding": self.patients_rounding,
        }


def round_patients(count: int, rounding: int) -> int:
    """Round a patient count down to a multiple of `rounding` (1 keeps it exact)."""
    return (count // rounding) * rounding


def _number(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        msg = f"{where}: {key} must be a finite number, got {value!r}."
        raise PolicyError(msg)
    return float(value)


def _integer(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{where}: {key} must be an integer, got {value!r}."
        raise PolicyError(msg)
    return value


def _names(
    table: Mapping[str, Any], key: str, known: tuple[str, ...], where: str
) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        msg = f"{where}: {key} must be a list of names, got {value!r}."
        raise PolicyError(msg)
    unknown = [item for item in value if item not in known]
    if unknown:
        msg = (
            f"{where}: {key} names unknown {', '.join(repr(item) for item in unknown)}; "
            f"known: {', '.join(known)}."
        )
        raise PolicyError(msg)
    return tuple(value)


def parse_policy(table: Mapping[str, Any], where: str) -> SitePolicy:
    """Validate a policy table and return the policy.

    Parameters
    ----------
    table
        The parsed TOML keys: a policy file's top level, or `site.toml`'s `[privacy]` table.
    where
        The file and table for messages, such as `site-1/site.toml [privacy]`.

    Raises
    ------
    PolicyError
        On an unknown key or an invalid value; the message names `where`, the key and the fix.
    """
    unknown = sorted(set(table) - set(POLICY_KEYS))
    if unknown:
        msg = (
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(POLICY_KEYS)}."
        )
        raise PolicyError(msg)

    epsilon_cap = _number(table, "epsilon-cap", 10.0, where)
    if epsilon_cap <= 0:
        msg = (
            f"{where}: epsilon-cap must be positive, got {epsilon_cap:g}; a typical cap is 1 to 10."
        )
        raise PolicyError(msg)

    epsilon_cap_total: float | None = None
    if "epsilon-cap-total" in table:
        epsilon_cap_total = _number(table, "epsilon-cap-total", 0.0, where)
        if epsilon_cap_total <= 0:
            msg = (
                f"{where}: epsilon-cap-total must be positive, got {epsilon_cap_total:g}; "
                "remove the key for no cap over all tasks."
            )
            raise PolicyError(msg)

    delta = _number(table, "delta", 0.0, where)
    if not 0 <= delta < 1:
        msg = (
            f"{where}: delta must be in (0, 1) and below 1 / patients, got {delta:g}; "
            "remove the key to use 1 / (10 x patients)."
        )
        raise PolicyError(msg)

    min_noise_multiplier = _number(table, "min-noise-multiplier", 0.3, where)
    if min_noise_multiplier < 0:
        msg = (
            f"{where}: min-noise-multiplier must be zero or positive, got {min_noise_multiplier:g}."
        )
        raise PolicyError(msg)

    privacy_unit = table.get("privacy-unit", "patient")
    if privacy_unit not in PRIVACY_UNITS:
        msg = (
            f"{where}: privacy-unit must be one of {', '.join(PRIVACY_UNITS)}, got "
            f"{privacy_unit!r}."
        )
        raise PolicyError(msg)

    min_cohort = _integer(table, "min-cohort", 5, where)
    if min_cohort < 1:
        msg = f"{where}: min-cohort must be at least 1, got {min_cohort}."
        raise PolicyError(msg)

    patients_rounding = _integer(table, "patients-rounding", 1, where)
    if patients_rounding < 1:
        msg = f"{where}: patients-rounding must be at least 1, got {patients_rounding}."
        raise PolicyError(msg)

    return SitePolicy(
        epsilon_cap=epsilon_cap,
        epsilon_cap_total=epsilon_cap_total,
        delta=delta,
        min_noise_multiplier=min_noise_multiplier,
        privacy_unit=str(privacy_unit),
        allowed_tasks=_names(table, "allowed-tasks", tuple(TASKS), where),
        allowed_models=_names(table, "allowed-models", KNOWN_MODELS, where),
        min_cohort=min_cohort,
        patients_rounding=patients_rounding,
        source=where,
    )


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate a policy TOML file whose keys sit at its top level."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        msg = f"{file}: policy file not found; check the path in site.toml's [site] policy."
        raise PolicyError(msg) from err
    except (OSError, UnicodeDecodeError) as err:
        msg = f"{file}: policy file cannot be read ({err})."
        raise PolicyError(msg) from err
    try:
        content = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = f"{file}: invalid TOML ({err})."
        raise PolicyError(msg) from err
    return parse_policy(content, str(file))
