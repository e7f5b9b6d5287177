"""FedTwinStrategy: the coordinator's Flower Message-API strategy.

In one round the strategy sends the global model and the train config to the sampled
sites and sorts their replies into errors, refusals and updates. It validates each
update and aggregates the valid ones with the configured rule. Then every connected
site evaluates the new global model, and the round ends with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from models.wire import ARRAYS, CONFIG, METRICS, REPLY, Config, Metric, Reply, Status
from server.aggregation import NDArrays, ServerAdam, trimmed_mean, weighted_average
from server.checkpoint import Rejection, RoundRecord, SiteEntry, write_checkpoint
from server.run_config import RunConfig
from server.validation import norm_outlier_reason, update_norm, validate_update

__all__ = [
    "PRIVACY_METRICS",
    "FedTwinResult",
    "FedTwinStrategy",
    "SiteWaitTimeoutError",
    "arrays_to_numpy",
    "build_config_record",
    "numpy_to_arrays",
    "wait_for_nodes",
]

logger = logging.getLogger(__name__)

# Per-site privacy values: reported per site in the manifest, never averaged across sites.
PRIVACY_METRICS = frozenset(
    {
        Metric.EPSILON_ROUND,
        Metric.EPSILON_TOTAL,
        Metric.DELTA,
        Metric.NOISE_MULTIPLIER,
        Metric.MAX_GRAD_NORM,
        Metric.SAMPLE_RATE,
        Metric.STEPS,
    }
)


class SiteWaitTimeoutError(RuntimeError):
    """Raised when fewer sites than `min-sites` connect within the wait timeout."""


@dataclass
class FedTwinResult(Result):
    """Flower's `Result` plus the per-round history and the last checkpoint folder."""

    history: list[RoundRecord] = field(default_factory=list)
    last_checkpoint: str = ""


def arrays_to_numpy(record: ArrayRecord) -> NDArrays:
    """Return the arrays of an ArrayRecord as NumPy arrays, in the record's order."""
    return {name: array.numpy() for name, array in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Return an ArrayRecord holding NumPy arrays, in the mapping's order."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def build_config_record(run_config: RunConfig, *, spec_sha256: str, run_name: str) -> ConfigRecord:
    """Return the config sent with every train and evaluate message, except the round.

    `proximal-mu` is sent as 0 unless the strategy is fedprox, so sites add the
    proximal term only when FedProx runs.
    """
    proximal_mu = run_config.proximal_mu if run_config.strategy == "fedprox" else 0.0
    return ConfigRecord(
        {
            Config.RUN_NAME: run_name,
            Config.TASK: run_config.task,
            Config.SPEC_SHA256: spec_sha256,
            Config.CONSORTIUM: run_config.consortium,
            Config.LOCAL_EPOCHS: run_config.local_epochs,
            Config.LEARNING_RATE: run_config.learning_rate,
            Config.NOISE_MULTIPLIER: run_config.noise_multiplier,
            Config.MAX_GRAD_NORM: run_config.max_grad_norm,
            Config.SAMPLE_RATE: run_config.sample_rate,
            Config.TARGET_EPSILON_PER_ROUND: run_config.target_epsilon_per_round,
            Config.PROXIMAL_MU: proximal_mu,
            Config.SEED: run_config.seed,
        }
    )


def wait_for_nodes(
    grid: Grid, min_nodes: int, timeout: float, *, poll_interval: float = 1.0
) -> list[int]:
    """Wait until at least `min_nodes` nodes are connected; return their ids.

    Raises
    ------
    SiteWaitTimeoutError
        If fewer nodes are connected after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_count = -1
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= min_nodes:
            return node_ids
        if time.monotonic() >= deadline:
            msg = (
                f"Only {len(node_ids)} of the {min_nodes} sites required by min-sites connected "
                f"within {timeout:g} s; start more SuperNodes or lower min-sites."
            )
            raise SiteWaitTimeoutError(msg)
        if len(node_ids) != last_count:
            logger.info("Waiting for sites: %d of %d connected.", len(node_ids), min_nodes)
            last_count = len(node_ids)
        time.sleep(poll_interval)


def _number(record: Mapping[str, Any] | None, key: str) -> float | None:
    """Return a finite scalar metric, or None when it is absent, a list or not finite."""
    if record is None or key not in record:
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(record: Mapping[str, Any] | None, key: str) -> str:
    if record is None or key not in record:
        return ""
    return str(record[key])


def _ledger_entry(record: Mapping[str, Any] | None, node_id: int) -> dict[str, Any] | None:
    """Parse the signed ledger entry a site sent, kept as sent so its signature still verifies."""
    text = _text(record, Reply.LEDGER_ENTRY)
    if not text:
        return None
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as err:
        logger.warning("Node %d sent a ledger entry that is not valid JSON (%s).", node_id, err)
        return None
    if not isinstance(entry, dict):
        logger.warning("Node %d sent a ledger entry that is not a JSON object.", node_id)
        return None
    return entry


def _weighted_metrics(
    records: list[tuple[Mapping[str, Any], float]], *, exclude: Iterable[str] = ()
) -> dict[str, float]:
    """Average each finite scalar metric over the records that have it, weighted by patients."""
    skip = set(exclude) | {Metric.NUM_EXAMPLES}
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in records:
        for key in metrics:
            value = _number(metrics, key)
            if key in skip or value is None:
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sorted(sums) if weights[key] > 0}


class FedTwinStrategy(Strategy):
    """Federated training of one twin submodel with validation, resume and checkpoints.

    Parameters
    ----------
    run_config
        The parsed run config; it selects the aggregation rule and its settings.
    spec_sha256
        SHA-256 of the consortium feature spec; updates from sites with another
        spec are rejected.
    run_name
        Name stored in messages and manifests.
    run_dir
        Folder that receives one `round-<n>` checkpoint per round.
    node_wait_timeout
        Seconds to wait each round for `min-sites` connected sites.
    optimizer_state
        FedAdam moment estimates from a checkpoint, to resume the server optimizer.
    """

    def __init__(
        self,
        run_config: RunConfig,
        *,
        spec_sha256: str,
        run_name: str,
        run_dir: str | Path,
        node_wait_timeout: float = 600.0,
        optimizer_state: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.run_config = run_config
        self.spec_sha256 = spec_sha256
        self.run_name = run_name
        self.run_dir = Path(run_dir)
        self.node_wait_timeout = node_wait_timeout
        self.history: list[RoundRecord] = []

        self.server_optimizer: ServerAdam | None = None
        if run_config.strategy == "fedadam":
            self.server_optimizer = ServerAdam(learning_rate=run_config.server_learning_rate)
            if optimizer_state:
                self.server_optimizer.load_state_arrays(optimizer_state)

        self._global: NDArrays | None = None
        self._global_record: ArrayRecord | None = None
        self._record: RoundRecord | None = None
        self._sampled: dict[str, list[int]] = {}
        # Site names by node id, learned from replies, to name a site that later sends none.
        self._site_names: dict[int, str] = {}
        self.round_timeout = run_config.round_timeout

    def summary(self) -> None:
        """Log the aggregation rule and the settings that shape a round."""
        config = self.run_config
        logger.info(
            "FedTwinStrategy: run %s, task %s, rule %s, rounds %d, min-sites %d, fraction-train %g",
            self.run_name,
            config.task,
            config.strategy,
            config.num_server_rounds,
            config.min_sites,
            config.fraction_train,
        )
        logger.info(
            "Update bound: %s",
            f"max-update-norm {config.max_update_norm:g}"
            if config.max_update_norm > 0
            else "automatic (10 x median norm of the other updates, with 3 or more updates)",
        )

    def config_record(self) -> ConfigRecord:
        """Return the config this strategy sends to sites, without the round number."""
        return build_config_record(
            self.run_config, spec_sha256=self.spec_sha256, run_name=self.run_name
        )

    def round_record(self, server_round: int) -> RoundRecord:
        """Return the record of round `server_round`, starting a new one for a new round.

        The train and evaluate steps of a round fill in the same record, which the
        round's checkpoint then writes. Only the current round's record is kept, so a request
        for another round starts an empty record and drops the previous one.
        """
        if self._record is None or self._record.server_round != server_round:
            self._record = RoundRecord(server_round=server_round)
        return self._record

    def _sample_nodes(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        node_ids = wait_for_nodes(grid, self.run_config.min_sites, self.node_wait_timeout)
        size = min(
            len(node_ids), max(self.run_config.min_sites, math.ceil(fraction * len(node_ids)))
        )
        # Seeded per round, so a resumed run samples the same sites as an uninterrupted one.
        sampler = random.Random(f"{self.run_config.seed}-{server_round}")
        return sorted(sampler.sample(node_ids, size))

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: list[int],
        message_type: str,
    ) -> list[Message]:
        round_config = ConfigRecord(dict(config))
        round_config[Config.SERVER_ROUND] = server_round
        content = RecordDict({ARRAYS: arrays, CONFIG: round_config})
        return [
            Message(content, node_id, message_type, group_id=str(server_round))
            for node_id in node_ids
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and build their train messages; remember the global arrays sent."""
        self._global_record = arrays
        self._global = arrays_to_numpy(arrays)
        self._record = RoundRecord(server_round=server_round)

        node_ids = self._sample_nodes(grid, server_round, self.run_config.fraction_train)
        self._sampled[MessageType.TRAIN] = node_ids
        logger.info("Round %d: sending train messages to %d sites.", server_round, len(node_ids))
        return self._messages(server_round, arrays, config, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Build evaluate messages for every connected site."""
        node_ids = self._sample_nodes(grid, server_round, 1.0)
        self._sampled[MessageType.EVALUATE] = node_ids
        logger.info("Round %d: sending evaluate messages to %d sites.", server_round, len(node_ids))
        return self._messages(server_round, arrays, config, node_ids, MessageType.EVALUATE)

    def _site_entry(self, message: Message) -> tuple[SiteEntry, Mapping[str, Any] | None]:
        """Read the site's name, status and privacy report from a reply."""
        content = message.content
        reply = content.config_records.get(REPLY)
        metrics = content.metric_records.get(METRICS)
        node_id = message.metadata.src_node_id

        patients = _number(metrics, Metric.NUM_EXAMPLES)
        secure_rng = reply.get(Reply.SECURE_RNG) if reply is not None else None
        entry = SiteEntry(
            site=_text(reply, Reply.SITE) or f"node-{node_id}",
            node_id=node_id,
            status=_text(reply, Reply.STATUS),
            message=_text(reply, Reply.MESSAGE),
            patients=int(patients) if patients is not None else None,
            epsilon_round=_number(metrics, Metric.EPSILON_ROUND),
            epsilon_total=_number(metrics, Metric.EPSILON_TOTAL),
            delta=_number(metrics, Metric.DELTA),
            accountant=_text(reply, Reply.ACCOUNTANT),
            secure_rng=secure_rng if isinstance(secure_rng, bool) else None,
            privacy_unit=_text(reply, Reply.PRIVACY_UNIT),
            ledger_entry=_ledger_entry(reply, node_id),
        )
        if _text(reply, Reply.SITE):
            self._site_names[node_id] = entry.site
        return entry, metrics

    def _check_update(
        self, message: Message, entry: SiteEntry
    ) -> tuple[NDArrays | None, str | None]:
        """Decode and validate one update; return its arrays or the rejection reason."""
        assert self._global is not None  # set by configure_train
        content = message.content
        if ARRAYS not in content.array_records:
            return None, f"reply has status {Status.OK} but no {ARRAYS!r} ArrayRecord"
        if entry.patients is None or entry.patients <= 0:
            return None, f"metric {Metric.NUM_EXAMPLES} is missing or not positive"
        try:
            arrays = arrays_to_numpy(content.array_records[ARRAYS])
        except (TypeError, ValueError) as err:
            return None, f"arrays cannot be decoded as NumPy arrays ({err})"

        reply = content.config_records.get(REPLY)
        reply_sha256 = _text(reply, Reply.SPEC_SHA256) or None
        reason = validate_update(
            arrays,
            self._global,
            spec_sha256=self.spec_sha256,
            reply_spec_sha256=reply_sha256,
            max_update_norm=self.run_config.max_update_norm,
        )
        return (None, reason) if reason else (arrays, None)

    def _reject(self, record: RoundRecord, entry: SiteEntry, reason: str) -> None:
        logger.warning(
            "Round %d: rejected the update of site %s: %s.", record.server_round, entry.site, reason
        )
        record.rejected.append(Rejection(site=entry.site, node_id=entry.node_id, reason=reason))

    def _drop_norm_outliers(
        self, record: RoundRecord, updates: list[tuple[SiteEntry, NDArrays, Mapping[str, Any]]]
    ) -> list[tuple[SiteEntry, NDArrays, Mapping[str, Any]]]:
        """Apply the automatic update-norm bound (max-update-norm 0) to the round's updates."""
        assert self._global is not None
        norms = [update_norm(arrays, self._global) for _, arrays, _ in updates]
        kept = []
        for index, update in enumerate(updates):
            others = norms[:index] + norms[index + 1 :]
            reason = norm_outlier_reason(norms[index], others)
            if reason:
                self._reject(record, update[0], reason)
            else:
                kept.append(update)
        return kept

    def _aggregate(self, updates: list[NDArrays], weights: list[float]) -> NDArrays:
        assert self._global is not None
        rule = self.run_config.strategy
        if rule == "trimmed-mean":
            return trimmed_mean(updates, self.run_config.trim_fraction)
        average = weighted_average(updates, weights)
        if self.server_optimizer is not None:
            return self.server_optimizer.step(self._global, average)
        return average

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and aggregate the round's updates.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global arrays, or the previous ones when no valid update arrived,
            and the patient-weighted train metrics (None without valid updates).
        """
        if self._global is None or self._global_record is None:
            msg = "configure_train must run before aggregate_train: the global arrays are unknown."
            raise RuntimeError(msg)
        record = self.round_record(server_round)

        # Sort replies into errors, refusals and updates
        replies = list(replies)
        updates: list[tuple[SiteEntry, NDArrays, Mapping[str, Any]]] = []
        for message in replies:
            if message.has_error():
                self._log_error(record, message, MessageType.TRAIN)
                continue
            entry, metrics = self._site_entry(message)
            record.sites.append(entry)
            if entry.status == "":
                self._reject(
                    record, entry, f"reply has no {Reply.STATUS!r} in its {REPLY!r} record"
                )
                continue
            if entry.status != Status.OK:
                logger.warning(
                    "Round %d: site %s did not train (%s): %s",
                    server_round,
                    entry.site,
                    entry.status,
                    entry.message or "no message",
                )
                continue
            arrays, reason = self._check_update(message, entry)
            if arrays is None:
                self._reject(record, entry, reason or "invalid update")
                continue
            self._log_privacy(record, entry)
            updates.append((entry, arrays, metrics or {}))
        self._log_missing_replies(record, replies, MessageType.TRAIN)

        if self.run_config.max_update_norm == 0.0:
            updates = self._drop_norm_outliers(record, updates)

        # Aggregate, or keep the previous global model
        if not updates:
            self._log_no_update(record)
            return self._global_record, None

        weights = [float(entry.patients or 0) for entry, _, _ in updates]
        aggregate = self._aggregate([arrays for _, arrays, _ in updates], weights)
        if not all(np.all(np.isfinite(v)) for v in aggregate.values() if v.dtype.kind == "f"):
            logger.error(
                "Round %d: the %s aggregate contains NaN or infinite values; "
                "the global model stays unchanged.",
                server_round,
                self.run_config.strategy,
            )
            return self._global_record, None

        record.num_updates = len(updates)
        record.aggregated = True
        train_metrics: dict[str, MetricRecordValues] = dict(
            _weighted_metrics(
                [
                    (metrics, weight)
                    for (_, _, metrics), weight in zip(updates, weights, strict=True)
                ],
                exclude=PRIVACY_METRICS,
            )
        )
        train_metrics[Metric.NUM_EXAMPLES] = int(sum(weights))
        train_metrics["num-sites"] = len(updates)
        record.train_metrics = train_metrics
        logger.info(
            "Round %d: aggregated %d updates (%d patients) with %s.",
            server_round,
            len(updates),
            int(sum(weights)),
            self.run_config.strategy,
        )
        return numpy_to_arrays(aggregate), MetricRecord(train_metrics)

    def _log_error(self, record: RoundRecord, message: Message, phase: str) -> None:
        node_id = message.metadata.src_node_id
        error = message.error
        logger.warning(
            "Round %d: node %d failed the %s step (error code %d): %s",
            record.server_round,
            node_id,
            phase,
            error.code,
            error.reason,
        )
        record.errors.append(
            {"phase": phase, "node-id": node_id, "code": error.code, "reason": error.reason or ""}
        )

    def _log_missing_replies(
        self, record: RoundRecord, replies: list[Message], message_type: str
    ) -> None:
        """Record the sampled nodes that sent no reply within the round timeout."""
        replied = {message.metadata.src_node_id for message in replies}
        for node_id in self._sampled.get(message_type, []):
            if node_id in replied:
                continue
            site = self._site_names.get(node_id)
            logger.warning(
                "Round %d: %s sent no %s reply within the round timeout of %g s; "
                "it is left out of this step.",
                record.server_round,
                f"site {site} (node {node_id})" if site else f"node {node_id}",
                message_type,
                self.round_timeout,
            )
            error: dict[str, Any] = {
                "phase": message_type,
                "node-id": node_id,
                "code": None,
                "reason": "no reply",
            }
            if site:
                error["site"] = site
            record.errors.append(error)

    def _log_privacy(self, record: RoundRecord, entry: SiteEntry) -> None:
        if entry.epsilon_total is None:
            logger.warning(
                "Round %d: site %s sent an update without an epsilon report.",
                record.server_round,
                entry.site,
            )
            return
        logger.info(
            "Round %d: site %s trained on %s patients; epsilon %.3g this round, %.3g in total "
            "(delta %s, %s accountant, privacy unit %s).",
            record.server_round,
            entry.site,
            entry.patients,
            entry.epsilon_round if entry.epsilon_round is not None else float("nan"),
            entry.epsilon_total,
            f"{entry.delta:.2g}" if entry.delta is not None else "not reported",
            entry.accountant or "unnamed",
            entry.privacy_unit or "not reported",
        )

    def _log_no_update(self, record: RoundRecord) -> None:
        refused = sum(1 for entry in record.sites if entry.status not in (Status.OK, ""))
        logger.warning(
            "Round %d: no valid update (%d refused, %d rejected, %d failed); "
            "the global model stays unchanged.",
            record.server_round,
            refused,
            len(record.rejected),
            len(record.errors),
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the sites' evaluation metrics, weighted by patients.

        Replies with status below-min-cohort carry no metrics and are left out, as are
        errors and replies without a positive `num-examples`.
        """
        record = self.round_record(server_round)
        replies = list(replies)
        self._log_missing_replies(record, replies, MessageType.EVALUATE)
        collected: list[tuple[Mapping[str, Any], float]] = []
        for message in replies:
            if message.has_error():
                self._log_error(record, message, MessageType.EVALUATE)
                continue
            entry, metrics = self._site_entry(message)
            site_report: dict[str, Any] = {
                "site": entry.site,
                "node-id": entry.node_id,
                "status": entry.status,
                "patients": entry.patients,
                "message": entry.message,
            }
            record.evaluate_sites.append(site_report)

            if entry.status == Status.BELOW_MIN_COHORT:
                logger.info(
                    "Round %d: site %s withheld its evaluation metrics (too few patients).",
                    server_round,
                    entry.site,
                )
                continue
            if entry.status != Status.OK:
                logger.warning(
                    "Round %d: site %s did not evaluate (%s): %s",
                    server_round,
                    entry.site,
                    entry.status or "no status",
                    entry.message or "no message",
                )
                continue
            if metrics is None or entry.patients is None or entry.patients <= 0:
                logger.warning(
                    "Round %d: site %s sent evaluation metrics without a positive %s; skipped.",
                    server_round,
                    entry.site,
                    Metric.NUM_EXAMPLES,
                )
                continue
            collected.append((metrics, float(entry.patients)))

        if not collected:
            logger.warning("Round %d: no site sent evaluation metrics.", server_round)
            return None

        evaluate_metrics: dict[str, MetricRecordValues] = dict(_weighted_metrics(collected))
        evaluate_metrics[Metric.NUM_EXAMPLES] = int(sum(weight for _, weight in collected))
        evaluate_metrics["num-sites"] = len(collected)
        record.evaluate_metrics = evaluate_metrics
        logger.info(
            "Round %d: evaluation over %d sites: %s",
            server_round,
            len(collected),
            ", ".join(f"{key} {value:.4g}" for key, value in evaluate_metrics.items()),
        )
        return MetricRecord(evaluate_metrics)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        start_round: int = 1,
    ) -> FedTwinResult:
        """Run server rounds `start_round` to `num_rounds`, writing a checkpoint after each.

        Parameters
        ----------
        grid
            Flower grid that reaches the sites.
        initial_arrays
            Global arrays to start from: a fresh model, or the checkpoint of round
            `start_round - 1` when resuming.
        num_rounds
            Last round to run.
        timeout
            Seconds to wait for the replies of one train or evaluate step; by default the
            run config's `round-timeout`.
        train_config, evaluate_config
            Config sent to sites; by default `config_record()`.
        evaluate_fn
            Optional server-side evaluation, called after each round.
        start_round
            First round to run; greater than 1 when resuming.

        Returns
        -------
        FedTwinResult
            Final arrays, metrics per round and the per-round history.
        """
        if timeout is not None:
            self.round_timeout = timeout
        timeout = self.round_timeout
        train_config = train_config if train_config is not None else self.config_record()
        evaluate_config = evaluate_config if evaluate_config is not None else self.config_record()
        result = FedTwinResult(arrays=initial_arrays)
        self.summary()
        if start_round > num_rounds:
            logger.info(
                "Run %s already has %d rounds; nothing to do.", self.run_name, start_round - 1
            )
            return result

        arrays = initial_arrays
        started = time.monotonic()
        for server_round in range(start_round, num_rounds + 1):
            logger.info("Round %d of %d", server_round, num_rounds)

            # Training
            train_replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            new_arrays, train_metrics = self.aggregate_train(server_round, train_replies)
            if new_arrays is not None:
                arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics

            # Federated evaluation
            evaluate_replies = grid.send_and_receive(
                self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            evaluate_metrics = self.aggregate_evaluate(server_round, evaluate_replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics

            # Server-side evaluation
            if evaluate_fn is not None:
                server_metrics = evaluate_fn(server_round, arrays)
                if server_metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_metrics

            # Checkpoint
            record = self.round_record(server_round)
            round_dir = write_checkpoint(
                self.run_dir,
                record,
                arrays_to_numpy(arrays),
                run_name=self.run_name,
                run_config=self.run_config.to_dict(),
                task=self.run_config.task,
                spec_sha256=self.spec_sha256,
                optimizer_state=(
                    self.server_optimizer.state_arrays() if self.server_optimizer else None
                ),
            )
            logger.info("Round %d: checkpoint written to %s", server_round, round_dir)
            self.history.append(record)
            result.history.append(record)
            result.last_checkpoint = str(round_dir)

        result.arrays = arrays
        logger.info(
            "Run %s: rounds %d to %d finished in %.1f s.",
            self.run_name,
            start_round,
            num_rounds,
            time.monotonic() - started,
        )
        return result
