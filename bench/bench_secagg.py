"""Benchmark the cost of a SecAgg+ round against a plain FedAvg round, in the simulation engine.

Run from the repository root:

    .venv/bin/python bench/bench_secagg.py [--sites 3,10] [--rounds 3] [--patients 12]

For each site count and each mode (secure-aggregation false, then true) the script generates a
fresh synthetic demo cohort in a temporary folder, so no site's privacy budget carries over,
and runs one crs-risk federation of `--rounds` rounds. A round's time is taken from the
modification times of the round folders' manifest.json files: the mean of the gaps between
consecutive manifests, so the engine's start-up and the first round's data loading are left
out. A round includes training, the SecAgg+ stages (in secure mode) and evaluation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.cli_run import simulate
from server.demo_cohort import generate_demo_cohort

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "secagg.json"


def machine_info() -> dict[str, Any]:
    """Return the cores, CPU model and Python version of this machine."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def run_once(num_sites: int, secure: bool, rounds: int, patients: int) -> dict[str, Any]:
    """Run one federation and return its wall time and mean round time (seconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as folder:
        out = Path(folder)
        cohort = generate_demo_cohort(out, num_sites=num_sites, patients_per_site=patients, seed=0)
        run_config = {
            "consortium": str(cohort.consortium),
            "task": "crs-risk",
            "num-server-rounds": rounds,
            "spec": str(cohort.spec),
            "runs-dir": str(out / "runs"),
            "run-name": "bench",
            "secure-aggregation": secure,
        }
        started = time.perf_counter()
        result = simulate(run_config)
        wall = time.perf_counter() - started

        run_dir = out / "runs" / "bench"
        stamps = [
            (run_dir / f"round-{r}" / "manifest.json").stat().st_mtime for r in range(1, rounds + 1)
        ]
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        updates = [record.num_updates for record in result.history]
    return {
        "sites": num_sites,
        "secure-aggregation": secure,
        "rounds": rounds,
        "wall-s": wall,
        "round-s": statistics.mean(gaps),
        "round-s-each": gaps,
        "updates-per-round": updates,
    }


def main() -> int:
    """Run the benchmark, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="3,10", help="site counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (>= 2)")
    parser.add_argument("--patients", type=int, default=12, help="patients per synthetic site")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output file")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2, because a round time is a gap between rounds")
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for num_sites in (int(value) for value in args.sites.split(",")):
        for secure in (False, True):
            rows.append(run_once(num_sites, secure, args.rounds, args.patients))

    print(f"{'sites':>5}  {'mode':<8}  {'round s':>8}  {'x plain':>7}  {'wall s':>7}")
    plain: dict[int, float] = {}
    for row in rows:
        if not row["secure-aggregation"]:
            plain[row["sites"]] = row["round-s"]
        ratio = row["round-s"] / plain[row["sites"]]
        mode = "secagg+" if row["secure-aggregation"] else "fedavg"
        print(
            f"{row['sites']:>5}  {mode:<8}  {row['round-s']:>8.2f}  {ratio:>7.2f}  "
            f"{row['wall-s']:>7.1f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created-utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "patients-per-site": args.patients,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
