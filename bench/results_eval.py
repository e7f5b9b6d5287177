"""Training and evaluation of the compared models, for bench/results.py.

Every model is scored with the task's own `evaluate` on held-out patients, so the federated,
centralised and single-site figures use the same metric code as the sites do.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_data import SiteExamples, pool_examples
from torch import nn

from client.training import TrainResult, train_dp, train_plain
from models.examples import TaskExamples
from models.lab_forecast import forecast_targets
from models.spec import FeatureSpec
from models.tasks import TwinTask, split_patients
from privacy.accountant import AccountantStore
from server.app import build_initial_arrays
from server.checkpoint import load_checkpoint
from server.run_config import RunConfig

Metrics = dict[str, float]


def model_from_arrays(
    task: TwinTask, spec: FeatureSpec, arrays: Mapping[str, np.ndarray]
) -> nn.Module:
    """Build the task's model and load a state_dict given as NumPy arrays."""
    model = task.build_model(spec)
    model.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})
    model.eval()
    return model


def initial_model(task: TwinTask, spec: FeatureSpec, run_config: RunConfig) -> nn.Module:
    """Return the untrained global model of round 1, built as the coordinator builds it."""
    return model_from_arrays(task, spec, build_initial_arrays(run_config, spec))


def score(task: TwinTask, model: nn.Module, examples: TaskExamples) -> Metrics:
    """Return the task's metrics of `model` on `examples`; an empty dict when there are none."""
    if len(examples) == 0:
        return {}
    model.eval()
    with torch.no_grad():
        return {name: float(value) for name, value in task.evaluate(model, examples).items()}


@dataclass
class Scores:
    """Metrics of one model on every site's held-out patients and on the pooled held-out set."""

    per_site: dict[str, Metrics] = field(default_factory=dict)
    pooled: Metrics = field(default_factory=dict)


def score_everywhere(
    task: TwinTask, model: nn.Module, sites: list[SiteExamples], pooled_test: TaskExamples
) -> Scores:
    """Score `model` on each site's held-out patients and on all of them together."""
    per_site = {site.name: score(task, model, site.test_examples()) for site in sites}
    return Scores(per_site=per_site, pooled=score(task, model, pooled_test))


def checkpoint_models(
    task: TwinTask, spec: FeatureSpec, run_dir: Path, num_rounds: int
) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Load the global model and manifest of every round 1..num_rounds of a finished run."""
    models = []
    for server_round in range(1, num_rounds + 1):
        checkpoint = load_checkpoint(run_dir / f"round-{server_round}")
        models.append((model_from_arrays(task, spec, checkpoint.arrays), checkpoint.manifest))
    return models


@dataclass(frozen=True)
class PlainSettings:
    """Settings of the centralised, non-private reference training."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    validation_loss: float = math.nan


@dataclass(frozen=True)
class PlainGrid:
    """Candidate epochs and learning rates of the centralised reference, and its batch size."""

    epochs: tuple[int, ...]
    learning_rates: tuple[float, ...]
    batch_size: int
    seed: int


def validation_loss(task: TwinTask, model: nn.Module, examples: TaskExamples) -> float:
    """Return the task's training loss on `examples`, or inf when it is not finite."""
    model.eval()
    with torch.no_grad():
        loss = float(task.loss(model, examples.tensors))
    return loss if math.isfinite(loss) else math.inf


def select_plain_settings(
    task: TwinTask,
    spec: FeatureSpec,
    run_config: RunConfig,
    pooled_train: TaskExamples,
    grid: PlainGrid,
) -> PlainSettings:
    """Choose the reference's epochs and learning rate on an inner split of the training patients.

    A quarter of the pooled training patients (`split_patients` with another seed) is kept
    aside. For each learning rate one model is trained on the rest, and after each number
    of epochs in the grid its loss on the kept-aside patients is measured. The held-out
    patients of the sites take no part in the choice.
    """
    inner_train, inner_val = split_patients(
        pooled_train.patient_ids, holdout_fraction=0.25, seed=grid.seed + 1
    )
    fit = pooled_train.subset(inner_train)
    check = pooled_train.subset(inner_val)
    batch_size = min(grid.batch_size, len(fit))

    best: PlainSettings | None = None
    for learning_rate in grid.learning_rates:
        model = initial_model(task, spec, run_config)
        done = 0
        for epochs in sorted(grid.epochs):
            train_plain(
                model,
                fit.dataset(),
                task.loss,
                epochs=epochs - done,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=grid.seed + done,
            )
            done = epochs
            loss = validation_loss(task, model, check)
            if best is None or loss < best.validation_loss:
                best = PlainSettings(epochs, learning_rate, grid.batch_size, grid.seed, loss)
    if best is None:
        msg = "The centralised grid is empty; give at least one epoch count and learning rate."
        raise ValueError(msg)
    return best


def train_centralised(
    task: TwinTask,
    spec: FeatureSpec,
    run_config: RunConfig,
    pooled_train: TaskExamples,
    settings: PlainSettings,
) -> nn.Module:
    """Train the round-1 model on all sites' training patients with plain SGD, no DP."""
    model = initial_model(task, spec, run_config)
    train_plain(
        model,
        pooled_train.dataset(),
        task.loss,
        epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        batch_size=min(settings.batch_size, len(pooled_train)),
        seed=settings.seed,
    )
    model.eval()
    return model


@dataclass
class SiteAlone:
    """One site trained alone with DP: its model after each round and its privacy record."""

    site: str
    models: list[nn.Module]
    rounds: list[TrainResult]


def train_site_alone(
    task: TwinTask, spec: FeatureSpec, run_config: RunConfig, site: SiteExamples
) -> SiteAlone:
    """Train the round-1 model on one site's training patients with DP-SGD, round by round.

    The settings are the federated run's (noise_multiplier, max_grad_norm, sample_rate,
    local epochs, learning rate, seed per round) and the site's δ. The accountant lives in a
    temporary folder, so no site's real privacy state is touched.
    """
    model = initial_model(task, spec, run_config)
    # Opacus accepts only a module in training mode.
    model.train()
    dataset = site.train_examples().dataset()
    models: list[nn.Module] = []
    rounds: list[TrainResult] = []
    with tempfile.TemporaryDirectory(prefix=f"results-{site.name}-") as state_dir:
        store = AccountantStore(Path(state_dir), task.name)
        for server_round in range(1, run_config.num_server_rounds + 1):
            result = train_dp(
                model,
                dataset,
                task.loss,
                store=store,
                delta=site.delta,
                noise_multiplier=run_config.noise_multiplier,
                max_grad_norm=run_config.max_grad_norm,
                sample_rate=run_config.sample_rate,
                epochs=run_config.local_epochs,
                learning_rate=run_config.learning_rate,
                seed=run_config.seed + server_round,
                run_name="results-site-alone",
                server_round=server_round,
            )
            rounds.append(result)
            snapshot = task.build_model(spec)
            snapshot.load_state_dict(model.state_dict())
            snapshot.eval()
            models.append(snapshot)
    return SiteAlone(site.name, models, rounds)


def pooled_sets(sites: list[SiteExamples]) -> tuple[TaskExamples, TaskExamples]:
    """Return all sites' training patients and all sites' held-out patients, each pooled."""
    train = pool_examples([site.train_examples() for site in sites])
    test = pool_examples([site.test_examples() for site in sites])
    return train, test


# ---------------------------------------------------------------------------
# lab-forecast in canonical units
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeErrors:
    """Absolute forecast errors of one lab code in its canonical unit."""

    code: str
    unit: str
    targets: int
    mae: dict[str, float]


def _to_canonical(z: torch.Tensor, model: nn.Module) -> torch.Tensor:
    # Standardised value -> canonical unit, through the model's spec-derived buffers.
    center = model.get_buffer("center").double()
    scale = model.get_buffer("scale").double()
    is_log = model.get_buffer("log1p") > 0.5
    transformed = z.double() * scale + center
    return torch.where(is_log, torch.expm1(transformed), transformed)


def lab_errors_by_code(
    models: Mapping[str, nn.Module], examples: TaskExamples, spec: FeatureSpec
) -> list[CodeErrors]:
    """Return per code the MAE in canonical units of each model and of LOCF.

    The targets are those of the task's metrics (`forecast_targets`). A prediction and its
    target are both mapped back from the standardised scale, so for a log1p code the
    prediction is the median of the predictive distribution and the target is the bin's
    value (the back-transformed mean of log1p values when a bin holds several).
    """
    values, mask, last, seen = (examples[n] for n in ("values", "mask", "last", "seen"))
    target_z, target_mask = forecast_targets(values, mask, seen)
    keep = target_mask > 0
    reference = next(iter(models.values()))
    target = _to_canonical(target_z, reference)

    predictions = {"LOCF": _to_canonical(last[:, :-1], reference)}
    for label, model in models.items():
        model.eval()
        with torch.no_grad():
            mean_z, _ = model(*examples.tensors)
        predictions[label] = _to_canonical(mean_z[:, :-1], model)

    rows = []
    for c, code in enumerate(examples.meta["codes"]):
        code_keep = keep[..., c]
        count = int(code_keep.sum())
        mae = {
            label: (
                float((prediction[..., c][code_keep] - target[..., c][code_keep]).abs().mean())
                if count
                else math.nan
            )
            for label, prediction in predictions.items()
        }
        rows.append(CodeErrors(code, spec.lab(code).unit, count, mae))
    return rows


def parameter_count(model: nn.Module) -> int:
    """Return the number of trainable parameters, the dimension d of the DP noise."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
