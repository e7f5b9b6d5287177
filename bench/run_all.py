"""Run the benchmarks in bench/ with small sizes and keep the raw results under bench/out/.

Run from the repository root (`make bench` does):

    .venv/bin/python bench/run_all.py [--only dp_step,round] [--full]

It runs the benchmarks it has sizes for (`BENCHMARKS`) and lists every other `bench_*.py` script
in bench/ as not run, because those need inputs such as checkpoints (see their --help). Each
benchmark runs in its own process, one after the other, so they do not compete for the
cores. The JSON results go to bench/out/<name>.json and the printed output to
bench/out/<name>.txt. The ingestion benchmark needs the MIMIC-IV demo FHIR folder under
$FEDTWIN_SHARED_DATA (default ../shared/data); without it, it is skipped with a message.
`--full` runs the sizes that docs/benchmarks.md reports, which take several times longer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

# Arguments per benchmark: (small default sizes, sizes reported in docs/benchmarks.md).
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "ingest": (["--repeat", "2"], ["--repeat", "10"]),
    "dp_step": (
        ["--batch-sizes", "8,64", "--trials", "5", "--repeats", "10"],
        ["--batch-sizes", "8,64", "--trials", "7", "--repeats", "20"],
    ),
    "round": (
        ["--repeat", "2", "--num-rounds", "5"],
        ["--repeat", "3", "--num-rounds", "6"],
    ),
    "scale": (
        ["--repeat", "1", "--num-rounds", "3"],
        ["--repeat", "1", "--num-rounds", "4"],
    ),
}


def ingest_data() -> Path:
    """Return the MIMIC-IV demo FHIR folder the ingestion benchmark reads."""
    shared = Path(os.environ.get("FEDTWIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return shared / "mimic-iv-demo-fhir"


def command(name: str, full: bool) -> list[str] | None:
    """Return the command line of one benchmark, or None when its input is missing."""
    small, reported = BENCHMARKS[name]
    arguments = list(reported if full else small)
    script = BENCH_DIR / f"bench_{name}.py"
    if name == "ingest":
        data = ingest_data()
        if not (data / "Observation.ndjson").is_file():
            print(f"skipping ingest: {data} has no Observation.ndjson; set FEDTWIN_SHARED_DATA")
            return None
        # bench_ingest.py prints its tables and writes no JSON file.
        return [sys.executable, str(script), "--data", str(data), *arguments]
    return [sys.executable, str(script), *arguments, "--out", str(OUT_DIR / f"{name}.json")]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run"
    )
    parser.add_argument(
        "--full", action="store_true", help="use the sizes reported in docs/benchmarks.md"
    )
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    failed = []
    for name in names:
        argv = command(name, args.full)
        if argv is None:
            continue
        print(f"=== {name}: {' '.join(argv)}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(
            argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
        )
        (OUT_DIR / f"{name}.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
        print(result.stdout, flush=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            failed.append(name)
            print(f"{name} failed (exit code {result.returncode}) after {seconds:.0f} s:")
            print(result.stderr[-3000:])
        else:
            print(f"{name} finished in {seconds:.0f} s; output in {OUT_DIR}", flush=True)

    others = sorted(
        p.name
        for p in BENCH_DIR.glob("bench_*.py")
        if p.stem.removeprefix("bench_") not in BENCHMARKS
    )
    if others:
        print(f"not run (they need inputs; see their --help): {', '.join(others)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
