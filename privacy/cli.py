"""The `fedtwin-steward` command: keys, ledger verification, budget report and policy checks.

Each subcommand is one `StewardCommand`: a name, a help line, a function that adds its arguments
and a function that runs it and returns the exit code. `COMMANDS` holds the built-in ones, and
installed packages add more through the entry point group `fedtwin.steward_commands`, whose
entries name a function that returns a `StewardCommand` (the site's `audit-mia` needs the site's
data loader, which privacy/ may not import).

Exit codes: 0 success; 1 a check failed (a ledger that does not verify, an invalid policy, a
policy violation in a report, an invalid accountant file); 2 invalid input (a missing or unreadable
file, a key that is not Ed25519, an empty ledger, invalid arguments).
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
from importlib.metadata import entry_points
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
from privacy.keys import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    KeyFileError,
    generate_key_pair,
    key_id,
    load_public_key,
)
from privacy.ledger import LedgerError, entry_hash, verify_ledger
from privacy.policy import PolicyError, load_policy
from privacy.report import render_html, summarise_ledger, terminal_table

__all__ = [
    "COMMANDS",
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_OK",
    "StewardCommand",
    "build_parser",
    "main",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
PLUGIN_GROUP = "fedtwin.steward_commands"
_STATE_GLOB = "accountant-*.json"
_STATE_HEADER = (
    "Accountant state in {state_dir}. This is not the signed ledger, so nothing here proves that "
    "the files are unaltered; run `fedtwin-steward verify` on {state_dir}/ledger.jsonl for that."
)


@dataclass(frozen=True)
class StewardCommand:
    """One `fedtwin-steward` subcommand."""

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


# ---------------------------------------------------------------------------- keygen


def _add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help=f"folder for {PRIVATE_KEY_FILE} (mode 0600) and {PUBLIC_KEY_FILE}; normally the "
        "site's state-dir",
    )


def _run_keygen(args: argparse.Namespace) -> int:
    try:
        private_path, public_path = generate_key_pair(args.out)
    except KeyFileError as err:
        print(f"fedtwin-steward keygen: {err}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as err:
        print(
            f"fedtwin-steward keygen: {args.out}: cannot write ({err.strerror}).", file=sys.stderr
        )
        return EXIT_INPUT
    public_key = load_public_key(public_path)
    print(f"private key: {private_path} (mode 0600; keep it on site, never send it)")
    print(f"public key:  {public_path} (key id {key_id(public_key)}; give it to the stewards)")
    return EXIT_OK


# ---------------------------------------------------------------------------- verify


def _add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ledger", type=Path, metavar="LEDGER", help="a site's ledger.jsonl")
    parser.add_argument(
        "--public-key",
        type=Path,
        required=True,
        metavar="KEY",
        help=f"the site's public key ({PUBLIC_KEY_FILE}, PEM)",
    )


def _run_verify(args: argparse.Namespace) -> int:
    try:
        public_key = load_public_key(args.public_key)
        result = verify_ledger(args.ledger, public_key)
    except (KeyFileError, LedgerError) as err:
        print(f"fedtwin-steward verify: {err}", file=sys.stderr)
        return EXIT_INPUT
    if result.problem is not None:
        print(
            f"fedtwin-steward verify: {args.ledger}: {result.problem.kind}: "
            f"{result.problem.message}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    last = result.entries[-1]
    print(
        f"{args.ledger}: intact, {len(result.entries)} entries (seq 0..{last['seq']}) signed by "
        f"key {key_id(public_key)}; last entry hash {entry_hash(last)}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------------- report


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ledgers", type=Path, nargs="+", metavar="LEDGER", help="ledger.jsonl files"
    )
    parser.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=None,
        metavar="KEY",
        help=f"public key per ledger, in the same order (default: {PUBLIC_KEY_FILE} beside each)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for index.html"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _run_report(args: argparse.Namespace) -> int:
    keys: list[Path | None] = list(args.public_key or [])
    if keys and len(keys) != len(args.ledgers):
        print(
            f"fedtwin-steward report: {len(keys)} --public-key for {len(args.ledgers)} ledgers; "
            "give one per ledger, in order, or none.",
            file=sys.stderr,
        )
        return EXIT_INPUT
    keys = keys or [None] * len(args.ledgers)

    summaries = []
    for ledger, key in zip(args.ledgers, keys, strict=True):
        try:
            summaries.append(summarise_ledger(ledger, key))
        except LedgerError as err:
            print(f"fedtwin-steward report: {err}", file=sys.stderr)
            return EXIT_INPUT

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        page = args.out / "index.html"
        page.write_text(render_html(summaries), encoding="utf-8")
    except OSError as err:
        print(
            f"fedtwin-steward report: {args.out}: cannot write ({err.strerror}).", file=sys.stderr
        )
        return EXIT_INPUT

    if args.json:
        content = {"report": str(page), "sites": [summary.to_json() for summary in summaries]}
        print(json.dumps(content, indent=2, allow_nan=False))
    else:
        print(terminal_table(summaries))
        print(f"\nreport: {page}")
    failed = any(s.verified is False or not s.compliant for s in summaries)
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------------------- policy check


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="policy_action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate a policy file", description="validate a policy file"
    )
    check.add_argument("policy", type=Path, metavar="POLICY", help="policy TOML file")


def _run_policy(args: argparse.Namespace) -> int:
    if not args.policy.is_file():
        print(
            f"fedtwin-steward policy check: {args.policy}: policy file not found.", file=sys.stderr
        )
        return EXIT_INPUT
    try:
        policy = load_policy(args.policy)
    except PolicyError as err:
        print(f"fedtwin-steward policy check: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.policy}: valid policy")
    for key, value in policy.to_json().items():
        shown = value
        if key == "delta" and not value:
            shown = "1 / (10 x patients) of each round"
        elif key == "epsilon-cap-total" and value is None:
            shown = "none"
        elif isinstance(value, list) and not value:
            shown = "any"
        print(f"  {key:<22} {shown}")
    return EXIT_OK


LEDGER_COMMANDS: tuple[StewardCommand, ...] = (
    StewardCommand(
        name="keygen",
        help="create a site's Ed25519 key pair for signing its ledger",
        add_arguments=_add_keygen_arguments,
        run=_run_keygen,
    ),
    StewardCommand(
        name="verify",
        help="check a site ledger's hash chain, order and signatures",
        add_arguments=_add_verify_arguments,
        run=_run_verify,
    ),
    StewardCommand(
        name="report",
        help="write an HTML budget report (index.html) over site ledgers and print a table",
        add_arguments=_add_report_arguments,
        run=_run_report,
    ),
    StewardCommand(
        name="policy",
        help="validate a site policy file (policy check POLICY)",
        add_arguments=_add_policy_arguments,
        run=_run_policy,
    ),
)


COMMANDS: tuple[StewardCommand, ...] = (
    StewardCommand(
        name="budget",
        help="print each task's cumulative ε and rounds from a site's accountant state",
        add_arguments=_add_budget_arguments,
        run=_run_budget,
    ),
    *LEDGER_COMMANDS,
)


def _plugin_commands() -> list[StewardCommand]:
    """Load the commands that installed packages register under `fedtwin.steward_commands`."""
    commands: list[StewardCommand] = []
    for entry_point in entry_points(group=PLUGIN_GROUP):
        try:
            command = entry_point.load()()
        # A broken plugin must not disable the built-in commands, whatever it raises.
        except Exception as err:
            logger.warning("Steward command %s could not be loaded: %s", entry_point.name, err)
            continue
        if isinstance(command, StewardCommand):
            commands.append(command)
        else:
            logger.warning(
                "Entry point %s returned %s, not a StewardCommand; skipped.",
                entry_point.name,
                type(command).__name__,
            )
    return commands


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command in `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fedtwin-steward",
        description="Audit a fedtwin site's privacy budget (patient-level DP).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    known = {command.name for command in COMMANDS}
    plugins = [command for command in _plugin_commands() if command.name not in known]
    for command in (*COMMANDS, *plugins):
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
