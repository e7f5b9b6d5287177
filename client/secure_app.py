"""Site side of secure aggregation: Flower's SecAgg+ mod and a train handler for its messages.

Flower 1.42's `secaggplus_mod` runs SecAgg+ through the legacy fit format (`FitIns` in,
`FitRes` out), and it raises a KeyError on any train message without SecAgg+ settings. So
`secure_aggregation_mod` passes such messages on to the ClientApp's own handlers untouched,
and runs the SecAgg+ stages for the others, with `train_legacy` as the training step. One
ClientApp then serves both modes, and the coordinator's run config chooses between them.

`train_legacy` trains with `client.site_task.SiteTask`, so DP-SGD, the accountant, the site
policy and the signed ledger apply as in the default mode. It returns the update
w_site - w_global, which SecAgg+ weights, clips, quantizes and masks.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common import Status as FlowerStatus
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.site_config import SiteConfigError
from client.site_lookup import resolve_site
from client.site_task import RoundSettings, SiteOutcome, SiteTask
from models.spec import SpecError
from models.wire import Config, Metric, Status

__all__ = ["secure_aggregation_mod", "train_legacy"]

logger = logging.getLogger(__name__)

# One SiteTask per (site.toml, task) in this process. The accountant, ledger and release store
# are files in the site's state folder, so this cache and the one in client.app share them.
_TASKS: dict[tuple[str, str], SiteTask] = {}


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the SecAgg+ stages for SecAgg+ train messages; pass every other message on."""
    is_secure = (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )
    if not is_secure:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, train_legacy)


def _number(config: dict[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"Config key {key!r} must be a number, got {value!r} from the coordinator."
        raise ValueError(msg)
    return float(value)


def _settings(config: dict[str, Any]) -> RoundSettings:
    return RoundSettings(
        run_name=str(config[Config.RUN_NAME]),
        server_round=int(_number(config, Config.SERVER_ROUND)),
        local_epochs=int(_number(config, Config.LOCAL_EPOCHS)),
        learning_rate=_number(config, Config.LEARNING_RATE),
        noise_multiplier=_number(config, Config.NOISE_MULTIPLIER),
        max_grad_norm=_number(config, Config.MAX_GRAD_NORM),
        sample_rate=_number(config, Config.SAMPLE_RATE),
        target_epsilon_per_round=_number(config, Config.TARGET_EPSILON_PER_ROUND),
        proximal_mu=_number(config, Config.PROXIMAL_MU),
        seed=int(_number(config, Config.SEED)),
    )


def _site_task(config: dict[str, Any], context: Context) -> SiteTask:
    consortium = str(config.get(Config.CONSORTIUM, context.run_config.get(Config.CONSORTIUM, "")))
    site = resolve_site(context.node_config, consortium)
    task_name = str(config[Config.TASK])
    key = (str(site.path), task_name)
    if key not in _TASKS:
        _TASKS[key] = SiteTask(site, task_name)
    return _TASKS[key]


def _global_state_dict(site_task: SiteTask, parameters: Parameters) -> dict[str, torch.Tensor]:
    """Name the received arrays after the task model's state_dict, checking count and shapes."""
    template = site_task.task.build_model(site_task.spec).state_dict()
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(template):
        msg = (
            f"the coordinator sent {len(arrays)} arrays, but model {site_task.task.name} has "
            f"{len(template)}; check that coordinator and site run the same fedtwin version"
        )
        raise ValueError(msg)

    state_dict: dict[str, torch.Tensor] = {}
    for (name, tensor), array in zip(template.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(tensor.shape):
            msg = (
                f"array {name} has shape {tuple(array.shape)} from the coordinator, but the "
                f"model expects {tuple(tensor.shape)}"
            )
            raise ValueError(msg)
        state_dict[name] = torch.from_numpy(np.array(array, dtype=array.dtype))
    return state_dict


def _update(
    outcome: SiteOutcome, global_state: dict[str, torch.Tensor]
) -> tuple[list[np.ndarray], int]:
    """Return the update w_site - w_global in the global order and its weight (patients).

    A site without an update sends zeros with weight 0: it still takes part in the protocol,
    so its masks cancel, but adds nothing to the average.
    """
    patients = int(outcome.metrics.get(Metric.NUM_EXAMPLES, 0))
    if outcome.status != Status.OK or outcome.state_dict is None or patients <= 0:
        zeros = [np.zeros(tuple(t.shape), dtype=np.float64) for t in global_state.values()]
        return zeros, 0

    update = [
        outcome.state_dict[name].detach().cpu().numpy().astype(np.float64)
        - tensor.numpy().astype(np.float64)
        for name, tensor in global_state.items()
    ]
    return update, patients


def _reply_metrics(outcome: SiteOutcome, site: str, spec_sha256: str) -> dict[str, Any]:
    """Join the site's metrics and reply fields into the FitRes metrics, which travel in clear."""
    metrics: dict[str, Any] = {key: float(value) for key, value in outcome.metrics.items()}
    metrics.update(outcome.reply_fields(site, spec_sha256))
    return metrics


def _fit_reply(
    msg: Message, update: list[np.ndarray], weight: int, metrics: dict[str, Any]
) -> Message:
    fit_res = FitRes(
        status=FlowerStatus(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(update),
        num_examples=weight,
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=msg)


def train_legacy(msg: Message, context: Context) -> Message:
    """Train on the site's patients from a legacy `FitIns` message; reply with a `FitRes`.

    The FitRes contains the update w_site - w_global, its weight (patients, 0 without an update)
    and, as metrics, the site's metrics and reply fields. A site problem is a reply with
    status `error` and a zero update, not a failed message, so the other sites' masks still
    cancel.
    """
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fit_ins.config)
    site_name = str(context.node_config.get("partition-id", context.node_id))
    spec_sha256 = ""
    global_state: dict[str, torch.Tensor] = {}
    try:
        site_task = _site_task(config, context)
        site_name = site_task.site
        spec_sha256 = site_task.spec.sha256
        global_state = _global_state_dict(site_task, fit_ins.parameters)
        if spec_sha256 != str(config[Config.SPEC_SHA256]):
            outcome = SiteOutcome(
                Status.SPEC_MISMATCH,
                f"site {site_name} uses feature spec {spec_sha256[:12]} "
                f"({site_task.spec.source}); the run uses {str(config[Config.SPEC_SHA256])[:12]}",
            )
        else:
            outcome = site_task.train(global_state, _settings(config))
    except (SiteConfigError, SpecError, ValueError, KeyError, OSError) as err:
        logger.error("Site %s cannot take part: %s", site_name, err)
        outcome = SiteOutcome(Status.ERROR, str(err))

    if not global_state:
        # Without a readable model the zero update takes the shapes the coordinator sent.
        arrays = parameters_to_ndarrays(fit_ins.parameters)
        zeros = [np.zeros(a.shape, dtype=np.float64) for a in arrays]
        return _fit_reply(msg, zeros, 0, _reply_metrics(outcome, site_name, spec_sha256))

    update, weight = _update(outcome, global_state)
    return _fit_reply(msg, update, weight, _reply_metrics(outcome, site_name, spec_sha256))
