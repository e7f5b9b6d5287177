"""Flower ClientApp of a site: receives the global model, trains with DP on site, evaluates."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_app import secure_aggregation_mod
from client.site_config import SiteConfigError
from client.site_lookup import resolve_site
from client.site_task import RoundSettings, SiteOutcome, SiteTask
from models.spec import SpecError
from models.wire import ARRAYS, CONFIG, METRICS, REPLY, Config, Status

__all__ = ["app"]

logger = logging.getLogger(__name__)

# The mod runs SecAgg+ train messages (run config secure-aggregation = true) through its own
# legacy-format handler and passes every other message to the handlers below unchanged.
app = ClientApp(mods=[secure_aggregation_mod])

# One SiteTask per (site.toml, task) in this process, so the dataset is read once per run.
_TASKS: dict[tuple[str, str], SiteTask] = {}


def _config_value(config: ConfigRecord, context: Context, key: str, default: Any = "") -> Any:
    """Read a setting from the message config, else from the run config."""
    if key in config:
        return config[key]
    return context.run_config.get(key, default)


def _number(config: ConfigRecord, key: str) -> int | float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"Config key {key!r} must be a number, got {value!r} from the coordinator."
        raise ValueError(msg)
    return value


def _int(config: ConfigRecord, key: str) -> int:
    return int(_number(config, key))


def _float(config: ConfigRecord, key: str) -> float:
    return float(_number(config, key))


def _site_task(config: ConfigRecord, context: Context) -> SiteTask:
    consortium = str(_config_value(config, context, Config.CONSORTIUM))
    site = resolve_site(context.node_config, consortium)
    task_name = str(config[Config.TASK])
    key = (str(site.path), task_name)
    if key not in _TASKS:
        _TASKS[key] = SiteTask(site, task_name)
    return _TASKS[key]


def _reply(msg: Message, outcome: SiteOutcome, site: str, spec_sha256: str) -> Message:
    content = RecordDict()
    if outcome.state_dict is not None:
        content[ARRAYS] = ArrayRecord(outcome.state_dict)
    content[METRICS] = MetricRecord(dict(outcome.metrics))
    content[REPLY] = ConfigRecord(outcome.reply_fields(site, spec_sha256))
    return Message(content=content, reply_to=msg)


def _handle(msg: Message, context: Context, *, training: bool) -> Message:
    config = msg.content.config_records[CONFIG]
    site_name = str(context.node_config.get("partition-id", context.node_id))
    try:
        site_task = _site_task(config, context)
        site_name = site_task.site
        if site_task.spec.sha256 != str(config[Config.SPEC_SHA256]):
            outcome = SiteOutcome(
                Status.SPEC_MISMATCH,
                f"site {site_name} uses feature spec {site_task.spec.sha256[:12]} "
                f"({site_task.spec.source}); the run uses {str(config[Config.SPEC_SHA256])[:12]}",
            )
            return _reply(msg, outcome, site_name, site_task.spec.sha256)

        state_dict = msg.content.array_records[ARRAYS].to_torch_state_dict()
        seed = _int(config, Config.SEED)
        if training:
            settings = RoundSettings(
                run_name=str(config[Config.RUN_NAME]),
                server_round=_int(config, Config.SERVER_ROUND),
                local_epochs=_int(config, Config.LOCAL_EPOCHS),
                learning_rate=_float(config, Config.LEARNING_RATE),
                noise_multiplier=_float(config, Config.NOISE_MULTIPLIER),
                max_grad_norm=_float(config, Config.MAX_GRAD_NORM),
                sample_rate=_float(config, Config.SAMPLE_RATE),
                target_epsilon_per_round=_float(config, Config.TARGET_EPSILON_PER_ROUND),
                proximal_mu=_float(config, Config.PROXIMAL_MU),
                seed=seed,
            )
            outcome = site_task.train(state_dict, settings)
        else:
            outcome = site_task.evaluate(state_dict, seed)
        return _reply(msg, outcome, site_name, site_task.spec.sha256)

    except (SiteConfigError, SpecError, ValueError, OSError) as err:
        # A site problem is a clear reply to the coordinator, not a crashed ClientApp.
        logger.error("Site %s cannot take part: %s", site_name, err)
        return _reply(msg, SiteOutcome(Status.ERROR, str(err)), site_name, "")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's patients with patient-level DP."""
    return _handle(msg, context, training=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out patients."""
    return _handle(msg, context, training=False)
