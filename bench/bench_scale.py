"""Benchmark fedtwin's simulated rounds at few and many sites: time per site-round and memory.

Run from the repository root:

    .venv/bin/python bench/bench_scale.py [--sites 5,50] [--patients-per-site 12] [--num-rounds 4]

For each site count the script writes a synthetic demo cohort (`generate_demo_cohort`, the same
number of patients at every site) into a temporary folder and runs fedtwin's federation
(`server.simulation.run_federation`, Flower's simulation engine, one CPU per simulated site) in a
fresh Python process. The time per site-round is the median time of rounds 3 and later divided by
the number of sites. Peak memory is the largest sum, over the worker process and all its
descendants (the Ray processes included), of RSS and of PSS read from /proc/<pid>/smaps_rollup
every 0.25 s. The runs of the different site counts alternate, and the per-site ratio is taken
within each repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp_step import machine_info
from bench_round import (
    WARM_ROUNDS,
    reset_site_state,
    run_worker_process,
    steady_round_seconds,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "scale.json"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per site count the medians and ranges, and the per-site ratios within each repeat."""
    counts = sorted({r["sites"] for r in runs})
    summary: dict[str, Any] = {"per_sites": {}}
    for count in counts:
        items = [r for r in runs if r["sites"] == count]
        per_site = [steady_round_seconds(r) / count for r in items]
        first = [r["rounds"][0]["seconds"] / count for r in items]
        summary["per_sites"][str(count)] = {
            "steady_site_round_s_median": statistics.median(per_site),
            "steady_site_round_s_range": [min(per_site), max(per_site)],
            "steady_round_s_median": statistics.median(steady_round_seconds(r) for r in items),
            "first_round_per_site_s_median": statistics.median(first),
            "wall_s_median": statistics.median(r["wall_seconds"] for r in items),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in items),
            "peak_pss_mib_median": statistics.median(r["peak_pss_mib"] for r in items),
            "peak_processes_median": statistics.median(r["peak_processes"] for r in items),
        }

    smallest, largest = counts[0], counts[-1]
    ratios = []
    for repeat in sorted({r["repeat"] for r in runs}):
        pair = {r["sites"]: r for r in runs if r["repeat"] == repeat}
        if smallest in pair and largest in pair:
            small = steady_round_seconds(pair[smallest]) / smallest
            large = steady_round_seconds(pair[largest]) / largest
            ratios.append(large / small)
    if ratios:
        summary["per_site_ratio"] = {
            "sites": [smallest, largest],
            "median": statistics.median(ratios),
            "range": [min(ratios), max(ratios)],
            "per_repeat": ratios,
        }
    return summary


def print_summary(summary: dict[str, Any], task: str) -> None:
    """Print the scaling table in Markdown."""
    print(f"\nscale, task {task}: median over repeats (range)")
    print(
        "| sites | round 1 s per site | rounds 3+ s | s per site-round | peak RSS MiB "
        "| peak PSS MiB | processes |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, s in summary["per_sites"].items():
        low, high = s["steady_site_round_s_range"]
        print(
            f"| {count} | {s['first_round_per_site_s_median']:.2f} "
            f"| {s['steady_round_s_median']:.2f} "
            f"| {s['steady_site_round_s_median']:.3f} ({low:.3f}-{high:.3f}) "
            f"| {s['peak_rss_mib_median']:.0f} | {s['peak_pss_mib_median']:.0f} "
            f"| {s['peak_processes_median']:.0f} |"
        )
    ratio = summary.get("per_site_ratio")
    if ratio:
        low, high = ratio["range"]
        small, large = ratio["sites"]
        print(
            f"per-site cost, {large} sites / {small} sites: {ratio['median']:.2f} "
            f"({low:.2f}-{high:.2f})"
        )


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sites", default="5,50", help="comma-separated site counts")
    parser.add_argument("--patients-per-site", type=int, default=12, help="patients per site")
    parser.add_argument("--task", default="crs-risk", help="twin task (default: crs-risk)")
    parser.add_argument(
        "--num-rounds", type=int, default=4, help=f"server rounds (more than {WARM_ROUNDS})"
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of each site count")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = parser.parse_args()
    args.sites = [int(s) for s in args.sites.split(",") if s]
    if args.num_rounds <= WARM_ROUNDS:
        parser.error(f"--num-rounds must be more than {WARM_ROUNDS}")
    return args


def main() -> None:
    args = parse_args()
    from server.demo_cohort import generate_demo_cohort

    runs = []
    with tempfile.TemporaryDirectory(prefix="fedtwin-scale-") as tmp:
        cohorts = {}
        for count in args.sites:
            started = time.perf_counter()
            cohorts[count] = Path(tmp) / f"sites-{count}"
            generate_demo_cohort(
                cohorts[count],
                num_sites=count,
                patients_per_site=args.patients_per_site,
                seed=0,
            )
            print(f"cohort of {count} sites written in {time.perf_counter() - started:.1f} s")

        for repeat in range(args.repeat):
            order = args.sites if repeat % 2 == 0 else list(reversed(args.sites))
            for count in order:
                reset_site_state(cohorts[count])
                result = run_worker_process(
                    BENCH_DIR / "bench_round.py",
                    "fedtwin",
                    cohorts[count],
                    args.task,
                    args.num_rounds,
                    args.timeout,
                )
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"repeat {repeat}, {count} sites: rounds "
                    + ", ".join(f"{r['seconds']:.2f}" for r in result["rounds"])
                    + f" s; peak PSS {result['peak_pss_mib']:.0f} MiB; "
                    f"statuses {sorted(set(result['statuses']))}",
                    flush=True,
                )

    for run in runs:
        # The message sizes belong to the round benchmark; keep the file small.
        run.pop("replies", None)
        run.pop("train_messages", None)
    summary = summarise(runs)
    print_summary(summary, args.task)
    document = {
        "benchmark": "scale",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "sites": args.sites,
            "patients_per_site": args.patients_per_site,
            "task": args.task,
            "num_rounds": args.num_rounds,
            "repeat": args.repeat,
            "goal": "per-site cost at the largest site count <= 1.2x the smallest",
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
