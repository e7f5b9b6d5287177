"""The coordinator's Flower ServerApp: run config in, checkpointed global model out.

`flwr run .` loads `app`, which reads `[tool.flwr.app.config]` from `context.run_config`.
`make_server_app` builds the same app with overrides on top, for
`flwr.simulation.run_simulation`, which passes an empty run config.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from models.spec import FeatureSpec, SpecError, load_spec
from server.checkpoint import Checkpoint, CheckpointError, load_latest_checkpoint
from server.run_config import RunConfig, RunConfigError, parse_run_config
from server.strategy import (
    FedTwinResult,
    FedTwinStrategy,
    SiteWaitTimeoutError,
    numpy_to_arrays,
    wait_for_nodes,
)
from server.validation import validate_update

__all__ = [
    "InitialArraysFn",
    "app",
    "build_initial_arrays",
    "default_run_name",
    "make_server_app",
    "run_server",
]

logger = logging.getLogger(__name__)

InitialArraysFn = Callable[[RunConfig, FeatureSpec], Mapping[str, np.ndarray]]

# Errors caused by the run's inputs; the ServerApp logs them in one line before re-raising.
_INPUT_ERRORS = (RunConfigError, SpecError, CheckpointError, SiteWaitTimeoutError)


def default_run_name(consortium: str, task: str, spec_sha256: str) -> str:
    """Return the run name used when run-name is empty: `<consortium>-<task>-<spec hash[:8]>`.

    The consortium folder's name is part of it so that two consortia trained on
    the same task never resume each other's checkpoints.
    """
    folder = Path(consortium).name if consortium else ""
    folder = re.sub(r"[^A-Za-z0-9._-]", "-", folder).strip("-.") or "run"
    return f"{folder}-{task}-{spec_sha256[:8]}"


def build_initial_arrays(run_config: RunConfig, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Build the task's model with the run's seed and return its state_dict as NumPy arrays."""
    import torch

    from models.tasks import get_task

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_config.seed)
        model = get_task(run_config.task).build_model(spec)
    return {
        name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()
    }


def _resume_arrays(
    checkpoint: Checkpoint,
    run_config: RunConfig,
    spec: FeatureSpec,
    initial: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Check that a checkpoint belongs to this run's task, spec and model; return its arrays."""
    manifest = checkpoint.manifest
    if manifest.get("task") != run_config.task:
        msg = (
            f"Cannot resume from {checkpoint.path}: it was trained for task "
            f"{manifest.get('task')!r}, not {run_config.task!r}; choose another run-name or "
            f"runs-dir."
        )
        raise CheckpointError(msg)

    reason = validate_update(
        checkpoint.arrays,
        initial,
        spec_sha256=spec.sha256,
        reply_spec_sha256=manifest.get("feature-spec-sha256"),
        max_update_norm=math.inf,
    )
    if reason is not None:
        msg = (
            f"Cannot resume from {checkpoint.path}: {reason}; choose another run-name or "
            f"runs-dir to start a new run."
        )
        raise CheckpointError(msg)
    return {name: checkpoint.arrays[name] for name in initial}


def run_server(
    grid: Grid,
    run_config: RunConfig,
    *,
    initial_arrays_fn: InitialArraysFn | None = None,
    node_wait_timeout: float = 600.0,
    reply_timeout: float | None = None,
) -> FedTwinResult:
    """Run or resume the federated training that `run_config` describes.

    Parameters
    ----------
    grid
        Flower grid that reaches the sites.
    run_config
        The parsed run config.
    initial_arrays_fn
        Builds the initial global arrays from the run config and the feature spec;
        by default `build_initial_arrays`. On resume it still runs, to check that the
        checkpoint fits the model.
    node_wait_timeout
        Seconds to wait for `min-sites` connected sites, before the first round and
        in each round.
    reply_timeout
        Seconds to wait for the sites' replies in one train or evaluate step; by default
        the run config's `round-timeout`.

    Returns
    -------
    FedTwinResult
        Final arrays, metrics and the history of the rounds run now.

    Raises
    ------
    SpecError, CheckpointError, SiteWaitTimeoutError
        On a bad feature spec, a checkpoint that cannot be resumed, or too few sites.
    """
    spec = load_spec(run_config.spec or None)
    run_name = run_config.run_name or default_run_name(
        run_config.consortium, run_config.task, spec.sha256
    )
    run_dir = Path(run_config.runs_dir) / run_name
    initial = dict((initial_arrays_fn or build_initial_arrays)(run_config, spec))

    # Resume from the highest complete round, if the run folder has one
    checkpoint = load_latest_checkpoint(run_dir)
    start_round = 1
    optimizer_state: dict[str, np.ndarray] = {}
    arrays = initial
    if checkpoint is not None:
        arrays = _resume_arrays(checkpoint, run_config, spec, initial)
        start_round = checkpoint.server_round + 1
        optimizer_state = checkpoint.optimizer_state
        logger.info(
            "Resuming run %s from %s: the next round is %d.", run_name, checkpoint.path, start_round
        )
    else:
        logger.info("Starting run %s in %s.", run_name, run_dir)

    if run_config.secure_aggregation:
        # Imported here: the SecAgg+ workflow is only needed in this mode.
        from server.secure import run_secure

        return run_secure(
            grid,
            run_config,
            arrays,
            spec_sha256=spec.sha256,
            run_name=run_name,
            run_dir=run_dir,
            start_round=start_round,
            optimizer_state=optimizer_state,
            node_wait_timeout=node_wait_timeout,
            reply_timeout=reply_timeout,
        )

    # Wait for the sites, then run the rounds
    if start_round <= run_config.num_server_rounds:
        wait_for_nodes(grid, run_config.min_sites, node_wait_timeout)
    strategy = FedTwinStrategy(
        run_config,
        spec_sha256=spec.sha256,
        run_name=run_name,
        run_dir=run_dir,
        node_wait_timeout=node_wait_timeout,
        optimizer_state=optimizer_state,
    )
    result = strategy.start(
        grid,
        numpy_to_arrays(arrays),
        num_rounds=run_config.num_server_rounds,
        timeout=reply_timeout if reply_timeout is not None else run_config.round_timeout,
        start_round=start_round,
    )

    last = result.last_checkpoint or (str(checkpoint.path) if checkpoint is not None else "")
    logger.info("Run %s finished; last checkpoint: %s", run_name, last or "none written")
    return result


def _ensure_log_handler() -> None:
    """Show this package's INFO messages when the host process configured no logging."""
    if logging.getLogger().handlers:
        return
    package_logger = logging.getLogger("server")
    if package_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def _run_from_context(grid: Grid, raw_config: Mapping[str, Any]) -> FedTwinResult:
    _ensure_log_handler()
    try:
        return run_server(grid, parse_run_config(raw_config))
    except _INPUT_ERRORS as err:
        logger.error("Federated run stopped: %s", err)
        raise


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation with the run config Flower passes in `context.run_config`."""
    _run_from_context(grid, dict(context.run_config))


def make_server_app(
    overrides: Mapping[str, Any], *, on_result: Callable[[FedTwinResult], None] | None = None
) -> ServerApp:
    """Return a ServerApp whose run config is `context.run_config` updated with `overrides`.

    Parameters
    ----------
    overrides
        Run config keys and values that replace those in `context.run_config`.
    on_result
        Called with the run's result (final arrays, metrics, per-round history) when
        the run ends, because a simulation does not return the ServerApp's result.

    Raises
    ------
    RunConfigError
        At once, if an override key is unknown or its value is invalid.
    """
    parse_run_config(overrides)
    fixed = dict(overrides)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = _run_from_context(grid, {**dict(context.run_config), **fixed})
        if on_result is not None:
            on_result(result)

    return server_app
