"""One task of the results benchmark: the federated DP run, references and baselines."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results_data import CohortSource, SiteExamples, build_consortium, load_sites
from results_eval import (
    CodeErrors,
    Metrics,
    PlainGrid,
    PlainSettings,
    Scores,
    checkpoint_models,
    initial_model,
    lab_errors_by_code,
    parameter_count,
    pooled_sets,
    score,
    score_everywhere,
    select_plain_settings,
    train_centralised,
    train_site_alone,
)

from models.spec import FeatureSpec
from models.tasks import get_task
from server.run_config import RunConfig, parse_run_config
from server.simulation import run_federation
from server.strategy import FedTwinResult

logger = logging.getLogger(__name__)


@dataclass
class SiteAloneScores:
    """A site trained alone with DP: scores of its final model and pooled scores per round."""

    own: Metrics
    pooled: Metrics
    pooled_by_round: list[Metrics]
    epsilon_total: float
    delta: float
    accountant: str


@dataclass
class TaskResult:
    """Everything the report states about one task."""

    source: CohortSource
    run_config: RunConfig
    grid: PlainGrid
    plain: PlainSettings
    sites: list[SiteExamples]
    parameters: int
    federated: Scores
    federated_by_round: list[Metrics]
    manifests: list[dict[str, Any]]
    centralised: Scores
    matched: PlainSettings
    centralised_matched: Scores
    alone: dict[str, SiteAloneScores]
    baseline_pooled: Metrics
    baseline_site: dict[str, Metrics]
    lab_codes: list[CodeErrors] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The task name."""
        return self.source.task

    @property
    def pooled_train_patients(self) -> int:
        """The training patients of all sites together."""
        return sum(len(site.train) for site in self.sites)


def _federate(run_config: dict[str, Any]) -> FedTwinResult:
    results: list[FedTwinResult] = []
    run_federation(run_config, cpus_per_site=1.0, on_result=results.append)
    if not results or not results[0].last_checkpoint:
        msg = f"The federated {run_config['task']} run ended without a checkpoint; see the log."
        raise RuntimeError(msg)
    return results[0]


def run_task(
    source: CohortSource,
    *,
    data: Path,
    work: Path,
    spec: FeatureSpec,
    overrides: dict[str, Any],
    grid: PlainGrid,
) -> TaskResult:
    """Build the task's real consortium, run every compared model and score it."""
    task = get_task(source.task)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    # Site folders and the site's own split of their patients
    consortium = build_consortium(source.task, data, work / source.task)
    raw_config = {
        **overrides,
        "consortium": str(consortium),
        "task": source.task,
        "runs-dir": str(work / "runs"),
        "run-name": f"results-{source.task}",
    }
    run_config = parse_run_config(raw_config)
    sites = load_sites(consortium, task, spec, seed=run_config.seed)
    pooled_train, pooled_test = pooled_sets(sites)
    seconds["data"] = time.perf_counter() - started

    # Federated DP run in the simulation engine, then every round's checkpoint
    started = time.perf_counter()
    result = _federate(raw_config)
    run_dir = Path(result.last_checkpoint).parent
    rounds = checkpoint_models(task, spec, run_dir, run_config.num_server_rounds)
    seconds["federation"] = time.perf_counter() - started

    started = time.perf_counter()
    round_zero = initial_model(task, spec, run_config)
    federated_by_round = [score(task, round_zero, pooled_test)]
    federated_by_round += [score(task, model, pooled_test) for model, _ in rounds]
    final_model = rounds[-1][0]
    federated = score_everywhere(task, final_model, sites, pooled_test)

    # Centralised reference without DP, set up without looking at the held-out patients
    plain = select_plain_settings(task, spec, run_config, pooled_train, grid)
    centralised_model = train_centralised(task, spec, run_config, pooled_train, plain)
    centralised = score_everywhere(task, centralised_model, sites, pooled_test)

    # The same reference with the federated run's schedule: one epoch per local epoch and
    # round, in batches of about sample_rate x patients, so about as many steps as a site takes
    matched = PlainSettings(
        epochs=run_config.num_server_rounds * run_config.local_epochs,
        learning_rate=run_config.learning_rate,
        batch_size=max(1, math.ceil(run_config.sample_rate * len(pooled_train))),
        seed=plain.seed,
    )
    matched_model = train_centralised(task, spec, run_config, pooled_train, matched)
    centralised_matched = score_everywhere(task, matched_model, sites, pooled_test)
    seconds["centralised"] = time.perf_counter() - started

    # Each site alone with DP
    started = time.perf_counter()
    alone: dict[str, SiteAloneScores] = {}
    for site in sites:
        if not site.train:
            continue
        trained = train_site_alone(task, spec, run_config, site)
        last = trained.rounds[-1]
        alone[site.name] = SiteAloneScores(
            own=score(task, trained.models[-1], site.test_examples()),
            pooled=score(task, trained.models[-1], pooled_test),
            pooled_by_round=[score(task, m, pooled_test) for m in trained.models],
            epsilon_total=last.epsilon_total,
            delta=last.delta,
            accountant=last.accountant,
        )
    seconds["site-alone"] = time.perf_counter() - started

    # Simple baseline, pooled and per site
    baseline_pooled = task.baseline(pooled_train, pooled_test)
    baseline_site = {
        site.name: task.baseline(site.train_examples(), site.test_examples())
        for site in sites
        if site.train and site.test
    }

    lab_codes: list[CodeErrors] = []
    if source.task == "lab-forecast":
        models = {"federated DP": final_model, "centralised": centralised_model}
        lab_codes = lab_errors_by_code(models, pooled_test, spec)

    return TaskResult(
        source=source,
        run_config=run_config,
        grid=grid,
        plain=plain,
        sites=sites,
        parameters=parameter_count(final_model),
        federated=federated,
        federated_by_round=federated_by_round,
        manifests=[manifest for _, manifest in rounds],
        centralised=centralised,
        matched=matched,
        centralised_matched=centralised_matched,
        alone=alone,
        baseline_pooled=baseline_pooled,
        baseline_site=baseline_site,
        lab_codes=lab_codes,
        seconds=seconds,
    )
