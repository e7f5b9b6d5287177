"""`fedtwin-site`: the site command line (check the site's data; later commands register here)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from client.report import SiteReport, SourceReport
from client.site_config import SiteConfig, SiteConfigError, load_site_config
from models.spec import FeatureSpec, SpecError, load_spec

__all__ = ["SUBCOMMANDS", "Subcommand", "main", "register"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNUSABLE = 2


@dataclass(frozen=True)
class Subcommand:
    """One `fedtwin-site` subcommand: its arguments and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# Name -> subcommand, in the order `--help` lists them. Another module adds one with
# `register(Subcommand(...))` at import; import it in `_load_subcommands`.
SUBCOMMANDS: dict[str, Subcommand] = {}


def register(subcommand: Subcommand) -> Subcommand:
    """Add a subcommand to `fedtwin-site`; a second one with the same name replaces the first."""
    SUBCOMMANDS[subcommand.name] = subcommand
    return subcommand


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fedtwin-site` with `argv` (default: `sys.argv[1:]`) and return the exit code."""
    _load_subcommands()
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_UNUSABLE
    command: Subcommand = SUBCOMMANDS[args.command]
    try:
        return command.run(args)
    except BrokenPipeError:
        # The reader of stdout (such as `head`) exited early; drop the rest of the output.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _load_subcommands() -> None:
    """Import the modules that register subcommands beyond `check`."""
    import client.join  # keygen, join
    import client.twin.commands  # noqa: F401  (predict, update)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtwin-site",
        description="Site tools of fedtwin: check local data, predict and update patient twins.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS.values():
        sub = subparsers.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.help
        )
        subcommand.add_arguments(sub)
    return parser


# `check`


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fhir",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="FHIR inputs: Bulk Data folders, NDJSON files or Bundle JSON files",
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        type=Path,
        default=[],
        metavar="PATH",
        help="single-cell inputs: .h5ad or 10x .h5 files, or folders of them",
    )
    parser.add_argument(
        "--site-config",
        type=Path,
        metavar="FILE",
        help="site.toml (or its folder); --fhir, --cells and --timezone override its inputs",
    )
    parser.add_argument(
        "--spec",
        type=Path,
        metavar="FILE",
        help="feature spec TOML (default: the site config's spec, else the packaged spec)",
    )
    parser.add_argument(
        "--timezone",
        metavar="ZONE",
        help="IANA time zone of dates and of date-times without offset (default: UTC)",
    )
    parser.add_argument(
        "--sample-sheet",
        type=Path,
        metavar="FILE",
        help="TSV or CSV naming each single-cell sample's patient (columns GEX_Sample, Patient)",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="TSV or CSV of cell-state labels per cell (columns CellID, CellType1)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="read every input again, ignoring the cache"
    )


def _check_cache_dir() -> Path:
    """Return where `check` without a site config caches what it read: the user's cache folder."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fedtwin" / "check"


def _check_config(args: argparse.Namespace) -> SiteConfig:
    """Build the site config from `--site-config` and the input options."""
    if args.site_config is not None:
        base = load_site_config(args.site_config)
    else:
        if not args.fhir and not args.cells:
            msg = "No input given; pass --fhir PATH..., --cells PATH... or --site-config FILE."
            raise SiteConfigError(msg)
        cwd = Path.cwd()
        base = SiteConfig(
            path=cwd / "site.toml",
            name=cwd.name or "site",
            fhir=(),
            cells=(),
            spec=None,
            state_dir=_check_cache_dir(),
            timezone="UTC",
        )
    fhir = tuple(p.resolve() for p in args.fhir) or base.fhir
    cells = tuple(p.resolve() for p in args.cells) or base.cells
    spec = args.spec.resolve() if args.spec is not None else base.spec
    timezone = args.timezone or base.timezone
    cells_config = base.cells_config
    if args.sample_sheet is not None:
        cells_config = replace(cells_config, sample_sheet=args.sample_sheet.resolve())
    if args.labels is not None:
        cells_config = replace(cells_config, labels=args.labels.resolve())
    return SiteConfig(
        path=base.path,
        name=base.name,
        fhir=fhir,
        cells=cells,
        spec=spec,
        state_dir=base.state_dir,
        timezone=timezone,
        cells_config=cells_config,
        privacy=base.privacy,
    )


def _run_check(args: argparse.Namespace) -> int:
    from client.dataset import load_site_dataset
    from client.fhir.dates import DateError, site_timezone

    try:
        config = _check_config(args)
        spec: FeatureSpec = load_spec(config.spec)
        site_timezone(config.timezone)
    except (SiteConfigError, SpecError, DateError) as err:
        print(f"fedtwin-site check: {err}", file=sys.stderr)
        return EXIT_UNUSABLE

    dataset = load_site_dataset(config, spec, cache=not args.no_cache, progress=sys.stderr.isatty())
    report = dataset.report
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_report(report, sys.stdout)
    for source in report.sources:
        if not source.usable:
            print(f"unusable: {source.error}", file=sys.stderr)
    if not report.usable:
        print(
            f"fedtwin-site check: site {report.site!r} has no usable patients; "
            "fix the files listed above.",
            file=sys.stderr,
        )
        return EXIT_UNUSABLE
    return EXIT_OK


register(
    Subcommand(
        name="check",
        help="read the site's FHIR and single-cell inputs and report what is usable",
        add_arguments=_check_arguments,
        run=_run_check,
    )
)


# Terminal report

_MAX_ROWS = 12


def print_report(report: SiteReport, out: TextIO) -> None:
    """Write a site report as readable tables."""
    totals = report.totals
    out.write(f"Site {report.site}  (feature spec {report.spec_sha256[:12]})\n")
    status = "usable" if report.usable else "NOT USABLE"
    out.write(
        f"{status}: {totals.get('patients', 0)} patients, "
        f"{totals.get('observations-mapped', 0)} of {totals.get('observations', 0)} "
        f"Observations mapped to the panel, {totals.get('samples', 0)} single-cell samples, "
        f"{totals.get('patients-with-both', 0)} patients with both modalities\n\n"
    )
    out.write(_table(["total", "value"], [[k, str(v)] for k, v in totals.items()]))
    for source in report.sources:
        out.write("\n")
        _write_source(source, out)


def _write_source(source: SourceReport, out: TextIO) -> None:
    state = "ok" if source.usable else f"UNUSABLE: {source.error}"
    out.write(f"== {source.path} [{source.kind}] {state}\n")
    if source.counts:
        out.write(_table(["count", "n"], [[k, str(v)] for k, v in source.counts.items()]))
    sections: list[tuple[str, dict[str, Any]]] = [
        ("skipped (reason)", dict(source.skips)),
        ("mapped values per panel code", source.details.get("observations-per-code", {})),
        ("unit conversions", source.details.get("unit-conversions", {})),
        ("not in panel (code)", source.details.get("not-in-panel", {})),
        ("not used (resource type)", source.details.get("not-used", {})),
    ]
    for title, values in sections:
        if values:
            out.write(_table([title, "n"], _top_rows(values)))
    samples = source.details.get("samples")
    if isinstance(samples, dict) and samples:
        rows = [[str(k), json.dumps(v, default=str)] for k, v in samples.items()]
        out.write(_table(["sample", "cells and genes"], rows))
    other = {
        k: v
        for k, v in source.details.items()
        if k
        not in {
            "observations-per-code",
            "unit-conversions",
            "not-in-panel",
            "not-used",
            "samples",
        }
    }
    for key, value in other.items():
        out.write(f"  {key}: {json.dumps(value, default=str)}\n")


def _top_rows(values: dict[str, Any]) -> list[list[str]]:
    ordered = sorted(values.items(), key=lambda item: (-_as_number(item[1]), str(item[0])))
    rows = [[str(k), str(v)] for k, v in ordered[:_MAX_ROWS]]
    if len(ordered) > _MAX_ROWS:
        rest = sum(_as_number(v) for _, v in ordered[_MAX_ROWS:])
        rows.append([f"... {len(ordered) - _MAX_ROWS} more", str(int(rest))])
    return rows


def _as_number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  "
        + "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
