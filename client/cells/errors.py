"""The error raised for a single-cell input that cannot be used."""

from __future__ import annotations

__all__ = ["CellsInputError"]


class CellsInputError(ValueError):
    """Raised when a single-cell file, sample sheet or labels table cannot be used.

    The message is one line: it names the file, what is wrong and the fix.
    """
