"""Benchmark FHIR ingestion: time per Observation against an orjson floor, and peak memory.

Run from the repository root:

    .venv/bin/python bench/bench_ingest.py [--data FOLDER] [--repeat 10]

FOLDER is the MIMIC-IV demo FHIR folder (default: $FEDTWIN_SHARED_DATA/mimic-iv-demo-fhir).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.dataset import load_site_dataset
from client.fhir import read_fhir
from client.fhir.stream import discover_sources, iter_resources, validate_resource
from client.report import SourceReport
from client.site_config import SiteConfig
from models.spec import load_spec


def floor(path: Path) -> int:
    """Read the file line by line and parse each line with orjson, nothing else."""
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                orjson.loads(line)
                count += 1
    return count


def timed(function: Callable[[], object], repeats: int = 3) -> float:
    """Return the best wall time of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def peak_mib(function: Callable[[], object]) -> float:
    """Return the peak traced Python allocation of one call, in MiB."""
    gc.collect()
    tracemalloc.start()
    function()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def stream_only(path: Path, validate: bool) -> None:
    """Stream (and optionally validate) every resource without keeping any row."""
    from datetime import UTC

    sources, _ = discover_sources([path])
    for source in sources:
        report = SourceReport(str(source.path), source.kind)
        for raw in iter_resources(source, report):
            if validate:
                validate_resource(raw.data, UTC)


def repeated_copy(source: Path, target: Path, times: int) -> None:
    """Write `times` copies of an NDJSON file, each copy with new resource ids."""
    with source.open("rb") as lines, target.open("wb") as out:
        content = [orjson.loads(line) for line in lines if line.strip()]
        for copy in range(times):
            for resource in content:
                resource = dict(resource, id=f"{resource['id']}-copy{copy}")
                out.write(orjson.dumps(resource) + b"\n")


def machine() -> str:
    """Describe the machine: cores, CPU model and memory."""
    cpu = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores, {cpu}, {memory:.0f} GiB RAM, Python {platform.python_version()}"
    )


def main() -> None:
    default = Path(os.environ.get("FEDTWIN_SHARED_DATA", "../shared/data")) / "mimic-iv-demo-fhir"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default, help="MIMIC-IV demo FHIR folder")
    parser.add_argument("--repeat", type=int, default=10, help="size factor of the large file")
    args = parser.parse_args()

    spec = load_spec()
    observations = args.data / "Observation.ndjson"
    patients = args.data / "Patient.ndjson"
    n = floor(observations)
    read_fhir([patients], spec)  # builds the UCUM registry and imports the R4B models once

    print(f"machine: {machine()}")
    print(
        f"input: {observations} ({n} Observations, {observations.stat().st_size / 2**20:.1f} MiB)"
    )
    base = timed(lambda: floor(observations))
    full = timed(lambda: read_fhir([patients, observations], spec), repeats=2)
    fast = timed(lambda: read_fhir([patients, observations], spec, validate=False))
    validation = timed(lambda: stream_only(observations, validate=True), repeats=1)
    print("| step | total s | us per Observation | x floor |")
    print("|---|---:|---:|---:|")
    for name, seconds in [
        ("floor: read + orjson.loads per line", base),
        ("fedtwin read_fhir (R4B validation on)", full),
        ("fedtwin read_fhir, validate=False", fast),
        ("stream + R4B validation only (no rows)", validation),
    ]:
        print(f"| {name} | {seconds:.2f} | {seconds / n * 1e6:.0f} | {seconds / base:.1f} |")

    with tempfile.TemporaryDirectory() as tmp:
        config = SiteConfig(
            path=Path(tmp) / "site.toml",
            name="bench",
            fhir=(args.data,),
            cells=(),
            spec=None,
            state_dir=Path(tmp) / "state",
            timezone="UTC",
        )
        cold = timed(lambda: load_site_dataset(config, spec), repeats=1)
        warm = timed(lambda: load_site_dataset(config, spec))
        print(f"\nload_site_dataset on {args.data.name}: first {cold:.2f} s, cached {warm:.2f} s")

        large = Path(tmp) / "Observation.ndjson"
        repeated_copy(observations, large, args.repeat)
        print(
            f"\nmemory, {args.repeat}x file {large.stat().st_size / 2**20:.0f} MiB, validate=False"
        )
        print("| what | 1x peak MiB | 10x peak MiB |")
        print("|---|---:|---:|")
        stream_small = peak_mib(lambda: stream_only(observations, validate=False))
        stream_large = peak_mib(lambda: stream_only(large, validate=False))
        print(f"| stream resources | {stream_small:.2f} | {stream_large:.2f} |")
        tables_small = peak_mib(lambda: read_fhir([patients, observations], spec, validate=False))
        tables_large = peak_mib(lambda: read_fhir([patients, large], spec, validate=False))
        print(f"| read_fhir (rows kept) | {tables_small:.1f} | {tables_large:.1f} |")


if __name__ == "__main__":
    main()
