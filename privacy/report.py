"""The steward's budget report over one or more site ledgers: a summary, a terminal table and HTML.

The HTML page is one self-contained file: the plots are PNG images drawn with matplotlib and
embedded as data URIs, and the page loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from privacy.keys import PUBLIC_KEY_FILE, KeyFileError, load_public_key
from privacy.ledger import LedgerError, read_entries, verify_ledger

__all__ = ["LedgerSummary", "TaskSummary", "render_html", "summarise_ledger", "terminal_table"]

_TOLERANCE = 1e-9


@dataclass
class TaskSummary:
    """The budget of one task at one site, from its ledger entries."""

    task: str
    accountant: str = ""
    privacy_unit: str = ""
    delta: float | None = None
    epsilon: float | None = 0.0
    epsilon_cap: float | None = None
    rounds: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    points: list[tuple[int, float | None, str]] = field(default_factory=list)

    @property
    def remaining(self) -> float | None:
        """ε left under the cap, or None when ε is infinite or there is no cap."""
        if self.epsilon is None or self.epsilon_cap is None:
            return None
        return max(0.0, self.epsilon_cap - self.epsilon)

    def to_json(self) -> dict[str, Any]:
        """Return the summary as JSON values."""
        return {
            "task": self.task,
            "accountant": self.accountant,
            "privacy_unit": self.privacy_unit,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "epsilon_cap": self.epsilon_cap,
            "epsilon_remaining": self.remaining,
            "rounds": self.rounds,
            "refusals": self.refusals,
            "compliant": not self.violations,
            "violations": self.violations,
        }


@dataclass
class LedgerSummary:
    """One ledger: its site, verification result and per-task budgets."""

    path: Path
    site: str
    public_key: Path | None
    verified: bool | None
    verification: str
    entries: int
    tasks: dict[str, TaskSummary]
    epsilon_all_tasks: float | None
    epsilon_cap_total: float | None
    secure_rng: bool

    @property
    def compliant(self) -> bool:
        """True when no entry of any task broke the policy recorded with it."""
        return all(not task.violations for task in self.tasks.values())

    def to_json(self) -> dict[str, Any]:
        """Return the summary as JSON values."""
        return {
            "ledger": str(self.path),
            "site": self.site,
            "public_key": None if self.public_key is None else str(self.public_key),
            "verified": self.verified,
            "verification": self.verification,
            "entries": self.entries,
            "epsilon_all_tasks": self.epsilon_all_tasks,
            "epsilon_cap_total": self.epsilon_cap_total,
            "secure_rng": self.secure_rng,
            "compliant": self.compliant,
            "tasks": [task.to_json() for task in self.tasks.values()],
        }


def _verify(path: Path, public_key: Path | None) -> tuple[bool | None, str]:
    if public_key is None:
        return None, f"not verified: no {PUBLIC_KEY_FILE} beside the ledger and no --public-key"
    try:
        result = verify_ledger(path, load_public_key(public_key))
    except (KeyFileError, LedgerError) as err:
        return False, str(err)
    if result.problem is not None:
        return False, result.problem.message
    return True, f"intact: {len(result.entries)} entries verified with {public_key}"


def _check_entry(entry: dict[str, Any], summary: TaskSummary) -> None:
    """Add a violation when a trained round broke the policy recorded in its entry."""
    policy = entry.get("policy") or {}
    seq = entry.get("seq")
    epsilon = entry.get("epsilon_total")
    cap = policy.get("epsilon-cap")
    if epsilon is None:
        summary.violations.append(f"entry {seq}: infinite ε")
    elif isinstance(cap, int | float) and epsilon > cap + _TOLERANCE:
        summary.violations.append(f"entry {seq}: ε {epsilon:.3f} above the cap {cap:g}")
    minimum = policy.get("min-noise-multiplier")
    noise = entry.get("noise_multiplier")
    if isinstance(minimum, int | float) and isinstance(noise, int | float) and noise < minimum:
        summary.violations.append(f"entry {seq}: noise_multiplier {noise:g} below {minimum:g}")
    total = entry.get("epsilon_all_tasks")
    total_cap = policy.get("epsilon-cap-total")
    if isinstance(total_cap, int | float) and total is not None and total > total_cap + _TOLERANCE:
        summary.violations.append(
            f"entry {seq}: ε over all tasks {total:.3f} above the cap {total_cap:g}"
        )


def summarise_ledger(path: str | Path, public_key: str | Path | None = None) -> LedgerSummary:
    """Read and verify one ledger and sum up each task's budget.

    Parameters
    ----------
    path
        The site's `ledger.jsonl`.
    public_key
        The site's public key; None uses `site-key.pub` beside the ledger when it exists.

    Raises
    ------
    LedgerError
        When the ledger is missing, empty or has a line that is not a JSON object.
    """
    file = Path(path)
    key_path = Path(public_key) if public_key is not None else file.with_name(PUBLIC_KEY_FILE)
    key: Path | None = key_path if public_key is not None or key_path.exists() else None
    entries = read_entries(file)
    if not entries:
        msg = f"{file}: ledger is empty; the site has recorded no round yet."
        raise LedgerError(msg)
    verified, verification = _verify(file, key)

    tasks: dict[str, TaskSummary] = {}
    last: dict[str, Any] = entries[-1]
    for position, entry in enumerate(entries, start=1):
        task = str(entry.get("task", "?"))
        summary = tasks.setdefault(task, TaskSummary(task=task))
        policy = entry.get("policy") or {}
        summary.epsilon_cap = policy.get("epsilon-cap", summary.epsilon_cap)
        summary.accountant = str(entry.get("accountant", ""))
        summary.privacy_unit = str(entry.get("privacy_unit", ""))
        summary.delta = entry.get("delta")
        summary.epsilon = entry.get("epsilon_total")
        label = f"{entry.get('run_id', '')} r{entry.get('round', '?')}"
        summary.points.append((position, entry.get("epsilon_total"), entry.get("kind", "")))
        if entry.get("kind") == "refusal":
            summary.refusals.append(
                {
                    "seq": entry.get("seq"),
                    "run_id": entry.get("run_id"),
                    "round": entry.get("round"),
                    "rule": entry.get("rule", ""),
                    "reason": entry.get("reason", ""),
                    "label": label,
                }
            )
        else:
            summary.rounds += 1
            _check_entry(entry, summary)

    return LedgerSummary(
        path=file,
        site=str(last.get("site", file.parent.name)),
        public_key=key,
        verified=verified,
        verification=verification,
        entries=len(entries),
        tasks=tasks,
        epsilon_all_tasks=last.get("epsilon_all_tasks"),
        epsilon_cap_total=(last.get("policy") or {}).get("epsilon-cap-total"),
        secure_rng=all(bool(entry.get("secure_rng")) for entry in entries),
    )


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "inf"
    return f"{value:.{digits}f}" if math.isfinite(value) else "inf"


def terminal_table(summaries: list[LedgerSummary]) -> str:
    """Return a plain-text table: one row per site and task."""
    header = (
        f"{'site':<12} {'task':<13} {'rounds':>6} {'refused':>7} {'ε':>8} {'cap':>6} "
        f"{'left':>7} {'δ':>9} {'acct':>4} {'unit':<7} {'policy':<9} ledger"
    )
    lines = [header, "-" * len(header)]
    for summary in summaries:
        ledger_state = {True: "verified", False: "FAILED", None: "unverified"}[summary.verified]
        for task in summary.tasks.values():
            cap = "-" if task.epsilon_cap is None else f"{task.epsilon_cap:g}"
            left = "-" if task.remaining is None else f"{task.remaining:.3f}"
            delta = "-" if task.delta is None else f"{task.delta:.2e}"
            lines.append(
                f"{summary.site:<12} {task.task:<13} {task.rounds:>6} {len(task.refusals):>7} "
                f"{_number(task.epsilon):>8} {cap:>6} {left:>7} {delta:>9} "
                f"{task.accountant.upper():>4} {task.privacy_unit:<7} "
                f"{'ok' if not task.violations else 'VIOLATED':<9} {ledger_state}"
            )
    lines.append("")
    lines.append(
        "ε is (ε, δ)-DP per privacy unit from the Opacus accountant named (RDP or PRV), cumulative "
        "over every recorded round of the task."
    )
    if not all(summary.secure_rng for summary in summaries):
        lines.append(
            "Noise came from torch's default PRNG, not a cryptographically secure generator, and "
            "without Opacus' defence against floating-point attacks."
        )
    for summary in summaries:
        if summary.verified is not True:
            lines.append(f"{summary.path}: {summary.verification}")
    return "\n".join(lines)


def _plot(summary: LedgerSummary) -> str:
    """Draw ε over the ledger's entries, one line per task, and return the PNG as base64."""
    # A bare Figure renders with the Agg canvas and leaves pyplot's global state alone.
    figure = Figure(figsize=(7.5, 3.6), dpi=110)
    axes = figure.subplots()
    for index, task in enumerate(summary.tasks.values()):
        color = f"C{index}"
        trained = [(x, y) for x, y, kind in task.points if kind != "refusal" and y is not None]
        refused = [(x, y) for x, y, kind in task.points if kind == "refusal" and y is not None]
        if trained:
            axes.plot(
                [x for x, _ in trained],
                [y for _, y in trained],
                marker="o",
                color=color,
                label=task.task,
            )
        if refused:
            axes.scatter(
                [x for x, _ in refused],
                [y for _, y in refused],
                marker="x",
                s=70,
                color=color,
                label=f"{task.task} refused",
            )
        if task.epsilon_cap is not None:
            axes.axhline(task.epsilon_cap, linestyle="--", linewidth=1, color=color)
    if summary.epsilon_cap_total is not None:
        axes.axhline(
            summary.epsilon_cap_total, linestyle=":", color="black", label="cap, all tasks"
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("ledger entry")
    axes.set_ylabel("cumulative ε")
    axes.set_title(f"{summary.site}: ε per task (dashed: the task's cap)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.ok { color: #176e2c; font-weight: bold; }
.bad { color: #b00020; font-weight: bold; }
.caveat { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
"""


def _status(flag: bool | None, yes: str, no: str, unknown: str) -> str:
    if flag is None:
        return f'<span class="bad">{html.escape(unknown)}</span>'
    css = "ok" if flag else "bad"
    return f'<span class="{css}">{html.escape(yes if flag else no)}</span>'


def _site_section(summary: LedgerSummary) -> str:
    escape = html.escape
    rows = []
    for task in summary.tasks.values():
        cap = "-" if task.epsilon_cap is None else f"{task.epsilon_cap:g}"
        left = "-" if task.remaining is None else f"{task.remaining:.3f}"
        delta = "-" if task.delta is None else f"{task.delta:.2e}"
        compliance = _status(not task.violations, "compliant", "; ".join(task.violations), "")
        rows.append(
            f"<tr><td>{escape(task.task)}</td><td>{task.rounds}</td><td>{len(task.refusals)}</td>"
            f"<td>{_number(task.epsilon)}</td><td>{cap}</td><td>{left}</td><td>{delta}</td>"
            f"<td>{escape(task.accountant.upper())}</td><td>{escape(task.privacy_unit)}</td>"
            f"<td>{compliance}</td></tr>"
        )
    refusals = []
    for task in summary.tasks.values():
        for item in task.refusals:
            rule = f" (rule {escape(str(item['rule']))})" if item["rule"] else ""
            refusals.append(
                f"<li>{escape(task.task)}, {escape(str(item['label']))}{rule}: "
                f"{escape(str(item['reason']))}</li>"
            )
    total_cap = "none" if summary.epsilon_cap_total is None else f"{summary.epsilon_cap_total:g}"
    verification = _status(summary.verified, "verified", "FAILED", "not verified")
    return f"""
<section>
<h2>{escape(summary.site)}</h2>
<p>Ledger <code>{escape(str(summary.path))}</code>, {summary.entries} entries:
{verification} &mdash; {escape(summary.verification)}</p>
<p>ε over all tasks: {_number(summary.epsilon_all_tasks)} (cap: {total_cap})</p>
<table>
<tr><th>task</th><th>rounds</th><th>refused</th><th>ε</th><th>cap</th><th>remaining</th>
<th>δ</th><th>accountant</th><th>unit</th><th>policy</th></tr>
{"".join(rows)}
</table>
<img alt="cumulative ε per task at {escape(summary.site)}"
 src="data:image/png;base64,{_plot(summary)}">
<h3>Refusals</h3>
<ul>{"".join(refusals) or "<li>none</li>"}</ul>
</section>"""


def render_html(summaries: list[LedgerSummary]) -> str:
    """Return the report page: per site a table, an ε plot, the refusals and the caveats."""
    caveat = ""
    if not all(summary.secure_rng for summary in summaries):
        caveat = (
            '<p class="caveat">The DP noise and the Poisson sampling used torch\'s default '
            "pseudo-random generator, not a cryptographically secure one, and Opacus' defence "
            "against floating-point attacks on the noise was off (secure_mode needs torchcsprng, "
            "which is not installed). The ε below assume ideal Gaussian noise.</p>"
        )
    sections = "".join(_site_section(summary) for summary in summaries)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>fedtwin privacy budget</title>
<style>{_STYLE}</style></head>
<body>
<h1>Privacy budget per site</h1>
<p>Every ε is (ε, δ)-differential privacy per privacy unit (normally the patient), computed by the
Opacus accountant named in the table (RDP or PRV) and cumulative over every recorded round of the
task. It covers the model updates a site sent, not other metrics.</p>
{caveat}
{sections}
</body>
</html>
"""
