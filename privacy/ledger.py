"""A site's privacy ledger: append-only JSON Lines, hash-chained and signed with the site's key.

`<state_dir>/ledger.jsonl` contains one JSON object per line, one per trained or refused round.
Each entry carries `seq` (0, 1, 2, …), `prev_hash` (SHA-256 hex of the previous entry, 64 zeros
for the first), `key_id` (fingerprint of the signing key) and `signature`: the base64 Ed25519
signature of the entry's canonical JSON without `signature`. An entry's hash is the SHA-256 of
the canonical JSON of the whole signed entry. Canonical JSON is `json.dumps(entry,
sort_keys=True, separators=(",", ":"), ensure_ascii=True)`, so any JSON reader and Ed25519
library can check a ledger without fedtwin.

An append is one `write` of a whole line to a file opened with `O_APPEND`, then `fsync`, under
an exclusive `fcntl` lock. An entry is acknowledged when `append` returns, and a crash after that
cannot lose it. A crash during the write can leave a torn last line: `verify_ledger` reports it, and
the next `append` moves the torn bytes to `ledger.jsonl.torn` with a warning before writing.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.keys import key_id, load_or_create_private_key, verify_signature

__all__ = [
    "GENESIS_HASH",
    "LEDGER_FILE",
    "LedgerError",
    "LedgerProblem",
    "LedgerRecord",
    "LedgerVerification",
    "SiteLedger",
    "canonical_json",
    "entry_hash",
    "read_entries",
    "verify_ledger",
]

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"
LEDGER_VERSION = 1
GENESIS_HASH = "0" * 64
_CHAIN_FIELDS = ("seq", "prev_hash", "key_id", "signature")


class LedgerError(ValueError):
    """Raised when a ledger cannot be read or appended to."""


@dataclass(frozen=True)
class LedgerRecord:
    """The privacy facts of one trained or refused round, before the ledger chains and signs them.

    Every ε is (ε, δ)-DP at `delta` under `accountant`, per `privacy_unit`; None stands for an
    infinite ε.

    Attributes
    ----------
    kind
        `round` for a trained round, `refusal` for a round the site rejected.
    site
        The site's name.
    run_id
        Name of the federated run that requested the round.
    round
        Server round number.
    task
        Task name.
    model_version
        Model class and a hash of its parameter names and shapes, such as `CrsRiskNet@1a2b3c4d5e6f`.
    feature_spec_sha256
        SHA-256 of the consortium feature spec.
    patients
        Training patients, rounded down to a multiple of `patients_rounding`.
    sample_rate, steps, noise_multiplier, max_grad_norm
        The DP-SGD settings of the round (requested ones for a refusal).
    accountant
        `rdp` or `prv` (Opacus `RDPAccountant` or `PRVAccountant`).
    delta
        δ of every ε in the entry.
    epsilon_round
        ε spent by this round alone; 0.0 for a refusal.
    epsilon_total
        Cumulative ε of the task at the site after this round.
    epsilon_all_tasks
        Cumulative ε over every task of the site after this round.
    epsilon_projected
        For a refusal, the cumulative ε of the task that the round would have reached, if computed.
    secure_rng
        Whether the noise came from a cryptographically secure generator.
    reason
        For a refusal, why; empty for a trained round.
    rule
        For a refusal, the policy rule that rejected it (see `privacy.budget.BudgetDecision`).
    policy
        The policy fields in force, with their file keys.
    timestamp
        UTC time, ISO 8601.
    """

    kind: str
    site: str
    run_id: str
    round: int
    task: str
    model_version: str
    feature_spec_sha256: str
    privacy_unit: str
    patients: int
    patients_rounding: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon_round: float | None
    epsilon_total: float | None
    epsilon_all_tasks: float | None
    secure_rng: bool
    epsilon_projected: float | None = None
    reason: str = ""
    rule: str = ""
    policy: dict[str, Any] = field(default_factory=dict)
    timestamp: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return the record as JSON values, with a non-finite ε as null and a UTC timestamp."""
        content = asdict(self)
        for key in ("epsilon_round", "epsilon_total", "epsilon_all_tasks", "epsilon_projected"):
            value = content[key]
            if value is not None and not math.isfinite(value):
                content[key] = None
        if not content["timestamp"]:
            content["timestamp"] = datetime.now(UTC).isoformat(timespec="seconds")
        content["version"] = LEDGER_VERSION
        return content


def canonical_json(entry: Mapping[str, Any]) -> bytes:
    """Serialise an entry the one way that its hash and signature are computed over."""
    text = json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _signed_part(entry: Mapping[str, Any]) -> bytes:
    return canonical_json({key: value for key, value in entry.items() if key != "signature"})


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex of the canonical JSON of a signed entry."""
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def _split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a ledger's bytes into its complete lines and the torn bytes after the last newline."""
    *lines, tail = data.split(b"\n")
    return lines, tail


class SiteLedger:
    """The ledger of one site, in its state folder, signed with the site key kept there.

    Parameters
    ----------
    state_dir
        The site's state folder; the ledger, `site-key.pem` (mode 0600) and `site-key.pub` are
        created in it on the first append.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self._private_key: Ed25519PrivateKey | None = None

    def _key(self) -> Ed25519PrivateKey:
        if self._private_key is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._private_key = load_or_create_private_key(self.state_dir)
        return self._private_key

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half of the site key (the key is created on first use)."""
        return self._key().public_key()

    def entries(self) -> list[dict[str, Any]]:
        """Return the ledger's complete entries, oldest first, without verifying them."""
        return read_entries(self.path)

    def prepare(self) -> None:
        """Load or create the site key and repair a torn last line, ready for the next append.

        Raises
        ------
        LedgerError
            When the last complete line is not a valid entry.
        """
        self._key()
        with self._locked():
            self._last_entry_after_repair()

    def append(self, record: LedgerRecord) -> dict[str, Any]:
        """Chain, sign and durably append one record; return the signed entry.

        The entry is on disk (`fsync`) when this returns. A torn last line left by an earlier crash
        is moved to `ledger.jsonl.torn` first, with a warning.

        Raises
        ------
        LedgerError
            When the last complete line is not a valid entry, since chaining onto it would hide the
            damage.
        """
        private_key = self._key()
        with self._locked():
            previous = self._last_entry_after_repair()
            content = record.to_json()
            content["seq"] = 0 if previous is None else int(previous["seq"]) + 1
            content["prev_hash"] = GENESIS_HASH if previous is None else entry_hash(previous)
            content["key_id"] = key_id(private_key.public_key())
            signature = private_key.sign(_signed_part(content))
            content["signature"] = base64.b64encode(signature).decode("ascii")
            self._write_line(canonical_json(content) + b"\n")

        logger.debug(
            "Appended ledger entry %d (%s, task %s, round %d) to %s",
            content["seq"],
            record.kind,
            record.task,
            record.round,
            self.path,
        )
        return content

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _last_entry_after_repair(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        lines, tail = _split_lines(data)
        if tail:
            self._move_torn_tail(len(data) - len(tail), tail)
        if not lines:
            return None
        try:
            entry = json.loads(lines[-1])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = (
                f"{self.path}: line {len(lines)} is not valid JSON ({err}); run "
                "`fedtwin-steward verify` and restore the ledger from a backup before training."
            )
            raise LedgerError(msg) from err
        if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
            msg = f"{self.path}: line {len(lines)} is not a ledger entry (no integer 'seq')."
            raise LedgerError(msg)
        return entry

    def _move_torn_tail(self, offset: int, tail: bytes) -> None:
        # The torn bytes were never acknowledged, so cutting them loses no entry; they are kept
        # beside the ledger for the steward.
        torn_path = self.path.with_name(self.path.name + ".torn")
        with torn_path.open("ab") as file:
            file.write(tail + b"\n")
            file.flush()
            os.fsync(file.fileno())
        with self.path.open("r+b") as file:
            file.truncate(offset)
            file.flush()
            os.fsync(file.fileno())
        logger.warning(
            "%s ended in a torn line of %d bytes (an interrupted append); moved it to %s",
            self.path,
            len(tail),
            torn_path,
        )

    def _write_line(self, line: bytes) -> None:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, line)
            if written != len(line):
                msg = f"{self.path}: short write ({written} of {len(line)} bytes); disk full?"
                raise LedgerError(msg)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_entries(path: str | Path) -> list[dict[str, Any]]:
    """Read a ledger's complete JSON lines without verifying them.

    Raises
    ------
    LedgerError
        When the file is missing or a complete line is not a JSON object.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError as err:
        msg = f"{file}: ledger not found; a site's ledger is <state-dir>/{LEDGER_FILE}."
        raise LedgerError(msg) from err
    except OSError as err:
        msg = f"{file}: ledger cannot be read ({err.strerror})."
        raise LedgerError(msg) from err

    lines, _ = _split_lines(data)
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"{file}: line {number} is not valid JSON ({err})."
            raise LedgerError(msg) from err
        if not isinstance(entry, dict):
            msg = f"{file}: line {number} is not a JSON object."
            raise LedgerError(msg)
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class LedgerProblem:
    """The first entry that fails verification.

    Attributes
    ----------
    line
        1-based line number in the ledger file.
    kind
        `torn`, `corrupt`, `malformed`, `wrong-key`, `edited`, `bad-signature`, `dropped`,
        `reordered` or `chain`.
    message
        One line naming the entry and why it fails.
    """

    line: int
    kind: str
    message: str


@dataclass(frozen=True)
class LedgerVerification:
    """Result of `verify_ledger`: the entries read and the first problem, if any."""

    path: Path
    entries: list[dict[str, Any]]
    problem: LedgerProblem | None

    @property
    def intact(self) -> bool:
        """True when every entry verified and the file ends with a complete line."""
        return self.problem is None


def _decode_signature(entry: Mapping[str, Any]) -> bytes | None:
    value = entry.get("signature")
    if not isinstance(value, str):
        return None
    try:
        signature = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return signature if len(signature) == 64 else None


def _signature_owner(
    public_key: Ed25519PublicKey, signature: bytes, entries: list[dict[str, Any]], skip: int
) -> int | None:
    """Return the index of another entry whose content `signature` signs, if any."""
    for index, other in enumerate(entries):
        if index != skip and verify_signature(public_key, signature, _signed_part(other)):
            return index
    return None


def _sequence_problem(entries: list[dict[str, Any]], index: int, line: int) -> LedgerProblem | None:
    seq = entries[index]["seq"]
    if seq == index:
        return None
    later = {entry.get("seq") for entry in entries[index + 1 :]}
    if seq > index and index not in later:
        message = (
            f"line {line}: entry seq {seq} follows entry seq {index - 1}, so entries "
            f"{index}..{seq - 1} were dropped"
        )
        return LedgerProblem(line, "dropped", message)
    message = (
        f"line {line}: entry seq {seq} stands where entry seq {index} belongs, so entries were "
        "reordered or duplicated"
    )
    return LedgerProblem(line, "reordered", message)


def _entry_problem(
    entries: list[dict[str, Any]], index: int, public_key: Ed25519PublicKey, expected_key: str
) -> LedgerProblem | None:
    """Check one parsed entry: fields, key, signature, position and chain link."""
    entry = entries[index]
    line = index + 1
    missing = [name for name in _CHAIN_FIELDS if name not in entry]
    if missing or not isinstance(entry.get("seq"), int):
        message = f"line {line}: not a ledger entry (missing {', '.join(missing) or 'integer seq'})"
        return LedgerProblem(line, "malformed", message)

    if entry["key_id"] != expected_key:
        message = (
            f"line {line}: entry seq {entry['seq']} is signed by key {entry['key_id']}, but the "
            f"public key given is {expected_key}: a ledger of another site, or the wrong "
            "site-key.pub"
        )
        return LedgerProblem(line, "wrong-key", message)

    signature = _decode_signature(entry)
    if signature is None:
        message = f"line {line}: entry seq {entry['seq']} has no valid base64 Ed25519 signature"
        return LedgerProblem(line, "bad-signature", message)
    if not verify_signature(public_key, signature, _signed_part(entry)):
        owner = _signature_owner(public_key, signature, entries, index)
        if owner is not None:
            message = (
                f"line {line}: entry seq {entry['seq']} carries the signature of the entry on "
                f"line {owner + 1} (signature swapped)"
            )
            return LedgerProblem(line, "bad-signature", message)
        message = (
            f"line {line}: entry seq {entry['seq']} does not match its signature (edited after "
            "it was signed)"
        )
        return LedgerProblem(line, "edited", message)

    sequence = _sequence_problem(entries, index, line)
    if sequence is not None:
        return sequence

    expected_prev = GENESIS_HASH if index == 0 else entry_hash(entries[index - 1])
    if entry["prev_hash"] != expected_prev:
        message = (
            f"line {line}: entry seq {entry['seq']} does not chain to the entry before it "
            "(prev_hash differs): an earlier entry was replaced"
        )
        return LedgerProblem(line, "chain", message)
    return None


def verify_ledger(path: str | Path, public_key: Ed25519PublicKey) -> LedgerVerification:
    """Check a ledger's chain, order and signatures and return the first problem.

    A ledger whose last entries were cut at a line boundary still verifies, because nothing in the
    remaining entries records them. Compare the last `seq` with the coordinator's copy in the
    checkpoint manifests to detect that.

    Raises
    ------
    LedgerError
        When the file is missing, unreadable or empty.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError as err:
        msg = f"{file}: ledger not found; a site's ledger is <state-dir>/{LEDGER_FILE}."
        raise LedgerError(msg) from err
    except OSError as err:
        msg = f"{file}: ledger cannot be read ({err.strerror})."
        raise LedgerError(msg) from err
    if not data:
        msg = f"{file}: ledger is empty; the site has recorded no round yet."
        raise LedgerError(msg)

    lines, tail = _split_lines(data)
    entries: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = LedgerProblem(number, "corrupt", f"line {number}: not valid JSON ({err})")
            return LedgerVerification(file, entries, problem)
        if not isinstance(entry, dict):
            problem = LedgerProblem(number, "corrupt", f"line {number}: not a JSON object")
            return LedgerVerification(file, entries, problem)
        entries.append(entry)

    expected_key = key_id(public_key)
    for index in range(len(entries)):
        entry_problem = _entry_problem(entries, index, public_key, expected_key)
        if entry_problem is not None:
            return LedgerVerification(file, entries[:index], entry_problem)

    if tail:
        line = len(lines) + 1
        message = (
            f"line {line}: torn last line of {len(tail)} bytes without a newline (an append "
            "interrupted by a crash, or a truncated file); the entries before it verify"
        )
        return LedgerVerification(file, entries, LedgerProblem(line, "torn", message))
    return LedgerVerification(file, entries, None)
