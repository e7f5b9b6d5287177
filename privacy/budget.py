"""Site budget policy: decide before a training round whether it fits under the site's ε cap."""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from privacy.accountant import (
    ACCOUNTANTS,
    PRIVACY_UNIT,
    AccountantStore,
    accountant_label,
    validate_delta,
    validate_mechanism,
    validate_sampling,
)

__all__ = ["BudgetDecision", "check_round", "default_delta", "noise_for_target"]


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a site may train one more round, and why.

    Attributes
    ----------
    allowed
        True when the round keeps the cumulative ε within the cap and its noise_multiplier meets
        the site's minimum.
    epsilon_before
        Cumulative ε of the recorded history at `delta`.
    projected_epsilon
        Cumulative ε at `delta` if the round ran; equal to `epsilon_before` when the noise check
        rejects the round before any projection.
    epsilon_cap
        The site's cap on the cumulative ε.
    delta
        δ of every ε above.
    accountant
        `rdp` or `prv`.
    reason
        One line for logs, replies and the ledger.
    """

    allowed: bool
    epsilon_before: float
    projected_epsilon: float
    epsilon_cap: float
    delta: float
    accountant: str
    reason: str


def default_delta(n_patients: int) -> float:
    """Return δ = 1 / (10 · n_patients), which stays below 1 / n as DP-SGD's δ should.

    A δ near 1 / n would allow a mechanism that publishes one whole patient record with
    probability δ and still claims (ε, δ)-DP, so δ is kept an order of magnitude below it.
    """
    if isinstance(n_patients, bool) or not isinstance(n_patients, int) or n_patients < 1:
        msg = f"n_patients must be a positive integer, got {n_patients!r}."
        raise ValueError(msg)
    return 1.0 / (10 * n_patients)


def check_round(
    *,
    store: AccountantStore,
    delta: float,
    epsilon_cap: float,
    noise_multiplier: float,
    min_noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> BudgetDecision:
    """Decide whether one more round keeps the task's cumulative ε within the cap.

    Parameters
    ----------
    store
        The task's accountant state, which is read and not changed.
    delta
        δ at which ε is computed and capped.
    epsilon_cap
        Highest cumulative ε the site's policy allows.
    noise_multiplier
        Noise of the round to check.
    min_noise_multiplier
        Lowest noise_multiplier the site's policy accepts; 0 accepts any positive one.
    sample_rate
        Poisson sampling probability of each patient per step.
    steps
        Noisy optimizer steps the round would take.

    Returns
    -------
    BudgetDecision
        `allowed` is False when the noise is below the minimum or the projected ε exceeds the cap.
    """
    validate_delta(delta)
    validate_mechanism(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    if not math.isfinite(epsilon_cap) or epsilon_cap <= 0:
        msg = f"epsilon_cap must be a positive number, got {epsilon_cap}."
        raise ValueError(msg)
    if not math.isfinite(min_noise_multiplier) or min_noise_multiplier < 0:
        msg = f"min_noise_multiplier must be zero or positive, got {min_noise_multiplier}."
        raise ValueError(msg)

    before = store.epsilon(delta)
    terms = f"{accountant_label(store.accountant)}, δ={delta:g}, unit: {PRIVACY_UNIT}"

    def decision(allowed: bool, projected: float, reason: str) -> BudgetDecision:
        return BudgetDecision(
            allowed=allowed,
            epsilon_before=before,
            projected_epsilon=projected,
            epsilon_cap=epsilon_cap,
            delta=delta,
            accountant=store.accountant,
            reason=reason,
        )

    # Reject noise below the policy minimum before projecting, because a tiny noise_multiplier can
    # make the accountant return an enormous or infinite ε, and the policy rejects it either way.
    if noise_multiplier < min_noise_multiplier:
        reason = (
            f"noise_multiplier {noise_multiplier:g} is below the site's minimum "
            f"{min_noise_multiplier:g}; ε stays at {before:.2f} ({terms})"
        )
        return decision(False, before, reason)

    projected = store.projected_epsilon(
        delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    if projected > epsilon_cap:
        reason = (
            f"round would raise ε from {before:.2f} to {projected:.2f} ({terms}) "
            f"above the cap {epsilon_cap:g}"
        )
        return decision(False, projected, reason)

    reason = (
        f"round raises ε from {before:.2f} to {projected:.2f} ({terms}), "
        f"within the cap {epsilon_cap:g}"
    )
    return decision(True, projected, reason)


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Find a noise_multiplier whose round alone spends at most `target_epsilon` at `delta`.

    Opacus' binary search (`get_noise_multiplier`) does the search, so the round's ε lies within
    0.01 below the target and the noise is close to the smallest that reaches it.

    Raises
    ------
    ValueError
        When an argument is out of range, or when no noise_multiplier up to Opacus' limit of 10⁶
        reaches the target.
    """
    validate_delta(delta)
    validate_sampling(sample_rate=sample_rate, steps=steps)
    if accountant not in ACCOUNTANTS:
        msg = f"accountant {accountant!r} is not supported; use one of {', '.join(ACCOUNTANTS)}."
        raise ValueError(msg)
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        msg = f"target_epsilon must be a positive number, got {target_epsilon}."
        raise ValueError(msg)

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:
        msg = (
            f"no noise_multiplier reaches target_epsilon {target_epsilon:g} at δ={delta:g} with "
            f"sample_rate {sample_rate:g} and {steps} steps ({err}); raise the target or take "
            "fewer steps."
        )
        raise ValueError(msg) from err
