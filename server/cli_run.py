"""Coordinator commands that run a federation: `consortium`, `simulate` and `demo`."""

from __future__ import annotations

import argparse
import logging
import shutil
import tomllib
from pathlib import Path
from typing import Any

from server.checkpoint import RoundRecord
from server.consortium import write_consortium
from server.demo_cohort import generate_demo_cohort
from server.history_table import format_history
from server.run_config import parse_run_config
from server.strategy import FedTwinResult

__all__ = ["add_consortium_parser", "add_demo_parser", "add_simulate_parser", "parse_assignments"]

logger = logging.getLogger(__name__)

DEMO_TASKS = ("lab-forecast", "crs-risk", "cell-state")


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """Parse `KEY=VALUE` run config overrides; VALUE is a TOML value, else a string."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            msg = (
                f"Run config override {item!r} is not KEY=VALUE (for example num-server-rounds=5)."
            )
            raise ValueError(msg)
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw
    return parsed


def simulate(run_config: dict[str, Any], *, cpus_per_site: float = 1.0) -> FedTwinResult:
    """Run one federation in the simulation engine and return its result with the history."""
    # Imported here: the simulation engine (Ray) is heavy and only these commands need it.
    from server.simulation import run_federation

    parse_run_config(run_config)
    results: list[FedTwinResult] = []
    run_federation(run_config, cpus_per_site=cpus_per_site, on_result=results.append)
    if not results:
        msg = "The federation ended without a result; see the log above for the ServerApp's error."
        raise RuntimeError(msg)
    return results[0]


def _print_result(result: FedTwinResult) -> None:
    history: list[RoundRecord] = result.history
    if not history:
        print(
            "No round ran: this run already has all its rounds. Raise --num-rounds to continue "
            "it, or pass a new --run-name (checkpoints are in runs-dir, default runs/)."
        )
    else:
        print(format_history(history))
    if result.last_checkpoint:
        print(f"\nLast checkpoint: {result.last_checkpoint}")


def _run_simulate(args: argparse.Namespace) -> int:
    run_config = parse_assignments(args.run_config)
    run_config["consortium"] = str(args.consortium)
    run_config.setdefault("task", args.task)
    run_config.setdefault("num-server-rounds", args.num_rounds)
    if args.run_name:
        run_config["run-name"] = args.run_name
    _print_result(simulate(run_config, cpus_per_site=args.cpus_per_site))
    return 0


def add_simulate_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `simulate`: run the federation over a consortium folder in the simulation engine."""
    parser = subparsers.add_parser(
        "simulate",
        help="run federated DP training over a consortium folder in Flower's simulation engine",
        description=(
            "Run the fedtwin ServerApp and one simulated site per site folder of CONSORTIUM, "
            "then print per-round, per-site privacy spend and evaluation metrics. Checkpoints "
            "go to runs-dir/run-name/round-N (runs-dir defaults to runs/ in this folder)."
        ),
    )
    parser.add_argument(
        "--consortium",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of site folders, each with a site.toml",
    )
    parser.add_argument(
        "--task",
        choices=DEMO_TASKS,
        default="lab-forecast",
        help="twin submodel to train (default: lab-forecast)",
    )
    parser.add_argument(
        "--num-rounds", type=int, default=3, metavar="N", help="server rounds (default: 3)"
    )
    parser.add_argument(
        "--run-name",
        metavar="NAME",
        help=(
            "run folder under runs-dir (default: <consortium folder>-<task>-<spec hash>); "
            "an existing run resumes after its last checkpoint"
        ),
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run config key (docs/configuration.md); repeatable",
    )
    parser.add_argument(
        "--cpus-per-site",
        type=float,
        default=1.0,
        metavar="N",
        help="CPU cores reserved per simulated site (default: 1)",
    )
    parser.set_defaults(handler=_run_simulate)


def _run_consortium(args: argparse.Namespace) -> int:
    sites: dict[str, tuple[list[Path], list[Path]]] = {}
    for item in args.site:
        name, sep, path = item.partition("=")
        if not sep:
            msg = f"--site {item!r} is not NAME=PATH."
            raise ValueError(msg)
        sites.setdefault(name, ([], []))[0].append(Path(path))
    for item in args.cells:
        name, sep, path = item.partition("=")
        if not sep:
            msg = f"--cells {item!r} is not NAME=PATH."
            raise ValueError(msg)
        sites.setdefault(name, ([], []))[1].append(Path(path))
    written = write_consortium(
        sites, args.out, spec=args.spec, epsilon_cap=args.epsilon_cap, min_cohort=args.min_cohort
    )
    for path in written:
        print(f"Wrote {path}")
    return 0


def add_consortium_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `consortium`: site folders that point at data already split by site."""
    parser = subparsers.add_parser(
        "consortium",
        help="write site folders for datasets that are already one per site",
        description="Write OUT/<name>/site.toml for each --site NAME=PATH; the data stay in place.",
    )
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a site's FHIR file or folder; repeatable",
    )
    parser.add_argument(
        "--cells",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a site's single-cell file or folder; repeatable",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="consortium folder")
    parser.add_argument("--spec", type=Path, help="feature spec file (default: the packaged spec)")
    parser.add_argument(
        "--epsilon-cap",
        type=float,
        default=10.0,
        help="each site's cumulative epsilon cap per task (default: 10)",
    )
    parser.add_argument(
        "--min-cohort",
        type=int,
        default=3,
        help="minimum number of patients behind any metric a site sends (default: 3)",
    )
    parser.set_defaults(handler=_run_consortium)


DEMO_MARKER = ".fedtwin-demo"


def _fresh_demo_folder(out: Path) -> None:
    """Empty a folder that an earlier demo wrote (it contains the marker file); raise otherwise."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            msg = (
                f"Demo output folder {out} is not empty and was not written by the demo; "
                "pass another --out folder."
            )
            raise ValueError(msg)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(
        "Written by `fedtwin-coordinator demo`; the next demo run empties it.\n"
    )


def _run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    _fresh_demo_folder(out)
    print(f"Generating the synthetic demo cohort under {out} ...")
    cohort = generate_demo_cohort(
        out, num_sites=3, patients_per_site=args.patients_per_site, seed=0
    )
    for site in cohort.sites:
        print(
            f"  {site.name}: {site.patients} patients, {site.resources} FHIR resources, "
            f"{site.cells} cells"
        )

    checkpoints = []
    for task in args.tasks:
        print(f"\n=== Federated DP training: {task}, {args.num_rounds} rounds, 3 sites ===")
        run_config = {
            "consortium": str(cohort.consortium),
            "task": task,
            "num-server-rounds": args.num_rounds,
            "spec": str(cohort.spec),
            "runs-dir": str(out / "runs"),
            "run-name": f"demo-{task}",
        }
        result = simulate(run_config)
        _print_result(result)
        checkpoints.append(result.last_checkpoint)

    print("\nDemo finished. Checkpoints (weights.safetensors + manifest.json):")
    for path in checkpoints:
        print(f"  {path}")
    return 0


def add_demo_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `demo`: the whole chain on the synthetic cohort."""
    parser = subparsers.add_parser(
        "demo",
        help="generate the synthetic cohort and run federated DP training on it",
        description=(
            "Generate the synthetic 3-site CAR T cohort under OUT, run federated DP training for "
            "each task in Flower's simulation engine, and print where the checkpoints are."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        metavar="DIR",
        help="output folder (default: demo-output)",
    )
    parser.add_argument(
        "--num-rounds", type=int, default=3, metavar="N", help="server rounds per task (default: 3)"
    )
    parser.add_argument(
        "--patients-per-site",
        type=int,
        default=24,
        metavar="N",
        help="synthetic patients per site (default: 24)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=DEMO_TASKS,
        default=list(DEMO_TASKS),
        help="tasks to train (default: all three)",
    )
    parser.set_defaults(handler=_run_demo)
