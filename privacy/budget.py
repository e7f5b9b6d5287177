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
    epsilon_of_history,
    site_histories,
    validate_delta,
    validate_mechanism,
    validate_sampling,
)
from privacy.policy import SitePolicy

__all__ = [
    "BudgetDecision",
    "check_policy",
    "check_round",
    "default_delta",
    "noise_for_target",
    "policy_delta",
]


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
    epsilon_all_tasks_before
        Cumulative ε over every task of the site at `delta`, when the policy caps it.
    projected_epsilon_all_tasks
        The same after the round, when it was projected.
    rule
        The policy rule that rejected the round: `task`, `model`, `delta`, `noise`, `epsilon-cap`
        or `epsilon-cap-total`; empty when the round is allowed.
    """

    allowed: bool
    epsilon_before: float
    projected_epsilon: float
    epsilon_cap: float
    delta: float
    accountant: str
    reason: str
    epsilon_all_tasks_before: float | None = None
    projected_epsilon_all_tasks: float | None = None
    rule: str = ""


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

    def decision(allowed: bool, projected: float, reason: str, rule: str = "") -> BudgetDecision:
        return BudgetDecision(
            allowed=allowed,
            epsilon_before=before,
            projected_epsilon=projected,
            epsilon_cap=epsilon_cap,
            delta=delta,
            accountant=store.accountant,
            reason=reason,
            rule=rule,
        )

    # Reject noise below the policy minimum before projecting, because a tiny noise_multiplier can
    # make the accountant return an enormous or infinite ε, and the policy rejects it either way.
    if noise_multiplier < min_noise_multiplier:
        reason = (
            f"noise_multiplier {noise_multiplier:g} is below the site's minimum "
            f"{min_noise_multiplier:g}; ε stays at {before:.2f} ({terms})"
        )
        return decision(False, before, reason, "noise")

    projected = store.projected_epsilon(
        delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
    )
    if projected > epsilon_cap:
        reason = (
            f"round would raise ε from {before:.2f} to {projected:.2f} ({terms}) "
            f"above the cap {epsilon_cap:g}"
        )
        return decision(False, projected, reason, "epsilon-cap")

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


def policy_delta(policy: SitePolicy, n_patients: int) -> float:
    """Return the policy's δ, or `default_delta(n_patients)` when the policy leaves it unset."""
    return policy.delta or default_delta(n_patients)


def _refusal(
    rule: str, reason: str, store: AccountantStore, policy: SitePolicy, delta: float
) -> BudgetDecision:
    before = store.epsilon(delta)
    return BudgetDecision(
        allowed=False,
        epsilon_before=before,
        projected_epsilon=before,
        epsilon_cap=policy.epsilon_cap,
        delta=delta,
        accountant=store.accountant,
        reason=reason,
        rule=rule,
    )


def check_policy(
    *,
    policy: SitePolicy,
    store: AccountantStore,
    model: str,
    n_patients: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> BudgetDecision:
    """Decide whether a site's policy lets it train one more round of `store.task`.

    The checks run in this order, and the first that fails rejects the round: the task and the
    model class are allowed, δ is below 1 / `n_patients`, noise_multiplier meets the minimum, the
    task's cumulative ε stays within `epsilon_cap`, and the cumulative ε over every task in the
    store's state folder stays within `epsilon_cap_total`. Every ε comes from the Opacus
    accountant of the store at δ; nothing is written.

    Parameters
    ----------
    policy
        The site's policy.
    store
        The task's accountant state; its folder holds the other tasks' states too.
    model
        Class name of the network the round trains, such as `CrsRiskNet`.
    n_patients
        Patients the round trains on; they set the default δ and its upper bound.
    noise_multiplier, sample_rate, steps
        The DP-SGD settings of the round.
    """
    delta = policy_delta(policy, n_patients)
    terms = f"unit: {policy.privacy_unit}"

    if not policy.allows_task(store.task):
        reason = (
            f"task {store.task} is not in the policy's allowed-tasks "
            f"({', '.join(policy.allowed_tasks)}) in {policy.source}"
        )
        return _refusal("task", reason, store, policy, delta)
    if not policy.allows_model(model):
        reason = (
            f"model {model} is not in the policy's allowed-models "
            f"({', '.join(policy.allowed_models)}) in {policy.source}"
        )
        return _refusal("model", reason, store, policy, delta)
    if delta * n_patients >= 1:
        reason = (
            f"δ={delta:g} is not below 1 / {n_patients} patients, so it would allow publishing a "
            f"whole patient record; lower delta in {policy.source}"
        )
        return _refusal("delta", reason, store, policy, delta)

    decision = check_round(
        store=store,
        delta=delta,
        epsilon_cap=policy.epsilon_cap,
        noise_multiplier=noise_multiplier,
        min_noise_multiplier=policy.min_noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
    )
    if not decision.allowed or policy.epsilon_cap_total is None:
        return decision

    # ε over all tasks: the Opacus accountant composes the histories of every task at the site
    # with this round's, since all tasks train on the same patients.
    histories = site_histories(store.path.parent)
    histories[store.task] = store.history
    combined = [entry for task in sorted(histories) for entry in histories[task]]
    before_all = epsilon_of_history(store.accountant, combined, delta)
    projected_all = epsilon_of_history(
        store.accountant, [*combined, (noise_multiplier, sample_rate, steps)], delta
    )
    label = f"{accountant_label(store.accountant)}, δ={delta:g}, {terms}"
    if projected_all > policy.epsilon_cap_total:
        reason = (
            f"round would raise the site's ε over all tasks from {before_all:.2f} to "
            f"{projected_all:.2f} ({label}) above the cap {policy.epsilon_cap_total:g}"
        )
        allowed, rule = False, "epsilon-cap-total"
    else:
        reason = (
            f"{decision.reason}; over all tasks {projected_all:.2f} of {policy.epsilon_cap_total:g}"
        )
        allowed, rule = True, ""
    return BudgetDecision(
        allowed=allowed,
        epsilon_before=decision.epsilon_before,
        projected_epsilon=decision.projected_epsilon,
        epsilon_cap=decision.epsilon_cap,
        delta=delta,
        accountant=store.accountant,
        reason=reason,
        epsilon_all_tasks_before=before_all,
        projected_epsilon_all_tasks=projected_all,
        rule=rule,
    )
