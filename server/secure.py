"""Secure aggregation: fedtwin's rounds on Flower's SecAgg+ workflow.

Flower 1.42 runs SecAgg+ through its legacy API: `DefaultWorkflow` drives the rounds,
`SecAggPlusWorkflow` is its train step and a legacy `Strategy` configures the sites and
receives the unmasked aggregate. `SecureFedAvg` is that strategy. It sends fedtwin's train
config, reads each site's privacy report from the metrics that travel in clear beside the
masked update, and applies the patient-weighted average update to the global model. The
evaluate step uses fedtwin's Message-API evaluation, then writes the round's checkpoint.

The sites send w_site - w_global, not their weights, so the clipping range of SecAgg+ bounds
the update. The coordinator only ever receives the sum, so none of the per-update checks of
`server.validation` can run. Each manifest records that.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import flwr
import numpy as np
from flwr.app import Context, MetricRecord, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from models.wire import Config, Metric, Reply, Status
from server.aggregation import NDArrays, ServerAdam
from server.checkpoint import RoundRecord, SiteEntry, write_checkpoint
from server.run_config import RunConfig
from server.strategy import (
    PRIVACY_METRICS,
    FedTwinResult,
    FedTwinStrategy,
    SiteWaitTimeoutError,
    build_config_record,
    numpy_to_arrays,
)

__all__ = ["MODULUS_RANGE", "SecureFedAvg", "run_secure", "secure_aggregation_manifest"]

logger = logging.getLogger(__name__)

# Flower's default mask modulus. The sum of the quantized updates stays below it with fewer than
# MODULUS_RANGE / secagg-quantization-range sites (1024 with the defaults).
MODULUS_RANGE = 2**32

_NO_VALIDATION = (
    "The coordinator sees only the sum of the sites' masked updates, so it cannot check a "
    "single update's spec hash, shapes, values or norm; it checks only that the average is "
    "finite."
)


def _share_setting(value: float) -> int | float:
    """Return a SecAgg+ share setting as Flower reads it: a fraction if at most 1, else a count."""
    return value if value <= 1.0 else int(value)


def _scalar(metrics: Mapping[str, Scalar], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _format(value: float | None) -> str:
    return f"{value:.3g}" if value is not None else "not reported"


def _site_entry(metrics: Mapping[str, Scalar], node_id: int) -> SiteEntry:
    """Read a site's status and privacy report from the metrics of its FitRes."""
    patients = _scalar(metrics, Metric.NUM_EXAMPLES)
    secure_rng = metrics.get(Reply.SECURE_RNG)
    ledger_entry = None
    ledger_text = metrics.get(Reply.LEDGER_ENTRY)
    if isinstance(ledger_text, str) and ledger_text:
        try:
            parsed = json.loads(ledger_text)
        except json.JSONDecodeError as err:
            logger.warning("Node %d sent a ledger entry that is not valid JSON (%s).", node_id, err)
        else:
            ledger_entry = parsed if isinstance(parsed, dict) else None
    return SiteEntry(
        site=str(metrics.get(Reply.SITE, "")) or f"node-{node_id}",
        node_id=node_id,
        status=str(metrics.get(Reply.STATUS, "")),
        message=str(metrics.get(Reply.MESSAGE, "")),
        patients=int(patients) if patients is not None else None,
        epsilon_round=_scalar(metrics, Metric.EPSILON_ROUND),
        epsilon_total=_scalar(metrics, Metric.EPSILON_TOTAL),
        delta=_scalar(metrics, Metric.DELTA),
        accountant=str(metrics.get(Reply.ACCOUNTANT, "")),
        secure_rng=secure_rng if isinstance(secure_rng, bool) else None,
        privacy_unit=str(metrics.get(Reply.PRIVACY_UNIT, "")),
        ledger_entry=ledger_entry,
    )


class SecureFedAvg(FedAvg):
    """Legacy FedAvg strategy for SecAgg+ rounds that keeps fedtwin's config and records.

    Parameters
    ----------
    run_config
        The parsed run config, with `secure_aggregation` true.
    initial_arrays
        Global arrays to start from, by name, in the model's state_dict order; the sites
        name the arrays they receive in the same order.
    spec_sha256, run_name
        Identity of the run, sent to the sites every round.
    evaluator
        The Message-API strategy whose round record this strategy fills in, and which
        runs the evaluate step.
    round_offset
        Added to Flower's round number (which starts at 1) to get fedtwin's round; the last
        checkpointed round when resuming.
    node_wait_timeout
        Seconds to wait each round for the sites to connect.
    server_optimizer
        The FedAdam optimizer, with strategy fedadam.
    """

    def __init__(
        self,
        run_config: RunConfig,
        initial_arrays: Mapping[str, np.ndarray],
        *,
        spec_sha256: str,
        run_name: str,
        evaluator: FedTwinStrategy,
        round_offset: int = 0,
        node_wait_timeout: float = 600.0,
        server_optimizer: ServerAdam | None = None,
    ) -> None:
        self.min_sites = max(run_config.min_sites, 2)
        super().__init__(
            fraction_fit=run_config.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=self.min_sites,
            min_evaluate_clients=0,
            min_available_clients=self.min_sites,
        )
        self.run_config = run_config
        self.global_arrays: NDArrays = {name: np.asarray(a) for name, a in initial_arrays.items()}
        self.spec_sha256 = spec_sha256
        self.run_name = run_name
        self.evaluator = evaluator
        self.round_offset = round_offset
        self.node_wait_timeout = node_wait_timeout
        self.server_optimizer = server_optimizer
        self.aggregated_rounds: set[int] = set()
        self.train_metrics: dict[int, MetricRecord] = {}

    def __repr__(self) -> str:
        return f"SecureFedAvg(run={self.run_name!r}, rule={self.run_config.strategy!r})"

    def fedtwin_round(self, server_round: int) -> int:
        """Return fedtwin's round number of Flower's round `server_round`."""
        return server_round + self.round_offset

    def record(self, server_round: int) -> RoundRecord:
        """Return the record of fedtwin round `server_round`, shared with the evaluate step."""
        return self.evaluator.round_record(server_round)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Return the global arrays to start from, in state_dict order."""
        return ndarrays_to_parameters(list(self.global_arrays.values()))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample the round's sites and send each the global arrays and fedtwin's train config.

        Raises
        ------
        SiteWaitTimeoutError
            If fewer than max(min-sites, 2) sites connect within the wait timeout.
        """
        fedtwin_round = self.fedtwin_round(server_round)
        if not client_manager.wait_for(self.min_sites, timeout=int(self.node_wait_timeout)):
            msg = (
                f"Only {client_manager.num_available()} of the {self.min_sites} sites that "
                f"secure aggregation needs connected within {self.node_wait_timeout:g} s; "
                f"start more SuperNodes."
            )
            raise SiteWaitTimeoutError(msg)

        # Seeded per round like FedTwinStrategy, so a resumed run samples the same sites.
        proxies = sorted(client_manager.all().values(), key=lambda proxy: proxy.node_id)
        size = min(
            len(proxies),
            max(self.min_sites, math.ceil(self.run_config.fraction_train * len(proxies))),
        )
        sampled = random.Random(f"{self.run_config.seed}-{fedtwin_round}").sample(proxies, size)

        # build_config_record holds only scalars, which is what legacy FitIns configs allow.
        config_record = build_config_record(
            self.run_config, spec_sha256=self.spec_sha256, run_name=self.run_name
        )
        config = cast(dict[str, Scalar], dict(config_record))
        config[Config.SERVER_ROUND] = fedtwin_round
        self.record(fedtwin_round)
        logger.info(
            "Round %d: sending SecAgg+ train messages to %d sites.", fedtwin_round, len(sampled)
        )
        return [(proxy, FitIns(parameters, dict(config))) for proxy in sampled]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Return no legacy evaluate instructions; sites evaluate through the Message API."""
        return []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record each site's report and apply the unmasked average update to the global model.

        SecAgg+ gives every FitRes the same parameters: the average of the sites' updates,
        weighted by patients (sites without an update send weight 0).
        """
        fedtwin_round = self.fedtwin_round(server_round)
        record = self.record(fedtwin_round)
        for failure in failures:
            record.errors.append(
                {"phase": "train", "node-id": None, "code": None, "reason": str(failure)}
            )

        entries = [_site_entry(fit_res.metrics, proxy.node_id) for proxy, fit_res in results]
        record.sites.extend(entries)
        trained = [e for e in entries if e.status == Status.OK and (e.patients or 0) > 0]
        self._log_sites(fedtwin_round, entries)
        if not trained:
            logger.warning(
                "Round %d: no site sent an update; the global model stays unchanged.",
                fedtwin_round,
            )
            return None, {}

        average = parameters_to_ndarrays(results[0][1].parameters)
        new_global = self._apply(average)
        if new_global is None:
            logger.error(
                "Round %d: the SecAgg+ aggregate has NaN or infinite values, or another "
                "number of arrays than the model; the global model stays unchanged.",
                fedtwin_round,
            )
            return None, {}

        self.global_arrays = new_global
        self.aggregated_rounds.add(fedtwin_round)
        record.num_updates = len(trained)
        record.aggregated = True
        record.train_metrics = self._train_metrics(results, trained)
        self.train_metrics[fedtwin_round] = MetricRecord(record.train_metrics)
        logger.info(
            "Round %d: aggregated %d masked updates (%d patients) with SecAgg+ and %s.",
            fedtwin_round,
            len(trained),
            record.train_metrics[Metric.NUM_EXAMPLES],
            self.run_config.strategy,
        )
        return ndarrays_to_parameters(list(new_global.values())), {}

    def _apply(self, average: list[np.ndarray]) -> NDArrays | None:
        """Add the average update to the global arrays, or take a FedAdam step with it."""
        if len(average) != len(self.global_arrays):
            return None
        if not all(np.all(np.isfinite(update)) for update in average):
            return None

        target = {
            name: np.asarray(current, dtype=np.float64) + update.reshape(np.shape(current))
            for (name, current), update in zip(self.global_arrays.items(), average, strict=True)
        }
        if self.server_optimizer is not None:
            target = self.server_optimizer.step(self.global_arrays, target)

        new_global: NDArrays = {}
        for name, current in self.global_arrays.items():
            dtype = np.asarray(current).dtype
            value = target[name]
            new_global[name] = (
                np.rint(value).astype(dtype) if dtype.kind in "iub" else value.astype(dtype)
            )
        return new_global

    def _train_metrics(
        self, results: list[tuple[ClientProxy, FitRes]], trained: list[SiteEntry]
    ) -> dict[str, Any]:
        """Average the sites' non-privacy scalar metrics, weighted by patients."""
        trained_nodes = {entry.node_id: float(entry.patients or 0) for entry in trained}
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for proxy, fit_res in results:
            weight = trained_nodes.get(proxy.node_id)
            if weight is None:
                continue
            for key in fit_res.metrics:
                number = _scalar(fit_res.metrics, key)
                if key in PRIVACY_METRICS or key == Metric.NUM_EXAMPLES or number is None:
                    continue
                sums[key] = sums.get(key, 0.0) + weight * number
                weights[key] = weights.get(key, 0.0) + weight
        metrics: dict[str, Any] = {key: sums[key] / weights[key] for key in sums}
        metrics[Metric.NUM_EXAMPLES] = int(sum(trained_nodes.values()))
        metrics["num-sites"] = len(trained)
        return metrics

    def _log_sites(self, fedtwin_round: int, entries: list[SiteEntry]) -> None:
        for entry in entries:
            if entry.status != Status.OK:
                logger.warning(
                    "Round %d: site %s did not train (%s): %s",
                    fedtwin_round,
                    entry.site,
                    entry.status or "no status",
                    entry.message or "no message",
                )
                continue
            logger.info(
                "Round %d: site %s trained on %s patients; epsilon %s this round, %s in total "
                "(delta %s, %s accountant, privacy unit %s).",
                fedtwin_round,
                entry.site,
                entry.patients,
                _format(entry.epsilon_round),
                _format(entry.epsilon_total),
                _format(entry.delta),
                entry.accountant or "unnamed",
                entry.privacy_unit or "not reported",
            )


def secure_aggregation_manifest(run_config: RunConfig, *, halted: bool) -> dict[str, Any]:
    """Return the manifest field that states how a secure round was aggregated."""
    return {
        "enabled": True,
        "protocol": f"SecAgg+ (flwr {flwr.__version__} SecAggPlusWorkflow)",
        "halted": halted,
        "per-update-validation": False,
        "reason": _NO_VALIDATION,
        "update": "w_site - w_global, weighted by patients / max-weight, clipped and quantized",
        "num-shares": run_config.secagg_num_shares,
        "reconstruction-threshold": run_config.secagg_reconstruction_threshold,
        "clipping-range": run_config.secagg_clipping_range,
        "quantization-range": run_config.secagg_quantization_range,
        "max-weight": run_config.secagg_max_weight,
        "modulus-range": MODULUS_RANGE,
    }


class _EvaluateAndCheckpoint:
    """DefaultWorkflow's evaluate step: Message-API evaluation, then the round's checkpoint."""

    def __init__(
        self,
        strategy: SecureFedAvg,
        run_dir: Path,
        result: FedTwinResult,
        timeout: float,
    ) -> None:
        self.strategy = strategy
        self.run_dir = run_dir
        self.result = result
        self.timeout = timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        strategy = self.strategy
        evaluator = strategy.evaluator
        flower_round = cast(
            int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
        )
        server_round = strategy.fedtwin_round(flower_round)
        record = strategy.record(server_round)
        halted = server_round not in strategy.aggregated_rounds and not record.sites
        if halted:
            logger.warning(
                "Round %d: SecAgg+ halted (fewer than 2 sampled sites, or too many dropped "
                "out to rebuild the masks); the global model stays unchanged.",
                server_round,
            )
            record.errors.append(
                {"phase": "train", "node-id": None, "code": None, "reason": "SecAgg+ halted"}
            )

        # Every connected site evaluates the new global model, unmasked, as in the default mode
        arrays = numpy_to_arrays(strategy.global_arrays)
        messages = evaluator.configure_evaluate(
            server_round, arrays, evaluator.config_record(), grid
        )
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        evaluate_metrics = evaluator.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            self.result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
        if server_round in strategy.train_metrics:
            self.result.train_metrics_clientapp[server_round] = strategy.train_metrics[server_round]

        # Checkpoint, with the secure-aggregation facts in the manifest
        round_dir = write_checkpoint(
            self.run_dir,
            record,
            strategy.global_arrays,
            run_name=strategy.run_name,
            run_config=strategy.run_config.to_dict(),
            task=strategy.run_config.task,
            spec_sha256=strategy.spec_sha256,
            optimizer_state=(
                strategy.server_optimizer.state_arrays() if strategy.server_optimizer else None
            ),
            extra={
                "secure-aggregation": secure_aggregation_manifest(
                    strategy.run_config, halted=halted
                )
            },
        )
        logger.info("Round %d: checkpoint written to %s", server_round, round_dir)
        self.result.history.append(record)
        self.result.last_checkpoint = str(round_dir)
        self.result.arrays = arrays


def run_secure(
    grid: Grid,
    run_config: RunConfig,
    arrays: Mapping[str, np.ndarray],
    *,
    spec_sha256: str,
    run_name: str,
    run_dir: Path,
    start_round: int = 1,
    optimizer_state: Mapping[str, np.ndarray] | None = None,
    node_wait_timeout: float = 600.0,
    reply_timeout: float | None = None,
) -> FedTwinResult:
    """Run rounds `start_round` to `num-server-rounds` with SecAgg+; checkpoint each round.

    Parameters
    ----------
    grid
        Flower grid that reaches the sites.
    run_config
        The parsed run config, with `secure_aggregation` true.
    arrays
        Global arrays to start from, in the model's state_dict order.
    spec_sha256, run_name, run_dir
        Identity and checkpoint folder of the run.
    start_round
        First round to run; greater than 1 when resuming.
    optimizer_state
        FedAdam moment estimates from a checkpoint.
    node_wait_timeout
        Seconds to wait each round for the sites to connect.
    reply_timeout
        Seconds to wait for replies in each SecAgg+ stage and evaluate step; by default the
        run config's `round-timeout`.

    Returns
    -------
    FedTwinResult
        Final arrays, metrics per round and the per-round history.
    """
    timeout = reply_timeout if reply_timeout is not None else run_config.round_timeout
    result = FedTwinResult(arrays=numpy_to_arrays(arrays))
    if start_round > run_config.num_server_rounds:
        logger.info("Run %s already has %d rounds; nothing to do.", run_name, start_round - 1)
        return result

    logger.warning(
        "Secure aggregation (SecAgg+) is on for run %s: per-update validation is off. %s",
        run_name,
        _NO_VALIDATION,
    )
    server_optimizer: ServerAdam | None = None
    if run_config.strategy == "fedadam":
        server_optimizer = ServerAdam(learning_rate=run_config.server_learning_rate)
        if optimizer_state:
            server_optimizer.load_state_arrays(optimizer_state)

    evaluator = FedTwinStrategy(
        run_config,
        spec_sha256=spec_sha256,
        run_name=run_name,
        run_dir=run_dir,
        node_wait_timeout=node_wait_timeout,
    )
    evaluator.round_timeout = timeout
    strategy = SecureFedAvg(
        run_config,
        arrays,
        spec_sha256=spec_sha256,
        run_name=run_name,
        evaluator=evaluator,
        round_offset=start_round - 1,
        node_wait_timeout=node_wait_timeout,
        server_optimizer=server_optimizer,
    )
    fit_workflow = SecAggPlusWorkflow(
        num_shares=_share_setting(run_config.secagg_num_shares),
        reconstruction_threshold=_share_setting(run_config.secagg_reconstruction_threshold),
        max_weight=run_config.secagg_max_weight,
        clipping_range=run_config.secagg_clipping_range,
        quantization_range=run_config.secagg_quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow = DefaultWorkflow(
        fit_workflow=fit_workflow,
        evaluate_workflow=_EvaluateAndCheckpoint(strategy, run_dir, result, timeout),
    )

    num_rounds = run_config.num_server_rounds - start_round + 1
    context = LegacyContext(
        Context(
            run_id=grid.run.run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={},
        ),
        config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
        strategy=strategy,
    )
    logger.info(
        "Run %s: rounds %d to %d with SecAgg+ and %s.",
        run_name,
        start_round,
        run_config.num_server_rounds,
        run_config.strategy,
    )
    workflow(grid, context)
    return result
