"""Benchmark federated DP training on the real cohorts and write docs/results.md.

For each task on its real data, the script runs the federation in Flower's simulation engine,
scores the last checkpoint on every site's held-out patients, and compares it with a
centralised model trained without DP, each site trained alone with DP, and the task's simple
baseline. Run from the repository root:

    .venv/bin/python bench/results.py --out docs/results.md [--rounds N] [--quick]

The real data are read from --data (default: $FEDTWIN_SHARED_DATA, else ../shared/data
beside the repository).
Site folders, accountant states and checkpoints go to a temporary folder, or to --work.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results_data import COHORTS, check_data_folder
from results_eval import PlainGrid
from results_plots import plot_task
from results_report import Setup, render
from results_run import TaskResult, run_task

from models.spec import load_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2
PLAIN_EPOCHS = (10, 30, 60)
QUICK_PLAIN_EPOCHS = (5, 15)
PLAIN_LEARNING_RATES = (0.01, 0.03, 0.1)
PLAIN_BATCH_SIZE = 8


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        description="Run federated DP training on the real cohorts and write the results page."
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/results.md"), help="Markdown file to write"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=f"server rounds per task (default: {DEFAULT_ROUNDS}, with --quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROUNDS} rounds and at most {max(QUICK_PLAIN_EPOCHS)} centralised epochs",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("FEDTWIN_SHARED_DATA", DEFAULT_DATA)),
        help="folder of the real cohorts (default: $FEDTWIN_SHARED_DATA, else ../shared/data "
        "beside the repository)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=[cohort.task for cohort in COHORTS],
        default=[cohort.task for cohort in COHORTS],
        help="tasks to run (default: all three)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="empty or new folder to keep the site folders and checkpoints in "
        "(default: a temporary folder, removed at the end)",
    )
    return parser


def _quiet_libraries() -> None:
    # Flower sets its logger to DEBUG when imported; the benchmark prints its own progress.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)


def run(args: argparse.Namespace, work: Path) -> int:
    """Run every selected task under `work`, then write the page and its plots."""
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    spec = load_spec(None)
    overrides = {"num-server-rounds": rounds}
    grid = PlainGrid(
        epochs=QUICK_PLAIN_EPOCHS if args.quick else PLAIN_EPOCHS,
        learning_rates=PLAIN_LEARNING_RATES,
        batch_size=PLAIN_BATCH_SIZE,
        seed=0,
    )

    started = time.perf_counter()
    results: list[TaskResult] = []
    for cohort in COHORTS:
        if cohort.task not in args.tasks:
            continue
        print(f"[results] {cohort.task}: {rounds} rounds on {cohort.description}", flush=True)
        task_started = time.perf_counter()
        results.append(
            run_task(cohort, data=args.data, work=work, spec=spec, overrides=overrides, grid=grid)
        )
        print(
            f"[results] {cohort.task} done in {time.perf_counter() - task_started:.0f} s",
            flush=True,
        )

    out: Path = args.out
    plot_dir = out.parent / out.stem
    plots = {result.task: plot_task(result, plot_dir / f"{result.task}.png") for result in results}
    setup = Setup(
        command="python bench/results.py " + shlex.join(sys.argv[1:]),
        date_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        data=args.data,
        quick=args.quick,
        total_seconds=time.perf_counter() - started,
        load_average=os.getloadavg()[1],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, plots, setup, out), encoding="utf-8")
    print(f"[results] wrote {out} and {len(plots)} plots in {plot_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, check the inputs and run the benchmark."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if args.rounds is not None and args.rounds < 1:
        print(f"results: error: --rounds is {args.rounds}; use 1 or more.", file=sys.stderr)
        return 2
    try:
        check_data_folder(args.data)
    except FileNotFoundError as err:
        print(f"results: error: {err}", file=sys.stderr)
        return 2

    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="fedtwin-results-") as work:
            return run(args, Path(work))
    work = args.work
    if work.exists() and any(work.iterdir()):
        print(
            f"results: error: work folder {work} is not empty; pass a new folder so that no "
            "earlier accountant state is reused.",
            file=sys.stderr,
        )
        return 2
    work.mkdir(parents=True, exist_ok=True)
    return run(args, work.resolve())


if __name__ == "__main__":
    sys.exit(main())
