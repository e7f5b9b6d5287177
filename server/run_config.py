"""Run config of a federated training run: schema, defaults, parsing and checks.

The schema below is the single definition of the `[tool.flwr.app.config]` keys in
pyproject.toml. Flower hands them to the ServerApp as `context.run_config`; they are
read once, here, into a typed `RunConfig`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

__all__ = [
    "SCHEMA",
    "STRATEGIES",
    "TASKS",
    "ConfigKey",
    "RunConfig",
    "RunConfigError",
    "parse_run_config",
]

TASKS = ("lab-forecast", "crs-risk", "cell-state")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "trimmed-mean")

# A run name becomes a folder name under runs-dir, so it may not contain separators.
_RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunConfigError(ValueError):
    """Raised when a run config has an unknown key, a value of the wrong type or out of range."""


class ConfigKey(NamedTuple):
    """Type, default and help text of one run config key."""

    type: type
    default: Any
    help: str


SCHEMA: dict[str, ConfigKey] = {
    "consortium": ConfigKey(
        str,
        "demo-output/consortium",
        "Consortium folder that the sites read their site.toml files from (path).",
    ),
    "task": ConfigKey(str, "lab-forecast", f"Twin submodel to train: {', '.join(TASKS)}."),
    "num-server-rounds": ConfigKey(int, 3, "Last server round to run (count, at least 1)."),
    "run-name": ConfigKey(
        str,
        "",
        "Name of the run folder under runs-dir; empty means <task>-<first 8 hex digits of "
        "the feature spec SHA-256>.",
    ),
    "runs-dir": ConfigKey(str, "runs", "Folder that holds one checkpoint folder per run (path)."),
    "spec": ConfigKey(
        str, "", "Feature spec TOML file (path); empty means the spec packaged with models/."
    ),
    "strategy": ConfigKey(str, "fedavg", f"Aggregation rule: {', '.join(STRATEGIES)}."),
    "proximal-mu": ConfigKey(
        float,
        0.01,
        "Weight of the FedProx proximal term mu/2 * ||w - w_global||^2 that sites add to "
        "their loss; sent only with strategy fedprox (at least 0).",
    ),
    "server-learning-rate": ConfigKey(
        float, 0.05, "Step size of the FedAdam server optimizer (greater than 0)."
    ),
    "trim-fraction": ConfigKey(
        float,
        0.2,
        "Fraction of updates dropped at each end, per coordinate, by trimmed-mean "
        "(0 to below 0.5).",
    ),
    "fraction-train": ConfigKey(
        float, 1.0, "Fraction of connected sites sampled for training each round (0 to 1]."
    ),
    "min-sites": ConfigKey(
        int, 1, "Sites that must be connected before a round starts (count, at least 1)."
    ),
    "round-timeout": ConfigKey(
        float,
        3600.0,
        "Seconds the coordinator waits for the sites' replies in each train and each evaluate "
        "step; a site that has not replied by then is left out of that step (greater than 0).",
    ),
    "local-epochs": ConfigKey(
        int, 1, "Passes over the local patients per round at each site (count, at least 1)."
    ),
    "learning-rate": ConfigKey(
        float, 0.1, "Learning rate of the sites' local optimizer (greater than 0)."
    ),
    "noise-multiplier": ConfigKey(
        float,
        1.0,
        "DP-SGD noise standard deviation divided by max-grad-norm (at least 0); a site "
        "policy may raise it to its own minimum.",
    ),
    "max-grad-norm": ConfigKey(
        float, 1.0, "DP-SGD clipping bound of each patient's gradient (L2 norm, greater than 0)."
    ),
    "sample-rate": ConfigKey(
        float,
        0.5,
        "Poisson sampling probability of each patient per DP-SGD step (0 to 1].",
    ),
    "target-epsilon-per-round": ConfigKey(
        float,
        0.0,
        "If greater than 0, each site picks the noise multiplier that spends at most this "
        "epsilon per round at its own delta; 0 uses noise-multiplier as sent.",
    ),
    "max-update-norm": ConfigKey(
        float,
        0.0,
        "Largest accepted L2 norm of a site update (w_site - w_global); 0 rejects updates "
        "above 10 times the median norm of the round's other updates (with 3 or more updates).",
    ),
    "seed": ConfigKey(int, 0, "Seed of site sampling and of the sites' model initialisation."),
    "secure-aggregation": ConfigKey(
        bool,
        False,
        "Aggregate with Flower's SecAgg+ protocol, so the coordinator sees only the sum of the "
        "sites' updates; per-update validation is then impossible.",
    ),
    "secagg-num-shares": ConfigKey(
        float,
        1.0,
        "SecAgg+ shares of each site's secret key: a fraction (0 to 1] of the sampled sites, or "
        "a whole count of at least 3.",
    ),
    "secagg-reconstruction-threshold": ConfigKey(
        float,
        0.5,
        "SecAgg+ shares needed to rebuild a secret: a fraction (0 to 1] of secagg-num-shares, "
        "or a whole count of at least 2 below secagg-num-shares.",
    ),
    "secagg-clipping-range": ConfigKey(
        float,
        8.0,
        "SecAgg+ clips each patient-weighted update coordinate to [-range, range] before "
        "quantization (greater than 0).",
    ),
    "secagg-quantization-range": ConfigKey(
        int,
        4194304,
        "SecAgg+ quantization levels of one coordinate (count, 2 to 2**30).",
    ),
    "secagg-max-weight": ConfigKey(
        float,
        1000.0,
        "SecAgg+ weight scale: a site's update is multiplied by its patients divided by this "
        "value before clipping (patients, greater than 0).",
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """Typed run config; each field is the snake_case form of a key in `SCHEMA`."""

    consortium: str = SCHEMA["consortium"].default
    task: str = SCHEMA["task"].default
    num_server_rounds: int = SCHEMA["num-server-rounds"].default
    run_name: str = SCHEMA["run-name"].default
    runs_dir: str = SCHEMA["runs-dir"].default
    spec: str = SCHEMA["spec"].default
    strategy: str = SCHEMA["strategy"].default
    proximal_mu: float = SCHEMA["proximal-mu"].default
    server_learning_rate: float = SCHEMA["server-learning-rate"].default
    trim_fraction: float = SCHEMA["trim-fraction"].default
    fraction_train: float = SCHEMA["fraction-train"].default
    min_sites: int = SCHEMA["min-sites"].default
    round_timeout: float = SCHEMA["round-timeout"].default
    local_epochs: int = SCHEMA["local-epochs"].default
    learning_rate: float = SCHEMA["learning-rate"].default
    noise_multiplier: float = SCHEMA["noise-multiplier"].default
    max_grad_norm: float = SCHEMA["max-grad-norm"].default
    sample_rate: float = SCHEMA["sample-rate"].default
    target_epsilon_per_round: float = SCHEMA["target-epsilon-per-round"].default
    max_update_norm: float = SCHEMA["max-update-norm"].default
    seed: int = SCHEMA["seed"].default
    secure_aggregation: bool = SCHEMA["secure-aggregation"].default
    secagg_num_shares: float = SCHEMA["secagg-num-shares"].default
    secagg_reconstruction_threshold: float = SCHEMA["secagg-reconstruction-threshold"].default
    secagg_clipping_range: float = SCHEMA["secagg-clipping-range"].default
    secagg_quantization_range: int = SCHEMA["secagg-quantization-range"].default
    secagg_max_weight: float = SCHEMA["secagg-max-weight"].default

    def to_dict(self) -> dict[str, Any]:
        """Return the config with its kebab-case keys, as pyproject.toml spells them."""
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}


def _convert(key: str, value: Any, expected: type) -> Any:
    """Convert one raw value (TOML scalar or command-line string) to the schema's type."""
    if expected is bool:
        return _convert_bool(key, value)

    if isinstance(value, bool):
        msg = f"Run config key {key!r} must be a {expected.__name__}, got the boolean {value!r}."
        raise RunConfigError(msg)

    if expected is str:
        if isinstance(value, str):
            return value
        msg = f"Run config key {key!r} must be a string, got {value!r}; quote the value."
        raise RunConfigError(msg)

    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, int | float) or not math.isfinite(number):
        msg = f"Run config key {key!r} must be a finite {expected.__name__}, got {value!r}."
        raise RunConfigError(msg)

    if expected is int:
        if float(number) != int(number):
            msg = f"Run config key {key!r} must be a whole number, got {value!r}."
            raise RunConfigError(msg)
        return int(number)
    return float(number)


def _convert_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    msg = f"Run config key {key!r} must be true or false, got {value!r}."
    raise RunConfigError(msg)


def _share_setting_valid(value: float, minimum: int) -> bool:
    """Check that a SecAgg+ share setting is a fraction in (0, 1] or a whole count >= minimum."""
    if 0.0 < value <= 1.0:
        return True
    return value >= minimum and float(value).is_integer()


def _check_secure_aggregation(config: RunConfig) -> list[tuple[str, bool, str]]:
    """Return the range checks of the secagg-* keys and of the keys secure aggregation excludes."""
    checks: list[tuple[str, bool, str]] = [
        (
            "secagg-num-shares",
            _share_setting_valid(config.secagg_num_shares, 3),
            "a fraction greater than 0 and at most 1, or a whole number of at least 3",
        ),
        (
            "secagg-reconstruction-threshold",
            _share_setting_valid(config.secagg_reconstruction_threshold, 2),
            "a fraction greater than 0 and at most 1, or a whole number of at least 2",
        ),
        ("secagg-clipping-range", config.secagg_clipping_range > 0.0, "greater than 0"),
        (
            "secagg-quantization-range",
            2 <= config.secagg_quantization_range <= 2**30,
            "at least 2 and at most 2**30",
        ),
        ("secagg-max-weight", config.secagg_max_weight > 0.0, "greater than 0"),
    ]
    if config.secagg_num_shares > 1.0 and config.secagg_reconstruction_threshold > 1.0:
        checks.append(
            (
                "secagg-reconstruction-threshold",
                config.secagg_reconstruction_threshold < config.secagg_num_shares,
                "below secagg-num-shares",
            )
        )
    if config.secure_aggregation:
        # The coordinator receives only the sum, so rules and bounds that need each update
        # cannot apply.
        checks.append(
            (
                "strategy",
                config.strategy != "trimmed-mean",
                "fedavg, fedprox or fedadam when secure-aggregation is true (trimmed-mean "
                "needs each site's update)",
            )
        )
        checks.append(
            (
                "max-update-norm",
                config.max_update_norm == 0.0,
                "0 when secure-aggregation is true (the coordinator cannot see single updates "
                "to bound their norm)",
            )
        )
    return checks


def _check_range(config: RunConfig) -> None:
    """Raise RunConfigError naming the first key whose value is out of its range."""
    checks: list[tuple[str, bool, str]] = [
        ("task", config.task in TASKS, f"one of {', '.join(TASKS)}"),
        ("strategy", config.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        ("num-server-rounds", config.num_server_rounds >= 1, "at least 1"),
        ("min-sites", config.min_sites >= 1, "at least 1"),
        ("round-timeout", config.round_timeout > 0.0, "greater than 0"),
        ("local-epochs", config.local_epochs >= 1, "at least 1"),
        ("seed", config.seed >= 0, "at least 0"),
        ("proximal-mu", config.proximal_mu >= 0.0, "at least 0"),
        ("server-learning-rate", config.server_learning_rate > 0.0, "greater than 0"),
        ("trim-fraction", 0.0 <= config.trim_fraction < 0.5, "at least 0 and below 0.5"),
        ("fraction-train", 0.0 < config.fraction_train <= 1.0, "greater than 0 and at most 1"),
        ("learning-rate", config.learning_rate > 0.0, "greater than 0"),
        ("noise-multiplier", config.noise_multiplier >= 0.0, "at least 0"),
        ("max-grad-norm", config.max_grad_norm > 0.0, "greater than 0"),
        ("sample-rate", 0.0 < config.sample_rate <= 1.0, "greater than 0 and at most 1"),
        ("target-epsilon-per-round", config.target_epsilon_per_round >= 0.0, "at least 0"),
        ("max-update-norm", config.max_update_norm >= 0.0, "at least 0"),
        ("runs-dir", config.runs_dir.strip() != "", "a non-empty path"),
        (
            "run-name",
            config.run_name == "" or _RUN_NAME_PATTERN.fullmatch(config.run_name) is not None,
            "empty or letters, digits, '.', '_' and '-' starting with a letter or digit",
        ),
    ]
    checks.extend(_check_secure_aggregation(config))
    for key, valid, expected in checks:
        if not valid:
            value = config.to_dict()[key]
            msg = f"Run config key {key!r} is {value!r}; it must be {expected}."
            raise RunConfigError(msg)


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Parse a raw run config into a checked `RunConfig`.

    Parameters
    ----------
    raw
        Kebab-case keys of `SCHEMA` mapped to TOML scalars or strings, such as
        Flower's `context.run_config`. Missing keys take their default.

    Returns
    -------
    RunConfig
        The typed config.

    Raises
    ------
    RunConfigError
        If a key is unknown, a value cannot be converted to its type, or a value is
        out of its range. The message names the key.
    """
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        msg = (
            f"Unknown run config key(s) {', '.join(repr(k) for k in unknown)}; "
            f"valid keys: {', '.join(SCHEMA)}."
        )
        raise RunConfigError(msg)

    values: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        value = raw.get(key, spec.default)
        values[key.replace("-", "_")] = _convert(key, value, spec.type)

    config = RunConfig(**values)
    _check_range(config)
    return config
