"""Persistent privacy accountant: a site's DP-SGD history per task, kept on disk across runs.

The privacy unit is the patient: each DP-SGD sample is one patient's whole record. Opacus'
`RDPAccountant` (default) or `PRVAccountant` computes ε from the full stored history, so ε is
cumulative over every round the site has trained for the task, and a restart reads the same history.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "PRIVACY_UNIT",
    "SECURE_RNG",
    "AccountantStateError",
    "AccountantStore",
    "RoundPrivacy",
    "accountant_label",
    "epsilon_of_history",
    "site_histories",
    "state_file",
    "validate_delta",
    "validate_mechanism",
    "validate_sampling",
]

logger = logging.getLogger(__name__)

# Noise and Poisson sampling use torch's default PRNG, because Opacus' secure_mode needs
# torchcsprng, which is not installed. Reports state this flag beside every ε.
SECURE_RNG = False

PRIVACY_UNIT = "patient"
ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
DEFAULT_ACCOUNTANT = "rdp"

_FORMAT = "fedtwin-accountant"
_VERSION = 1
_TASK_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AccountantStateError(ValueError):
    """Raised when a stored accountant file is invalid, instead of resetting ε to zero."""


@dataclass(frozen=True)
class RoundPrivacy:
    """The privacy cost of one local training round, as recorded in the accountant file.

    Attributes
    ----------
    run_name
        Name of the federated run that requested the round.
    server_round
        Round number the coordinator sent.
    noise_multiplier
        Ratio of the Gaussian noise's standard deviation to `max_grad_norm`.
    sample_rate
        Poisson sampling probability of each patient per step.
    steps
        Noisy optimizer steps taken in the round.
    epsilon_round
        ε of this round alone at `delta`.
    epsilon_total
        ε of the whole history up to and including this round at `delta`.
    delta
        δ at which both ε values were computed.
    accountant
        `rdp` or `prv`.
    privacy_unit
        Always `patient`: one dataset row is one patient's whole record.
    recorded_at
        UTC time of the record, ISO 8601.
    """

    run_name: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    accountant: str
    privacy_unit: str
    recorded_at: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable form, with an infinite ε as null."""
        content = asdict(self)
        for key in ("epsilon_round", "epsilon_total"):
            if not math.isfinite(content[key]):
                content[key] = None
        return content


def accountant_label(accountant: str) -> str:
    """Return the display name of an accountant kind, such as `RDP`."""
    return accountant.upper()


def validate_mechanism(*, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """Raise ValueError unless the parameters form a valid Poisson-subsampled Gaussian mechanism."""
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        msg = f"noise_multiplier must be a positive number, got {noise_multiplier}."
        raise ValueError(msg)
    validate_sampling(sample_rate=sample_rate, steps=steps)


def validate_sampling(*, sample_rate: float, steps: int) -> None:
    """Raise ValueError unless 0 < sample_rate <= 1 and steps is a positive integer."""
    if not math.isfinite(sample_rate) or not 0 < sample_rate <= 1:
        msg = f"sample_rate must be in (0, 1], got {sample_rate}."
        raise ValueError(msg)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive integer, got {steps!r}."
        raise ValueError(msg)


def validate_delta(delta: float) -> None:
    """Raise ValueError unless 0 < δ < 1."""
    if not math.isfinite(delta) or not 0 < delta < 1:
        msg = f"delta must be in (0, 1), got {delta}; use 1 / (10 x patients) when unsure."
        raise ValueError(msg)


def _validate_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        msg = f"accountant {accountant!r} is not supported; use one of {', '.join(ACCOUNTANTS)}."
        raise ValueError(msg)


def _epsilon_of(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Compute ε at `delta` of a (noise_multiplier, sample_rate, steps) history with Opacus."""
    return _cached_epsilon(accountant, tuple(history), delta)


def epsilon_of_history(
    accountant: str, history: list[tuple[float, float, int]], delta: float
) -> float:
    """Compute ε at `delta` of a (noise_multiplier, sample_rate, steps) history with Opacus.

    Both Opacus accountants compose every entry of the list, so the history of several tasks
    trained on the same patients, concatenated, gives their ε together.
    """
    _validate_accountant(accountant)
    validate_delta(delta)
    return _epsilon_of(accountant, history, delta)


def site_histories(state_dir: Path) -> dict[str, list[tuple[float, float, int]]]:
    """Read the DP-SGD history of every task in a site's state folder, keyed by task.

    Raises
    ------
    AccountantStateError
        When any accountant file is invalid, because the site's total ε cannot be known then.
    """
    histories: dict[str, list[tuple[float, float, int]]] = {}
    for path in sorted(Path(state_dir).glob("accountant-*.json")):
        task = path.stem.removeprefix("accountant-")
        histories[task] = AccountantStore(state_dir, task).history
    return histories


def _merge_equal_mechanisms(
    history: list[tuple[float, float, int]],
) -> list[tuple[float, float, int]]:
    """Sum the steps of entries with the same noise_multiplier and sample_rate.

    RDP composes additively: T steps of one subsampled Gaussian mechanism have T times its
    RDP at every order. So the merged history gives the same ε up to floating-point rounding,
    and each evaluation costs one entry per distinct mechanism instead of one per round.
    """
    steps: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, num_steps in history:
        key = (noise_multiplier, sample_rate)
        steps[key] = steps.get(key, 0) + num_steps
    return [(noise, rate, total) for (noise, rate), total in steps.items()]


# One RDP evaluation took about 0.2 s per history entry on a 2-core x86 VM, and one round computes
# ε of the same history several times (budget check, record, report), so results are cached.
@functools.lru_cache(maxsize=256)
def _cached_epsilon(
    accountant: str, history: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    if not history:
        return 0.0
    entries = list(history)
    if accountant == "rdp":
        entries = _merge_equal_mechanisms(entries)
    opacus_accountant = ACCOUNTANTS[accountant]()
    opacus_accountant.history = entries
    return float(opacus_accountant.get_epsilon(delta=delta))


def state_file(state_dir: Path, task: str) -> Path:
    """Return the path of the accountant file of `task` in a site's state folder."""
    if not _TASK_PATTERN.match(task):
        msg = (
            f"task name {task!r} is invalid; use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
        raise ValueError(msg)
    return Path(state_dir) / f"accountant-{task}.json"


class AccountantStore:
    """The accountant state of one task at one site, stored as `<state_dir>/accountant-<task>.json`.

    Parameters
    ----------
    state_dir
        The site's state folder, created when the first round is recorded.
    task
        Task name, such as `lab-forecast`.
    accountant
        `rdp` or `prv`. None uses the kind stored in the file, or `rdp` for a new file. A kind that
        differs from the stored one raises `AccountantStateError`, because the past rounds were
        reported with the stored one.

    Raises
    ------
    AccountantStateError
        When the file exists but is not a valid accountant state. The store never starts from an
        empty history in that case, since that would reset the site's ε to zero.
    """

    def __init__(self, state_dir: Path, task: str, *, accountant: str | None = None) -> None:
        self.path = state_file(state_dir, task)
        self.task = task
        if accountant is not None:
            _validate_accountant(accountant)

        self._history: list[tuple[float, float, int]] = []
        self._rounds: list[RoundPrivacy] = []
        stored = self._load()
        if stored is None:
            self.accountant = accountant or DEFAULT_ACCOUNTANT
            return

        stored_accountant, self._history, self._rounds = stored
        if accountant is not None and accountant != stored_accountant:
            msg = (
                f"{self.path}: stored accountant is {stored_accountant!r} but {accountant!r} was "
                f"requested; keep accountant={stored_accountant!r} for this task, since its past "
                "rounds were reported with it."
            )
            raise AccountantStateError(msg)
        self.accountant = stored_accountant

    # ------------------------------------------------------------------ queries

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The stored (noise_multiplier, sample_rate, steps) entries, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total noisy optimizer steps over all recorded rounds."""
        return sum(entry[2] for entry in self._history)

    def rounds(self) -> list[RoundPrivacy]:
        """Return the recorded rounds, oldest first."""
        return list(self._rounds)

    def epsilon(self, delta: float) -> float:
        """Compute the cumulative ε at `delta` over every recorded round (0.0 before the first)."""
        validate_delta(delta)
        return _epsilon_of(self.accountant, self._history, delta)

    def projected_epsilon(
        self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Compute the cumulative ε at `delta` that the history would reach after one more round."""
        validate_delta(delta)
        validate_mechanism(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        history = _merged(self._history, (noise_multiplier, sample_rate, steps))
        return _epsilon_of(self.accountant, history, delta)

    @staticmethod
    def round_epsilon(
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str = DEFAULT_ACCOUNTANT,
    ) -> float:
        """Compute ε at `delta` of one round alone, ignoring any stored history."""
        _validate_accountant(accountant)
        validate_delta(delta)
        validate_mechanism(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return _epsilon_of(accountant, [(noise_multiplier, sample_rate, steps)], delta)

    # ------------------------------------------------------------------ updates

    def record(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        run_name: str,
        server_round: int,
    ) -> RoundPrivacy:
        """Append one trained round to the history and write the file atomically.

        The file is re-read under an exclusive lock first, so a round that another process recorded
        in the same state folder is kept.
        """
        validate_delta(delta)
        validate_mechanism(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

        with self._locked():
            stored = self._load()
            if stored is not None:
                _, self._history, self._rounds = stored

            self._history = _merged(self._history, (noise_multiplier, sample_rate, steps))
            entry = RoundPrivacy(
                run_name=run_name,
                server_round=int(server_round),
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=steps,
                epsilon_round=self.round_epsilon(
                    noise_multiplier=noise_multiplier,
                    sample_rate=sample_rate,
                    steps=steps,
                    delta=delta,
                    accountant=self.accountant,
                ),
                epsilon_total=_epsilon_of(self.accountant, self._history, delta),
                delta=float(delta),
                accountant=self.accountant,
                privacy_unit=PRIVACY_UNIT,
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._rounds.append(entry)
            self._write()

        logger.debug("Recorded round %d of task %s in %s", server_round, self.task, self.path)
        return entry

    # ------------------------------------------------------------------ file I/O

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self) -> None:
        content = {
            "format": _FORMAT,
            "version": _VERSION,
            "task": self.task,
            "accountant": self.accountant,
            "privacy_unit": PRIVACY_UNIT,
            "history": [list(entry) for entry in self._history],
            "rounds": [entry.to_json() for entry in self._rounds],
        }
        text = json.dumps(content, indent=2, allow_nan=False) + "\n"

        # Write a temporary file in the same folder, flush it to disk, then rename it over the old
        # file, so a crash leaves either the old or the new state and never a partial one.
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def _load(self) -> tuple[str, list[tuple[float, float, int]], list[RoundPrivacy]] | None:
        if not self.path.exists():
            return None
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"cannot be read as JSON ({err})"
            raise self._error(problem) from err
        return self._parse(content)

    def _error(self, problem: str) -> AccountantStateError:
        msg = (
            f"{self.path}: accountant state {problem}. Restore the file from a backup; deleting it "
            "would reset the task's ε to zero and void the site's privacy accounting."
        )
        return AccountantStateError(msg)

    def _parse(
        self, content: Any
    ) -> tuple[str, list[tuple[float, float, int]], list[RoundPrivacy]]:
        if not isinstance(content, dict) or content.get("format") != _FORMAT:
            problem = f"is not a {_FORMAT} file (missing or wrong 'format')"
            raise self._error(problem)
        if content.get("version") != _VERSION:
            problem = f"has version {content.get('version')!r}, expected {_VERSION}"
            raise self._error(problem)
        if content.get("task") != self.task:
            problem = f"is for task {content.get('task')!r}, expected {self.task!r}"
            raise self._error(problem)
        accountant = content.get("accountant")
        if accountant not in ACCOUNTANTS:
            problem = f"names unknown accountant {accountant!r}"
            raise self._error(problem)

        history: list[tuple[float, float, int]] = []
        for index, entry in enumerate(_list_field(content, "history", self._error)):
            try:
                noise_multiplier, sample_rate, steps = entry
                validate_mechanism(
                    noise_multiplier=float(noise_multiplier),
                    sample_rate=float(sample_rate),
                    steps=steps,
                )
            except (TypeError, ValueError) as err:
                problem = f"has an invalid history[{index}] {entry!r} ({err})"
                raise self._error(problem) from err
            history.append((float(noise_multiplier), float(sample_rate), int(steps)))

        rounds: list[RoundPrivacy] = []
        for index, entry in enumerate(_list_field(content, "rounds", self._error)):
            try:
                rounds.append(_parse_round(entry))
            except (KeyError, TypeError, ValueError) as err:
                problem = f"has an invalid rounds[{index}] ({err!r})"
                raise self._error(problem) from err

        if sum(entry[2] for entry in history) != sum(entry.steps for entry in rounds):
            problem = "has history steps that do not match the steps of its rounds"
            raise self._error(problem)
        return accountant, history, rounds


def _list_field(content: dict[str, Any], key: str, error: Any) -> list[Any]:
    value = content.get(key)
    if not isinstance(value, list):
        problem = f"has no list '{key}'"
        raise error(problem)
    return value


def _parse_round(entry: dict[str, Any]) -> RoundPrivacy:
    def epsilon(value: Any) -> float:
        return math.inf if value is None else float(value)

    return RoundPrivacy(
        run_name=str(entry["run_name"]),
        server_round=int(entry["server_round"]),
        noise_multiplier=float(entry["noise_multiplier"]),
        sample_rate=float(entry["sample_rate"]),
        steps=int(entry["steps"]),
        epsilon_round=epsilon(entry["epsilon_round"]),
        epsilon_total=epsilon(entry["epsilon_total"]),
        delta=float(entry["delta"]),
        accountant=str(entry["accountant"]),
        privacy_unit=str(entry["privacy_unit"]),
        recorded_at=str(entry["recorded_at"]),
    )


def _merged(
    history: list[tuple[float, float, int]], entry: tuple[float, float, int]
) -> list[tuple[float, float, int]]:
    """Append `entry`, merging it into the last entry when noise_multiplier and sample_rate match.

    Both accountants compose identical steps the same way whether they are listed once or in parts,
    and fewer distinct entries keep the PRV accountant fast.
    """
    noise_multiplier, sample_rate, steps = float(entry[0]), float(entry[1]), int(entry[2])
    merged = list(history)
    if merged and merged[-1][0] == noise_multiplier and merged[-1][1] == sample_rate:
        merged[-1] = (noise_multiplier, sample_rate, merged[-1][2] + steps)
    else:
        merged.append((noise_multiplier, sample_rate, steps))
    return merged
