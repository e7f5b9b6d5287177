"""Markdown of docs/results.md from the benchmark's task results, for bench/results.py."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from results_discussion import discussion, steps_per_round
from results_eval import Metrics
from results_run import TaskResult

# Metric columns per task, in table order.
COLUMNS = {
    "lab-forecast": ("mae", "nll", "coverage-90", "n-patients"),
    "crs-risk": ("auroc", "log-loss", "brier", "ece", "n-patients", "n-positive"),
    "cell-state": ("accuracy", "macro-f1", "n-cells", "n-patients"),
}
# The two metrics shown per site, as "first / second".
SITE_COLUMNS = {
    "lab-forecast": ("mae", "coverage-90"),
    "crs-risk": ("auroc", "log-loss"),
    "cell-state": ("accuracy", "macro-f1"),
}
COUNTS = {"n-patients", "n-positive", "n-cells", "num-examples"}
METRIC_NOTES = {
    "lab-forecast": (
        "`mae` and `nll` are on the standardised scale, where 1 is a quarter of the width of "
        "the code's plausible range after its transform (log1p for skewed labs), so the "
        "plausible range spans 4. Lower is better. `coverage-90` is the share of targets "
        "inside the 90% interval, 0.90 is ideal. Baseline: last value carried forward (LOCF) "
        "with a per-code std fitted on the training patients."
    ),
    "crs-risk": (
        "Label: maximum CRS grade ≥ 2 (ASTCT). `auroc` higher is better (0.5 is chance, n/a "
        "with one class). `log-loss`, `brier` and `ece` lower is better. Baseline: CRP ≥ "
        "100 mg/L in days 0 to 3, with Laplace-smoothed training rates; the EASIX row is the "
        "task's second baseline (logistic regression on log2 EASIX)."
    ),
    "cell-state": (
        "Per labelled cell, over the drawn cells (at most 512 per patient) of the held-out "
        "patients. Higher is better for `accuracy` and `macro-f1`. Baseline: the majority "
        "state of the training cells."
    ),
}


@dataclass(frozen=True)
class Setup:
    """Command, date, data folder and duration of one benchmark run."""

    command: str
    date_utc: str
    data: Path
    quick: bool
    total_seconds: float
    load_average: float


def fmt(value: float | None, name: str = "") -> str:
    """Format a metric: integers for counts, three decimals otherwise, n/a when missing."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if name in COUNTS:
        return f"{value:.0f}"
    return f"{value:.3f}"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        first = meminfo.read_text(encoding="utf-8").splitlines()[0].split()
        memory = f", {int(first[1]) / 2**20:.0f} GiB RAM"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{package} {metadata.version(package)}" for package in ("torch", "flwr", "opacus")
    )
    return f"{cores} cores ({cpu}){memory}, no GPU; Python {platform.python_version()}, {versions}"


def _row(label: str, metrics: Metrics, columns: tuple[str, ...]) -> str:
    cells = [fmt(metrics.get(name), name) for name in columns]
    return f"| {label} | " + " | ".join(cells) + " |"


def _table(header: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]


def _pooled_table(result: TaskResult) -> list[str]:
    columns = COLUMNS[result.task]
    lines = _table(("model (trained on)", *columns))
    lines.append(_row("federated, DP (all sites)", result.federated.pooled, columns))
    lines.append(
        _row("centralised, no DP (pooled training patients)", result.centralised.pooled, columns)
    )
    matched = result.matched
    steps = matched.epochs * math.ceil(result.pooled_train_patients / matched.batch_size)
    lines.append(
        _row(
            f"centralised, no DP, federated schedule ({steps} steps of batch {matched.batch_size})",
            result.centralised_matched.pooled,
            columns,
        )
    )
    for name, alone in result.alone.items():
        lines.append(_row(f"{name} alone, DP", alone.pooled, columns))
    lines.append(_row("baseline (pooled training patients)", result.baseline_pooled, columns))
    if result.task == "crs-risk":
        easix = {
            name: result.baseline_pooled.get(f"easix-{name}", math.nan)
            for name in columns
            if name not in COUNTS
        }
        easix.update({name: result.baseline_pooled.get(name, math.nan) for name in COUNTS})
        lines.append(_row("EASIX baseline (pooled training patients)", easix, columns))
    return lines


def _site_cell(metrics: Metrics | None, names: tuple[str, str]) -> str:
    if not metrics:
        return "n/a"
    return " / ".join(fmt(metrics.get(name), name) for name in names)


def _site_table(result: TaskResult) -> list[str]:
    names = SITE_COLUMNS[result.task]
    header = ["model"]
    for site in result.sites:
        mark = " †" if len(site.test) < site.min_cohort else ""
        header.append(f"{site.name} ({len(site.test)} held out){mark}")
    lines = _table(tuple(header))

    def row(label: str, per_site: dict[str, Metrics]) -> str:
        cells = [_site_cell(per_site.get(site.name), names) for site in result.sites]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines.append(row("federated, DP", result.federated.per_site))
    lines.append(row("centralised, no DP", result.centralised.per_site))
    lines.append(row("the site alone, DP", {n: a.own for n, a in result.alone.items()}))
    lines.append(row("baseline (the site's training patients)", result.baseline_site))
    return lines


def _cohort_lines(result: TaskResult) -> list[str]:
    lines = _table(("site", "patients with examples", "training", "held out", "δ", "min cohort"))
    for site in result.sites:
        lines.append(
            f"| {site.name} | {len(site.examples)} | {len(site.train)} | {len(site.test)} | "
            f"{site.delta:.2g} | {site.min_cohort} |"
        )
    return lines


def _lab_code_lines(result: TaskResult) -> list[str]:
    if not result.lab_codes:
        return []
    labels = list(result.lab_codes[0].mae)
    lines = [
        "",
        "Mean absolute error per lab code on the pooled held-out patients, in the code's "
        "canonical unit. Forecast and target are mapped back from the standardised scale; for "
        "log1p codes the forecast is then the median of the predictive distribution. Codes "
        "without held-out targets are left out.",
        "",
        *_table(("code", "unit", "targets", *(f"MAE {label}" for label in labels))),
    ]
    for row in result.lab_codes:
        if row.targets == 0:
            continue
        cells = " | ".join(f"{row.mae[label]:.3g}" for label in labels)
        lines.append(f"| {row.code} | {row.unit} | {row.targets} | {cells} |")
    return lines


def _withheld(result: TaskResult) -> list[str]:
    final = result.manifests[-1] if result.manifests else {}
    return sorted(
        str(entry.get("site"))
        for entry in final.get("evaluate-sites", [])
        if entry.get("status") != "ok"
    )


def _task_section(result: TaskResult, plot: Path, doc: Path) -> list[str]:
    config = result.run_config
    withheld = _withheld(result)
    lines = [
        f"## {result.task}",
        "",
        f"Data: {result.source.description}. Model parameters: {result.parameters}. "
        f"Wall time: data {result.seconds['data']:.0f} s, federation "
        f"{result.seconds['federation']:.0f} s, centralised {result.seconds['centralised']:.0f} s, "
        f"sites alone {result.seconds['site-alone']:.0f} s. Centralised reference: "
        f"learning_rate {result.plain.learning_rate:g}, {result.plain.epochs} epochs (loss "
        f"{result.plain.validation_loss:.3f} on the kept-aside training patients).",
        "",
        *_cohort_lines(result),
        "",
        f"Pooled held-out patients of all sites, after {config.num_server_rounds} rounds:",
        "",
        *_pooled_table(result),
        "",
        METRIC_NOTES[result.task],
        "",
        f"Each site's held-out patients ({' / '.join(SITE_COLUMNS[result.task])}):",
        "",
        *_site_table(result),
    ]
    if any(len(site.test) < site.min_cohort for site in result.sites):
        lines += [
            "",
            "† Fewer held-out patients than the site's min cohort. In the federated run the site "
            "withholds its metrics from the coordinator; this benchmark has all data locally and "
            "computes them anyway, as a researcher benchmarking would.",
        ]
    if withheld and len(withheld) == len(result.sites):
        lines += [
            "",
            "In the federated run's last round no site sent evaluation metrics (each is below "
            "its min cohort), so the coordinator itself saw no evaluation at all.",
        ]
    elif withheld:
        lines += [
            "",
            f"In the federated run's last round, {', '.join(withheld)} sent no evaluation "
            "metrics (below the min cohort), so the coordinator's own evaluation covers only "
            "the other sites.",
        ]
    lines += _lab_code_lines(result)
    lines += ["", f"![{result.task} per round]({plot.relative_to(doc.parent).as_posix()})", ""]
    return lines


def _privacy_section(results: list[TaskResult]) -> list[str]:
    lines = [
        "## Privacy spent per site",
        "",
        "Cumulative ε of each site after the last round, from the federated run's last "
        "checkpoint manifest. Unit: patient (one patient's whole record is one DP-SGD sample). "
        "δ is the site's default 1 / (10 × training patients). The single-site runs used the "
        "same settings and δ and spent the ε in the last column.",
        "",
        *_table(
            (
                "task",
                "site",
                "training patients",
                "rounds",
                "steps",
                "ε (federated)",
                "δ",
                "accountant",
                "unit",
                "ε (site alone)",
            )
        ),
    ]
    for result in results:
        final = result.manifests[-1]
        steps = steps_per_round(result.run_config) * result.run_config.num_server_rounds
        for entry in sorted(final["sites"], key=lambda e: str(e["site"])):
            alone = result.alone.get(entry["site"])
            lines.append(
                f"| {result.task} | {entry['site']} | {entry.get('patients')} | "
                f"{final['round']} | {steps} | {fmt(entry.get('epsilon-total'))} | "
                f"{entry.get('delta', math.nan):.2g} | {str(entry.get('accountant')).upper()} | "
                f"{entry.get('privacy-unit')} | {fmt(alone.epsilon_total) if alone else 'n/a'} |"
            )
    lines += [
        "",
        "The DP noise and the Poisson sampling use torch's default PRNG, not a cryptographically "
        "secure one (Opacus `secure_mode` is off because torchcsprng is not installed), and the "
        "reported training loss is outside the guarantee; see docs/privacy.md.",
        "",
    ]
    return lines


def _held_out_range(results: list[TaskResult]) -> str:
    per_site = [len(site.test) for result in results for site in result.sites]
    pooled = [sum(len(site.test) for site in result.sites) for result in results]
    return (
        f"{min(per_site)} to {max(per_site)} patients per site, {min(pooled)} to {max(pooled)} "
        "pooled"
    )


def _setup_section(results: list[TaskResult], setup: Setup) -> list[str]:
    config = results[0].run_config
    grid = results[0].grid
    steps = steps_per_round(config)
    lines = [
        "## Setup",
        "",
        f"- Date: {setup.date_utc} (UTC). Command: `{setup.command}`"
        + (" (quick mode)." if setup.quick else "."),
        f"- Machine: {_machine()}. Whole script: {setup.total_seconds / 60:.1f} min, with a "
        f"5-minute load average of {setup.load_average:.1f} at the end. A load above 2 means "
        "that other jobs shared the cores, so the times are then upper bounds.",
        "- Data: the real cohorts in the folder named by FEDTWIN_SHARED_DATA, read in place.",
        f"- Federated run: `server.simulation.run_federation` (Flower simulation engine, one "
        f"simulated site per site folder), {config.num_server_rounds} rounds, "
        f"strategy {config.strategy}, local_epochs {config.local_epochs}, learning_rate "
        f"{config.learning_rate}, noise_multiplier {config.noise_multiplier}, max_grad_norm "
        f"{config.max_grad_norm}, sample_rate {config.sample_rate} ({steps} DP-SGD steps per "
        f"round), seed {config.seed}, Opacus RDP accountant.",
        "- Held-out patients: `models.tasks.split_patients(patient_ids, 0.25, seed)` per site, "
        "the split the sites use, so the federated model is scored on the patients its sites "
        "hold out. The script loads every site's data itself and scores the last checkpoint "
        "(`server.checkpoint`) with the task's `evaluate`, per site and on the pooled held-out "
        "patients of all sites.",
        "- Centralised reference: all sites' training patients pooled, plain mini-batch SGD "
        f"(`client.training.train_plain`), batch size {grid.batch_size}, no DP, from the same "
        "initial model. Its learning rate (from "
        f"{', '.join(f'{lr:g}' for lr in grid.learning_rates)}) and epochs (from "
        f"{', '.join(str(e) for e in grid.epochs)}) are chosen by the task's loss on a quarter "
        "of the pooled training patients kept aside; then the model is trained on all of "
        "them. The sites' held-out patients take no part in the choice. A second centralised "
        "model follows the federated run's schedule instead: one epoch per round and local "
        "epoch, in batches of sample_rate × pooled training patients, so it takes about as "
        "many steps as each site. It separates the cost of the short schedule from the cost "
        "of DP.",
        "- Each site alone: `client.training.train_dp` on the site's training patients with the "
        "federated run's settings and δ, one call per round, with its accountant in a temporary "
        "folder so no site's privacy state is touched.",
        "- Baseline: `task.baseline(train, test)`; pooled training patients for the pooled row, "
        "the site's own training patients per site.",
        "- The DP noise and the Poisson batches are drawn from operating-system entropy, not "
        "from the seed, so a rerun gives different DP figures. The held-out sets are small "
        f"({_held_out_range(results)}), so small differences between rows are not meaningful.",
        "",
        "Site folders, built in a temporary folder W with the Python functions behind these "
        "commands (`D` is the data folder):",
        "",
        "```bash",
        *(result.source.command for result in results),
        "```",
        "",
    ]
    return lines


# The per-patient twin is scored by its own script; this page points to it.
TWIN_SECTION = [
    "## Per-patient twin",
    "",
    "Calibration of the twin's forecast intervals (split conformal on each site's held-out "
    "patients), its accuracy against the global model alone and against last value carried "
    "forward, and CRS risk Brier score and calibration slope on the real cohorts are in "
    "docs/results-twin.md, written by `bench/bench_twin.py`.",
]


def render(results: list[TaskResult], plots: dict[str, Path], setup: Setup, doc: Path) -> str:
    """Return the whole docs/results.md text."""
    lines = [
        "# Results on real cohorts",
        "",
        "What patient-level DP federated training gives on the real cohorts, against a "
        "centralised model trained without DP, each site trained alone with DP, and the task's "
        "simple baseline. Written by `bench/results.py` from one run; rerun it to refresh.",
        "",
        *_setup_section(results, setup),
    ]
    for result in results:
        lines += _task_section(result, plots[result.task], doc)
    lines += _privacy_section(results)
    lines += discussion(results)
    lines += ["", *TWIN_SECTION]
    return "\n".join(lines).rstrip() + "\n"
