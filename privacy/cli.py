"""The `fedtwin-steward` command: inspect a site's privacy state.

Each subcommand is one `_Command` in `COMMANDS`: a name, a help line, a function that adds its
arguments and a function that runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.accountant import (
    PRIVACY_UNIT,
    SECURE_RNG,
    AccountantStateError,
    AccountantStore,
    accountant_label,
    validate_delta,
)

__all__ = ["COMMANDS", "build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
_STATE_GLOB = "accountant-*.json"
_STATE_HEADER = (
    "Accountant state in {state_dir}. This is not the signed ledger, which is not implemented "
    "yet, so nothing here proves that the files are unaltered."
)


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------- budget


def _add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state folder")
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="δ at which to compute ε (default: the δ of each task's latest round)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _task_of(path: Path) -> str:
    return path.stem.removeprefix("accountant-")


def _task_summary(store: AccountantStore, delta: float | None) -> dict[str, Any]:
    rounds = store.rounds()
    if delta is None:
        delta = rounds[-1].delta if rounds else None
    epsilon = store.epsilon(delta) if delta is not None else 0.0
    return {
        "task": store.task,
        "file": str(store.path),
        "accountant": store.accountant,
        "privacy_unit": PRIVACY_UNIT,
        "secure_rng": SECURE_RNG,
        "rounds": len(rounds),
        "steps": store.steps,
        "delta": delta,
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "round_list": [entry.to_json() for entry in rounds],
    }


def _print_task(summary: dict[str, Any]) -> None:
    epsilon = summary["epsilon"]
    epsilon_text = "infinite" if epsilon is None else f"{epsilon:.3f}"
    delta_text = "-" if summary["delta"] is None else f"{summary['delta']:g}"
    print(f"\ntask {summary['task']} ({summary['file']})")
    print(
        f"  ε {epsilon_text} at δ={delta_text} ({accountant_label(summary['accountant'])}, "
        f"unit: {summary['privacy_unit']}), {summary['rounds']} rounds, {summary['steps']} steps"
    )
    if not summary["round_list"]:
        return

    print(
        f"  {'run':<20} {'round':>5} {'steps':>6} {'noise':>7} {'q':>7} "
        f"{'ε round':>9} {'ε total':>9} {'δ':>9}  recorded"
    )
    for entry in summary["round_list"]:
        round_epsilon = entry["epsilon_round"]
        total_epsilon = entry["epsilon_total"]
        print(
            f"  {entry['run_name'] or '-':<20} {entry['server_round']:>5} {entry['steps']:>6} "
            f"{entry['noise_multiplier']:>7.3g} {entry['sample_rate']:>7.3g} "
            f"{'inf' if round_epsilon is None else f'{round_epsilon:.3f}':>9} "
            f"{'inf' if total_epsilon is None else f'{total_epsilon:.3f}':>9} "
            f"{entry['delta']:>9.3g}  {entry['recorded_at']}"
        )


def _run_budget(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    if args.delta is not None:
        try:
            validate_delta(args.delta)
        except ValueError as err:
            print(f"fedtwin-steward budget: --delta: {err}", file=sys.stderr)
            return EXIT_FAILED
    if not state_dir.is_dir():
        print(
            f"fedtwin-steward budget: state folder {state_dir} not found; pass the site's "
            "state-dir from site.toml.",
            file=sys.stderr,
        )
        return EXIT_FAILED

    summaries: list[dict[str, Any]] = []
    errors: list[str] = []
    for path in sorted(state_dir.glob(_STATE_GLOB)):
        try:
            store = AccountantStore(state_dir, _task_of(path))
            summaries.append(_task_summary(store, args.delta))
        except (AccountantStateError, ValueError) as err:
            errors.append(str(err))

    if args.json:
        content = {
            "state_dir": str(state_dir),
            "source": "accountant-state",
            "signed": False,
            "tasks": summaries,
            "errors": errors,
        }
        print(json.dumps(content, indent=2, allow_nan=False))
    else:
        print(_STATE_HEADER.format(state_dir=state_dir))
        if not summaries and not errors:
            print(f"\nNo accountant files ({_STATE_GLOB}) found: this site has trained no rounds.")
        for summary in summaries:
            _print_task(summary)
        if not SECURE_RNG:
            print("\nNoise came from torch's default PRNG, not a cryptographically secure one.")

    for error in errors:
        print(f"fedtwin-steward budget: {error}", file=sys.stderr)
    return EXIT_FAILED if errors else EXIT_OK


COMMANDS: tuple[_Command, ...] = (
    _Command(
        name="budget",
        help="print each task's cumulative ε and rounds from a site's accountant state",
        add_arguments=_add_budget_arguments,
        run=_run_budget,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command in `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fedtwin-steward",
        description="Audit a fedtwin site's privacy budget (patient-level DP).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fedtwin-steward` with `argv` (default: `sys.argv[1:]`) and return the exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    with _command_logging(verbose=args.verbose):
        return run(args)


@contextmanager
def _command_logging(*, verbose: bool) -> Iterator[None]:
    """Log to standard error while a command runs, then restore the root logger.

    The command's handler replaces the root handlers for its duration, including the one that
    Opacus installs when it is imported. Restoring them keeps `main` free of side effects when it
    is called in-process, as the tests do.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


if __name__ == "__main__":
    sys.exit(main())
