"""Errors of the per-patient twin, each with its exit code for `fedtwin-site predict`."""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_CHECKPOINT",
    "EXIT_CONFIG",
    "EXIT_NO_OBSERVATIONS",
    "EXIT_NO_TWIN",
    "EXIT_SPEC_MISMATCH",
    "EXIT_UNKNOWN_PATIENT",
    "CheckpointMismatchError",
    "InvalidCheckpointError",
    "NoObservationsError",
    "NoTwinError",
    "TwinError",
    "UnknownPatientError",
]

EXIT_CONFIG = 2
EXIT_BAD_CHECKPOINT = 3
EXIT_SPEC_MISMATCH = 4
EXIT_UNKNOWN_PATIENT = 5
EXIT_NO_OBSERVATIONS = 6
EXIT_NO_TWIN = 7


class TwinError(Exception):
    """A twin command failed on its input; `exit_code` is the process exit status."""

    exit_code = EXIT_CONFIG


class InvalidCheckpointError(TwinError):
    """A checkpoint file is missing, malformed, or its weights do not match their SHA-256."""

    exit_code = EXIT_BAD_CHECKPOINT


class CheckpointMismatchError(TwinError):
    """A checkpoint was trained on another feature spec than the site's."""

    exit_code = EXIT_SPEC_MISMATCH


class UnknownPatientError(TwinError):
    """The patient id is not in the site's data."""

    exit_code = EXIT_UNKNOWN_PATIENT


class NoObservationsError(TwinError):
    """The patient has no observation that any given checkpoint's task can use."""

    exit_code = EXIT_NO_OBSERVATIONS


class NoTwinError(TwinError):
    """`update` found no saved twin of the patient."""

    exit_code = EXIT_NO_TWIN
