"""Benchmark the per-patient twin: time per patient and accuracy on held-out next values.

For each site folder and lab-forecast checkpoint given, the held-out patients of the run's
split are backtested (`client.twin.backtest`): at each of a patient's latest cut points the
twin is fine-tuned on the history before it and forecasts the next days. Reported: time of
fine-tune + forecast per patient (median, p95) and its ratio to one forward pass of the
global model on that patient's row; MAE (standardised units) of the twin, the global model
and last value carried forward; split-conformal interval coverage (leave one patient out).
With a crs-risk checkpoint, Brier score and calibration slope on the held-out patients.

Usage::

    python bench/bench_twin.py --site DIR --lab CHECKPOINT [--crs CHECKPOINT] [--label NAME] \
        [--horizon 3] --out bench/out/twin-NAME.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.twin.backtest import BacktestRecords, backtest_row
from client.twin.calibration import calibrate_intervals, risk_calibration
from client.twin.forecast import fine_tune, forecast, twin_model
from client.twin.site import open_site
from models.crs_risk import predict_risk
from models.tasks import split_patients


def _timings(
    model: torch.nn.Module, examples: Any, indices: list[int], horizon: int
) -> dict[str, float]:
    bin_hours = float(examples.meta["bin-hours"])
    max_bins = int(examples["values"].shape[1])
    totals, ratios = [], []
    for index in indices:
        row = examples.subset([index]).tensors
        started = time.perf_counter()
        with torch.no_grad():
            model(*row)
        forward = time.perf_counter() - started
        started = time.perf_counter()
        fit = fine_tune(model, row)
        forecast(
            twin_model(model, fit.offset if fit.used else None),
            row,
            horizon,
            bin_hours=bin_hours,
            max_bins=max_bins,
        )
        total = time.perf_counter() - started
        totals.append(total)
        ratios.append(total / forward)
    return {
        "patients": float(len(totals)),
        "seconds-median": statistics.median(totals),
        "seconds-p95": float(np.percentile(totals, 95)),
        "ratio-to-forward-median": statistics.median(ratios),
    }


def _accuracy(records: BacktestRecords) -> dict[str, float]:
    observed = records.array("observed")
    result = {"values": float(len(records)), "patients": float(len(set(records.patient)))}
    for name in ("twin_mean", "global_mean", "locf"):
        result[f"mae-{name.split('_')[0]}"] = float(np.mean(np.abs(observed - records.array(name))))
    result["twin-used-share"] = float(np.mean(records.twin_used)) if len(records) else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, action="append", required=True)
    parser.add_argument("--lab", type=Path, required=True)
    parser.add_argument("--crs", type=Path)
    parser.add_argument("--label", default="cohort")
    parser.add_argument("--horizon", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    records = BacktestRecords()
    timings: list[dict[str, float]] = []
    labels, probabilities = [], []
    for site in args.site:
        checkpoints = [args.lab] + ([args.crs] if args.crs else [])
        context = open_site(site, checkpoints)
        examples = context.examples["lab-forecast"]
        model = context.networks["lab-forecast"]
        _, test = split_patients(examples.patient_ids, seed=context.models["lab-forecast"].seed)
        timings.append(_timings(model, examples, list(range(len(examples))), args.horizon))
        for index in test:
            records.extend(
                backtest_row(
                    model,
                    examples.patient_ids[index],
                    examples.subset([index]).tensors,
                    args.horizon,
                    bin_hours=float(examples.meta["bin-hours"]),
                    max_bins=int(examples["values"].shape[1]),
                )
            )
        if args.crs:
            crs = context.examples["crs-risk"]
            _, crs_test = split_patients(crs.patient_ids, seed=context.models["crs-risk"].seed)
            subset = crs.subset(crs_test)
            labels.extend(subset["label"].numpy().tolist())
            probabilities.extend(predict_risk(context.networks["crs-risk"], subset).tolist())

    calibration = calibrate_intervals(records, args.horizon)
    result = {
        "label": args.label,
        "horizon-days": args.horizon,
        "timing-per-site": timings,
        "accuracy": _accuracy(records),
        "intervals": calibration.to_json(),
        "risk": risk_calibration(labels, probabilities) if args.crs else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
