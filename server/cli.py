"""Command line of the coordinator: `fedtwin-coordinator <command> ...`.

Each command is registered by one `add_<name>_parser(subparsers)` function that adds its
subparser and sets `handler`, the function that runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from models.spec import SpecError
from server.cli_deploy import add_deploy_parsers
from server.cli_run import add_consortium_parser, add_demo_parser, add_simulate_parser
from server.demo_cohort import DemoCohortError, generate_demo_cohort
from server.partition import PATIENT_MODE, PartitionError, format_summary, partition_dataset
from server.run_config import RunConfigError

__all__ = ["add_demo_cohort_parser", "add_partition_parser", "build_parser", "main"]

PROG = "fedtwin-coordinator"
EXIT_USAGE = 2

# Errors that come from the user's input or options; each is shown as one line.
USER_ERRORS: tuple[type[Exception], ...] = (
    PartitionError,
    DemoCohortError,
    SpecError,
    RunConfigError,
    ValueError,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports a usage error in one line and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _run_partition(args: argparse.Namespace) -> int:
    summary = partition_dataset(
        fhir=args.fhir,
        cells=args.cells,
        num_sites=args.sites,
        out=args.out,
        by=args.by,
        seed=args.seed,
        sample_sheet=args.sample_sheet,
        labels=args.labels,
        spec=args.spec,
        sheet_sample_column=args.sheet_sample_column,
        sheet_patient_column=args.sheet_patient_column,
        patient_column=args.patient_column,
        sample_column=args.sample_column,
        epsilon_cap=args.epsilon_cap,
        min_cohort=args.min_cohort,
        overwrite=args.overwrite,
    )
    print(format_summary(summary))
    print(f"Wrote {args.out / 'partition.json'}")
    return 0


def add_partition_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """Register `partition`: split one dataset into N site folders."""
    parser = subparsers.add_parser(
        "partition",
        help="split one dataset into N site folders to simulate a consortium",
        description=(
            "Split FHIR and single-cell data into site folders, keeping each patient's data "
            "at one site. Writes <out>/site-N/site.toml, the site's FHIR as NDJSON, split "
            ".h5ad files, and <out>/partition.json with the per-site counts."
        ),
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--fhir",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="NDJSON files, Bundle JSON files or folders of them",
    )
    inputs.add_argument(
        "--cells",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="10x .h5 files (one sample each), .h5ad files, or folders of them",
    )
    inputs.add_argument(
        "--sample-sheet",
        type=Path,
        metavar="FILE",
        help="TSV mapping each 10x sample (folder name) to its patient",
    )
    inputs.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="TSV of cell-state labels, referenced by every site",
    )

    split = parser.add_argument_group("split")
    split.add_argument(
        "--sites", type=int, required=True, metavar="N", help="number of site folders to write"
    )
    split.add_argument(
        "--by",
        default=PATIENT_MODE,
        metavar="patient|ATTRIBUTE",
        help="'patient' for a balanced random split (default); else a Patient "
        "field such as gender, or usedCode for the Procedure product, whose "
        "value groups patients that stay together",
    )
    split.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder that receives the site folders",
    )
    output.add_argument(
        "--overwrite", action="store_true", help="replace an earlier partition in --out"
    )
    output.add_argument(
        "--spec",
        type=Path,
        metavar="FILE",
        help="feature spec referenced by every site (default: packaged spec)",
    )
    output.add_argument(
        "--epsilon-cap",
        type=float,
        default=10.0,
        metavar="EPSILON",
        help="[privacy] epsilon-cap written for every site (default: 10.0)",
    )
    output.add_argument(
        "--min-cohort",
        type=int,
        default=3,
        metavar="PATIENTS",
        help="[privacy] min-cohort written for every site (default: 3)",
    )

    columns = parser.add_argument_group("column names")
    columns.add_argument(
        "--sheet-sample-column",
        default="GEX_Sample",
        metavar="NAME",
        help="sample-sheet column with the sample id (default: GEX_Sample)",
    )
    columns.add_argument(
        "--sheet-patient-column",
        default="Patient",
        metavar="NAME",
        help="sample-sheet column with the patient id (default: Patient)",
    )
    columns.add_argument(
        "--patient-column",
        default="patient",
        metavar="NAME",
        help="obs column with the patient id in .h5ad inputs (default: patient)",
    )
    columns.add_argument(
        "--sample-column",
        default="sample",
        metavar="NAME",
        help="obs column with the sample id in .h5ad inputs (default: sample)",
    )

    parser.set_defaults(handler=_run_partition)


def _run_demo_cohort(args: argparse.Namespace) -> int:
    cohort = generate_demo_cohort(
        args.out, num_sites=args.sites, patients_per_site=args.patients_per_site, seed=args.seed
    )
    for site in cohort.sites:
        print(
            f"{site.name}: {site.patients} patients, {site.resources} FHIR resources, "
            f"{site.crs_grade_2_or_more} with CRS grade >= 2, {site.cells} cells"
        )
    print(f"Wrote {cohort.consortium} (spec {cohort.spec})")
    return 0


def add_demo_cohort_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """Register `demo-cohort`: write the synthetic CAR T demo consortium."""
    parser = subparsers.add_parser(
        "demo-cohort",
        help="generate the synthetic CAR T demo cohort as site folders",
        description=(
            "Generate a synthetic CAR T cohort (FHIR R4 NDJSON and single-cell .h5ad per site, "
            "every resource tagged as synthetic) under <out>/consortium, and the demo feature "
            "spec <out>/spec.toml."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--sites", type=int, default=3, metavar="N", help="number of sites (default: 3)"
    )
    parser.add_argument(
        "--patients-per-site",
        type=int,
        default=24,
        metavar="N",
        help="synthetic patients per site (default: 24)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(handler=_run_demo_cohort)


# Commands in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction[_Parser]], None]] = [
    add_demo_parser,
    add_simulate_parser,
    add_partition_parser,
    add_consortium_parser,
    add_demo_cohort_parser,
    add_deploy_parsers,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every command of `COMMANDS` registered."""
    parser = _Parser(prog=PROG, description="fedtwin coordinator tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def _quiet_dependencies(*, verbose: bool) -> None:
    """Route Flower's records through the root handler and keep chatty libraries at WARNING."""
    flower = logging.getLogger("flwr")
    for handler in list(flower.handlers):
        flower.removeHandler(handler)
    flower.propagate = True
    if not verbose:
        flower.setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fedtwin-coordinator` and return its exit code."""
    args = build_parser().parse_args(argv)

    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Flower's logger is set to DEBUG and propagates to the root handler: filter
    # at the handler so `-q` and the default level hold for its records too.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    _quiet_dependencies(verbose=args.verbose)

    try:
        code: int = args.handler(args)
    except USER_ERRORS as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"{PROG} {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
