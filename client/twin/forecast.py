"""Per-patient lab-forecast twin: a fine-tuned output bias and multi-day forecasts of one row.

The patient-specific part is the bias of the output layer `head` of `LabForecastNet`:
per panel code, one offset of the forecast change and one of the log-variance (2 × codes
numbers). Every other weight stays the global model's, so the twin is the same network
with a different `head.bias` and keeps the model's interface.

All arrays here are one patient's lab-forecast row: tensors (1, T, ...) in the order of
`models.lab_forecast.TENSOR_NAMES`, standardised with the spec's `LabScaling`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.lab_forecast import LOG_VAR_MAX, LOG_VAR_MIN, forecast_targets

__all__ = [
    "FitOutcome",
    "Forecast",
    "extend_row",
    "fine_tune",
    "forecast",
    "prefix_row",
    "twin_model",
]

Row = tuple[torch.Tensor, ...]

# Fewer bins with a next-day target than this: too little history to fine-tune.
MIN_TARGET_BINS = 4
# Share of the target bins, the latest ones, held out to check that fine-tuning helps.
HOLDOUT_SHARE = 0.25
STEPS = 100
LEARNING_RATE = 0.05
ADAM_BETAS = (0.9, 0.999)
# Prior std of the bias offsets (standardised units): the penalty is |offset|² / (2 · PRIOR_STD²)
# per patient, so a short history moves the twin little from the global model.
PRIOR_STD = 0.5
# The twin must lower the held-out NLL by at least this much (nats per value) to be used.
MIN_GAIN = 1e-3


@dataclass(frozen=True)
class FitOutcome:
    """Result of fine-tuning one patient's output bias.

    Attributes
    ----------
    used
        True when the twin replaces the global model; False means the global model is used.
    offset
        The fitted bias offset (2 × codes), zeros when `used` is False.
    reason
        One sentence on what was decided and why.
    target_bins, holdout_bins
        Bins with a next-day target, and how many of the latest were held out.
    nll_global, nll_twin
        Mean Gaussian NLL (nats per value, standardised) on the held-out bins; NaN when not fit.
    """

    used: bool
    offset: npt.NDArray[np.float32]
    reason: str
    target_bins: int
    holdout_bins: int
    nll_global: float
    nll_twin: float


@dataclass(frozen=True)
class Forecast:
    """Standardised Gaussian forecasts for days 1..H after a row's last bin, each (H, codes)."""

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]


def twin_model(model: nn.Module, offset: npt.ArrayLike | None) -> nn.Module:
    """Return a copy of the global `LabForecastNet` whose `head.bias` carries the offset."""
    twin = copy.deepcopy(model)
    if offset is not None:
        bias = twin.get_parameter("head.bias")
        with torch.no_grad():
            bias.add_(torch.as_tensor(np.asarray(offset), dtype=bias.dtype))
    twin.eval()
    return twin


def prefix_row(row: Row, last: int) -> Row:
    """Return the row cut after position `last`, as if nothing had been observed later.

    Every input feature at a position depends on that position and earlier ones only,
    so the cut row is the row the patient had at that time.
    """
    return tuple(tensor[:, : last + 1] for tensor in row)


def extend_row(row: Row, extra: int, *, bin_hours: float, max_bins: int) -> Row:
    """Append `extra` bins without observations, so the model forecasts further days.

    The appended bins keep the last value and the seen flag, grow the gap since the last
    observation, and advance the time feature, which is how the model saw days without
    a measurement in training.
    """
    if extra <= 0:
        return row
    values, mask, last, seen, gap, time = row
    norm = math.log1p(max_bins)
    steps = torch.arange(1, extra + 1, dtype=torch.float32)[None, :, None]

    since = torch.round(torch.expm1(gap[:, -1:] * norm))
    new_gap = torch.where(
        seen[:, -1:] > 0, torch.log1p(since + steps) / norm, torch.ones_like(since + steps)
    )
    new_time = time[:, -1:].repeat(1, extra, 1)
    day_step = bin_hours / 24.0 / 30.0
    new_time[..., 0] = torch.clamp(time[:, -1:, 0] + steps[..., 0] * day_step, -3.0, 6.0)
    zeros = torch.zeros_like(values[:, -1:]).repeat(1, extra, 1)
    return (
        torch.cat([values, zeros], dim=1),
        torch.cat([mask, zeros], dim=1),
        torch.cat([last, last[:, -1:].repeat(1, extra, 1)], dim=1),
        torch.cat([seen, seen[:, -1:].repeat(1, extra, 1)], dim=1),
        torch.cat([gap, new_gap], dim=1),
        torch.cat([time, new_time], dim=1),
    )


def forecast(
    model: nn.Module, row: Row, horizon: int, *, bin_hours: float, max_bins: int
) -> Forecast:
    """Forecast days 1..horizon after the row's last bin in one forward pass."""
    extended = extend_row(row, horizon - 1, bin_hours=bin_hours, max_bins=max_bins)
    with torch.no_grad():
        mean, log_var = model(*extended)
    start = row[0].shape[1] - 1
    return Forecast(
        mean=mean[0, start : start + horizon].double().numpy(),
        std=torch.exp(0.5 * log_var[0, start : start + horizon]).double().numpy(),
    )


class _HeadCache:
    """The frozen part of the network evaluated once, so each fitting step runs the head alone.

    The input of `head` does not depend on the head's bias, so it is computed with one
    forward pass. A step then applies the head and the same mean and log-variance mapping
    as `LabForecastNet.forward` (a test checks that both give equal outputs).
    """

    def __init__(self, model: nn.Module, row: Row) -> None:
        captured: list[torch.Tensor] = []
        head = model.get_submodule("head")
        handle = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            with torch.no_grad():
                model(*row)
        finally:
            handle.remove()
        self.hidden = captured[0][0]
        self.weight = head.get_parameter("weight").detach()
        self.n_codes = int(row[0].shape[-1])
        self.base = (row[2] * row[3])[0]
        values, mask, _, seen, _, _ = row
        target, target_mask = forecast_targets(values, mask, seen)
        self.target = target[0]
        self.target_mask = target_mask[0]

    def outputs(self, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the standardised mean and log-variance (T, codes) with this head bias."""
        out = self.hidden @ self.weight.T + bias
        delta, raw_log_var = out.split(self.n_codes, dim=-1)
        half_width = 0.5 * (LOG_VAR_MAX - LOG_VAR_MIN)
        middle = 0.5 * (LOG_VAR_MAX + LOG_VAR_MIN)
        return self.base + delta, middle + half_width * torch.tanh(raw_log_var / half_width)

    def losses(self, bias: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Return the mean NLL and the mean absolute error of the targets at `positions`."""
        mean, log_var = self.outputs(bias)
        mu, lv = mean[:-1], log_var[:-1]
        weight = self.target_mask * positions[:, None].float()
        count = weight.sum().clamp(min=1.0)
        nll = 0.5 * (math.log(2.0 * math.pi) + lv + (self.target - mu) ** 2 * torch.exp(-lv))
        error = ((self.target - mu).abs() * weight).sum() / count
        return (nll * weight).sum() / count, float(error.detach())


def _fit_offset(
    cache: _HeadCache,
    base: torch.Tensor,
    positions: torch.Tensor,
    start: npt.NDArray[np.float32],
    steps: int,
) -> npt.NDArray[np.float32]:
    """Fit the bias offset on the targets at `positions`, the other weights frozen."""
    # Adam written out: torch.optim's first use imports torch._dynamo, seconds per process.
    offset = torch.tensor(start, dtype=base.dtype, requires_grad=True)
    first = torch.zeros_like(offset)
    second = torch.zeros_like(offset)
    n_targets = float((cache.target_mask * positions[:, None].float()).sum())
    for step in range(1, steps + 1):
        nll, _ = cache.losses(base + offset, positions)
        penalty = (offset**2).sum() / (2.0 * PRIOR_STD**2 * max(n_targets, 1.0))
        (gradient,) = torch.autograd.grad(nll + penalty, offset)
        with torch.no_grad():
            first.mul_(ADAM_BETAS[0]).add_((1 - ADAM_BETAS[0]) * gradient)
            second.mul_(ADAM_BETAS[1]).add_((1 - ADAM_BETAS[1]) * gradient**2)
            first_hat = first / (1 - ADAM_BETAS[0] ** step)
            second_hat = second / (1 - ADAM_BETAS[1] ** step)
            offset.sub_(LEARNING_RATE * first_hat / (second_hat.sqrt() + 1e-8))
    return np.asarray(offset.detach().numpy(), dtype=np.float32)


def fine_tune(
    model: nn.Module,
    row: Row,
    *,
    start: npt.ArrayLike | None = None,
    steps: int = STEPS,
) -> FitOutcome:
    """Fine-tune the patient's output bias, guarded by the patient's latest observations.

    The latest `HOLDOUT_SHARE` of the bins with a next-day target (at least one) are held
    out. The offset is fitted on the earlier targets and kept only if it lowers the Gaussian
    NLL of the held-out targets by `MIN_GAIN`, without a larger mean absolute error, compared
    with the global model. It is then
    refitted on all targets with the same number of steps. `start` is an earlier offset to
    continue from (an incremental update). Otherwise the global model is used and the reason
    gives the cause.
    """
    n_codes = row[0].shape[-1]
    zero = np.zeros(2 * n_codes, dtype=np.float32)
    initial = zero if start is None else np.asarray(start, dtype=np.float32)
    _, target_mask = forecast_targets(row[0], row[1], row[3])
    has_target = target_mask[0].sum(dim=-1) > 0
    bins = torch.nonzero(has_target).flatten()
    n_bins = int(bins.numel())
    if n_bins < MIN_TARGET_BINS:
        reason = (
            f"global model used: {n_bins} days with a next-day value, fewer than the "
            f"{MIN_TARGET_BINS} needed to fine-tune"
        )
        return FitOutcome(False, zero, reason, n_bins, 0, math.nan, math.nan)

    # Hold out the latest bins, fit on the earlier ones
    n_holdout = max(1, round(HOLDOUT_SHARE * n_bins))
    first_holdout = int(bins[n_bins - n_holdout])
    positions = torch.arange(has_target.shape[0])
    train, holdout = positions < first_holdout, positions >= first_holdout
    cache = _HeadCache(model, row)
    base = model.get_parameter("head.bias").detach()
    offset = _fit_offset(cache, base, train & has_target, initial, steps)
    with torch.no_grad():
        nll_global_t, mae_global = cache.losses(base, holdout & has_target)
        nll_twin_t, mae_twin = cache.losses(base + torch.from_numpy(offset), holdout & has_target)
    nll_global, nll_twin = float(nll_global_t), float(nll_twin_t)
    if not (nll_twin < nll_global - MIN_GAIN and mae_twin <= mae_global):
        reason = (
            f"global model used: fine-tuning did not help on the latest {n_holdout} of "
            f"{n_bins} days (held-out NLL {nll_twin:.3f} vs global {nll_global:.3f}, "
            f"MAE {mae_twin:.3f} vs {mae_global:.3f})"
        )
        return FitOutcome(False, zero, reason, n_bins, n_holdout, nll_global, nll_twin)

    # Refit on every target
    offset = _fit_offset(cache, base, has_target, initial, steps)
    reason = (
        f"twin used: held-out NLL {nll_twin:.3f} vs global {nll_global:.3f}, MAE "
        f"{mae_twin:.3f} vs {mae_global:.3f} on the latest {n_holdout} of {n_bins} days"
    )
    return FitOutcome(True, offset, reason, n_bins, n_holdout, nll_global, nll_twin)
