"""Plain-text tables of a run's per-round history, for the terminal."""

from __future__ import annotations

from server.checkpoint import RoundRecord

__all__ = ["format_history"]

_COLUMNS = (
    ("round", 5),
    ("site", -14),
    ("status", -16),
    ("patients", 8),
    ("epsilon round", 13),
    ("epsilon total", 13),
    ("delta", 8),
    ("accountant", -10),
)


def _number(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _epsilon(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(cells: list[str]) -> str:
    parts = []
    for text, (_, width) in zip(cells, _COLUMNS, strict=True):
        parts.append(text.ljust(-width) if width < 0 else text.rjust(width))
    return "  ".join(parts).rstrip()


def format_history(history: list[RoundRecord]) -> str:
    """Return a per-site, per-round privacy table and the evaluation metrics of each round."""
    lines = [
        "Training (epsilon: (epsilon, delta)-DP per site, privacy unit: patient)",
        _row([name for name, _ in _COLUMNS]),
    ]
    for record in history:
        for entry in sorted(record.sites, key=lambda site: site.site):
            cells = [
                str(record.server_round),
                entry.site,
                entry.status,
                _number(entry.patients),
                _epsilon(entry.epsilon_round),
                _epsilon(entry.epsilon_total),
                _number(entry.delta, 2),
                entry.accountant,
            ]
            lines.append(_row(cells))
        for rejection in record.rejected:
            lines.append(
                f"{record.server_round:>5}  {rejection.site}: rejected, {rejection.reason}"
            )

    lines.append("")
    lines.append(
        "Federated evaluation on held-out patients: site metrics averaged with the site's "
        "held-out patients as weights (so n-patients is a weighted mean per site); "
        "baseline-* is the task's simple baseline on the same patients"
    )
    for record in history:
        metrics = ", ".join(
            f"{name} {_number(value)}" for name, value in sorted(record.evaluate_metrics.items())
        )
        train = record.train_metrics.get("train-loss")
        lines.append(
            f"round {record.server_round}: train-loss {_number(train)}; {metrics or 'no metrics'}"
        )
    return "\n".join(lines)
