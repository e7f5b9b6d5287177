"""`fedtwin-site predict` and `fedtwin-site update`: build, refresh and write patient twins.

Exit codes: 0 success (also `update` with nothing to do), 2 invalid site config, spec or
arguments, 3 invalid checkpoint (missing file, malformed manifest, weights that do not
match their SHA-256), 4 checkpoint of another feature spec, 5 unknown patient, 6 patient
without usable observations, 7 `update` of a patient without a saved twin. On an error
nothing is written to `--out` and the twin state is left as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from client.cli import Subcommand, register
from client.twin.errors import NoTwinError, TwinError
from client.twin.fhir_bundle import build_bundle
from client.twin.patient import PatientTwin, build_twin
from client.twin.plot import plot_twin
from client.twin.site import SiteCalibration, SiteContext, open_site, site_calibration
from client.twin.state import load_twin, patient_folder

__all__ = ["run_predict", "run_update", "write_outputs"]

logger = logging.getLogger(__name__)

MAX_HORIZON_DAYS = 14


def _common_arguments(parser: argparse.ArgumentParser, *, out_required: bool) -> None:
    parser.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        required=True,
        metavar="DIR",
        help="round folder of a global model (manifest.json + weights); repeat, one per task",
    )
    parser.add_argument(
        "--site-config", type=Path, required=True, metavar="FILE", help="site.toml or its folder"
    )
    parser.add_argument(
        "--horizon-days",
        type=int,
        default=3,
        metavar="N",
        help=f"days of lab forecast after the last lab day (1 to {MAX_HORIZON_DAYS}, default 3)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=out_required,
        metavar="DIR",
        help="folder for <patient>.bundle.json (FHIR R4 Bundle) and <patient>.forecast.png",
    )


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, out_required=True)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="FHIR Patient.id of the patient")
    who.add_argument("--all-patients", action="store_true", help="one bundle per patient")


def _update_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, out_required=False)
    parser.add_argument("--patient", required=True, metavar="ID", help="FHIR Patient.id")


def write_outputs(twin: PatientTwin, out: Path) -> list[Path]:
    """Write the twin's Bundle and plot into `out`, all or nothing; return the files."""
    bundle = build_bundle(twin)
    name = patient_folder(Path("."), twin.patient_id).name
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".twin-", dir=out))
    try:
        files = [staging / f"{name}.bundle.json"]
        files[0].write_text(json.dumps(bundle, indent=1) + "\n", encoding="utf-8")
        if twin.lab is not None:
            files.append(staging / f"{name}.forecast.png")
            plot_twin(twin, files[-1])
        final = []
        for file in files:
            os.replace(file, out / file.name)
            final.append(out / file.name)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary(twin: PatientTwin, calibration: SiteCalibration) -> str:
    """Return the short terminal summary of one twin."""
    lines = [f"Patient {twin.patient_id}"]
    if twin.lab is not None:
        lab = twin.lab
        lines.append(f"  lab forecast ({twin.versions['lab-forecast']}): {lab.fit.reason}")
        for k, code in enumerate(lab.codes):
            low, high = lab.bounds[0.8]
            lines.append(
                f"    {code:<12} day +1: {lab.median[0, k]:.4g} {lab.units[k]} "
                f"(80% {low[0, k]:.4g} to {high[0, k]:.4g})"
            )
        if calibration.intervals is not None:
            coverage = calibration.intervals.coverage.get("0.9", math.nan)
            lines.append(
                f"    intervals: {calibration.intervals.method} on "
                f"{calibration.intervals.n_patients} held-out patients, 90% coverage "
                f"{coverage:.1%}"
            )
    if twin.risk is not None:
        risk = twin.risk
        brier = risk.calibration.get("brier", math.nan)
        lines.append(
            f"  P(CRS grade >= {risk.positive_grade:g}) = {risk.probability:.2f} "
            f"({twin.versions['crs-risk']}; held-out Brier {brier:.3f})"
        )
    if twin.cells is not None:
        for sample_id, fractions in twin.cells.fractions.iterrows():
            top = fractions.sort_values(ascending=False).head(3)
            text = ", ".join(f"{state} {value:.0%}" for state, value in top.items())
            lines.append(f"  cells {sample_id}: {text}")
    lines.extend(f"  note: {note}" for note in twin.notes)
    return "\n".join(lines)


def _open(args: argparse.Namespace) -> tuple[SiteContext, SiteCalibration]:
    if not 1 <= args.horizon_days <= MAX_HORIZON_DAYS:
        msg = f"--horizon-days is {args.horizon_days}; use 1 to {MAX_HORIZON_DAYS}."
        raise TwinError(msg)
    context = open_site(args.site_config, args.checkpoint, progress=sys.stderr.isatty())
    return context, site_calibration(context, args.horizon_days)


def _fail(command: str, err: TwinError) -> int:
    print(f"fedtwin-site {command}: {err}", file=sys.stderr)
    return err.exit_code


def run_predict(args: argparse.Namespace) -> int:
    """Run `fedtwin-site predict`."""
    try:
        context, calibration = _open(args)
        if not args.all_patients:
            twin = build_twin(context, args.patient, calibration, horizon=args.horizon_days)
            files = write_outputs(twin, args.out)
            twin.commit()
            print(summary(twin, calibration))
            print("wrote " + ", ".join(str(f) for f in files))
            return 0
    except TwinError as err:
        return _fail("predict", err)

    patients = sorted(context.known_patients())
    written, skipped = 0, []
    for patient_id in tqdm(patients, desc="patients", unit="patient", file=sys.stderr):
        try:
            twin = build_twin(context, patient_id, calibration, horizon=args.horizon_days)
        except TwinError as err:
            skipped.append(f"{patient_id}: {err}")
            continue
        write_outputs(twin, args.out)
        twin.commit()
        written += 1
    print(f"wrote {written} bundles to {args.out}; skipped {len(skipped)} patients")
    for line in skipped:
        print(f"  skipped {line}")
    return 0


def run_update(args: argparse.Namespace) -> int:
    """Run `fedtwin-site update`."""
    try:
        context, calibration = _open(args)
        if not load_twin(context.config.state_dir, args.patient):
            msg = (
                f"Patient {args.patient!r} has no saved twin under "
                f"{context.config.state_dir / 'twins'}; run `fedtwin-site predict` first."
            )
            raise NoTwinError(msg)
        twin = build_twin(
            context, args.patient, calibration, horizon=args.horizon_days, mode="update"
        )
        if not twin.changed:
            print(f"Twin of patient {args.patient} is up to date; nothing to do.")
            return 0
        files = write_outputs(twin, args.out) if args.out is not None else []
        twin.commit()
    except TwinError as err:
        return _fail("update", err)
    print(summary(twin, calibration))
    print(f"updated: {', '.join(twin.changed)}")
    if files:
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


register(
    Subcommand(
        name="predict",
        help="fine-tune and run a patient's twin; write a FHIR Bundle and a forecast plot",
        add_arguments=_predict_arguments,
        run=run_predict,
    )
)
register(
    Subcommand(
        name="update",
        help="refresh a patient's saved twin when new observations or a new global model arrived",
        add_arguments=_update_arguments,
        run=run_update,
    )
)
