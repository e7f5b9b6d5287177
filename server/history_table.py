"""Plain-text tables of a run's per-round history, for the terminal."""

from __future__ import annotations

from server.checkpoint import RoundRecord

__all__ = ["format_history"]


def _number(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_history(history: list[RoundRecord]) -> str:
    """Return one row per site and round (status, patients, ε with δ) plus the evaluation metrics."""
    header = f"{'round':>5}  {'site':<14} {'status':<16} {'patients':>8}  {'epsilon round':>13}  {'epsilon total':>13}  {'delta':>8}  accountant"
    lines = ["Training (epsilon: (epsilon, delta)-DP per site, unit: patient)", header]
    for record in history:
        for entry in record.sites:
            lines.append(
                f"{record.server_round:>5}  {entry.site:<14} {entry.status:<16} "
                f"{_number(entry.patients):>8}  {_number(entry.epsilon_round):>13}  "
                f"{_number(entry.epsilon_total):>13}  {_number(entry.delta, 2):>8}  {entry.accountant}"
            )
        for rejection in record.rejected:
            lines.append(
                f"{record.server_round:>5}  {rejection.site:<14} rejected: {rejection.reason}"
            )

    lines.append("")
    lines.append("Federated evaluation on held-out patients (weighted by patients)")
    for record in history:
        metrics = ", ".join(
            f"{name} {_number(value)}" for name, value in sorted(record.evaluate_metrics.items())
        )
        train = record.train_metrics.get("train-loss")
        lines.append(
            f"round {record.server_round}: train-loss {_number(train)}; {metrics or 'no metrics'}"
        )
    return "\n".join(lines)
