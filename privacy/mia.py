"""Loss-threshold membership-inference attack: AUC with a DeLong confidence interval.

The attacker guesses "member" when a patient's loss under the model is below a threshold. Sweeping
the threshold gives the ROC curve, whose area is the probability that a random training patient has
a lower loss than a random held-out patient (ties count one half). An AUC near 0.5 means the attack
cannot tell members from non-members. The interval uses DeLong's variance of the AUC (DeLong,
DeLong and Clarke-Pearson, Biometrics 44, 1988) with a normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

__all__ = ["MembershipAudit", "loss_threshold_audit"]


@dataclass(frozen=True)
class MembershipAudit:
    """Result of a loss-threshold attack.

    Attributes
    ----------
    auc
        Area under the ROC curve of the attack.
    ci_low, ci_high
        Bounds of the confidence interval of the AUC, clipped to [0, 1].
    confidence
        Level of the interval, such as 0.95.
    advantage
        Largest true-positive rate minus false-positive rate over all thresholds.
    members, non_members
        Patients in each group.
    """

    auc: float
    ci_low: float
    ci_high: float
    confidence: float
    advantage: float
    members: int
    non_members: int


def _placements(members: np.ndarray, non_members: np.ndarray) -> np.ndarray:
    """Return the m x n matrix of 1 (member loss lower), 0.5 (tie) or 0."""
    difference = non_members[None, :] - members[:, None]
    return np.where(difference > 0, 1.0, np.where(difference == 0, 0.5, 0.0))


def _advantage(members: np.ndarray, non_members: np.ndarray) -> float:
    thresholds = np.unique(np.concatenate([members, non_members]))
    best = 0.0
    for threshold in thresholds:
        true_positive = float(np.mean(members <= threshold))
        false_positive = float(np.mean(non_members <= threshold))
        best = max(best, true_positive - false_positive)
    return best


def loss_threshold_audit(
    member_losses: np.ndarray | list[float],
    non_member_losses: np.ndarray | list[float],
    *,
    confidence: float = 0.95,
) -> MembershipAudit:
    """Run the loss-threshold attack on per-patient losses of training and held-out patients.

    Parameters
    ----------
    member_losses
        Loss of each patient the model was trained on.
    non_member_losses
        Loss of each held-out patient.
    confidence
        Level of the AUC's confidence interval, in (0, 1).

    Raises
    ------
    ValueError
        When a group has fewer than two patients, a loss is not finite, or `confidence` is out of
        range.
    """
    members = np.asarray(member_losses, dtype=float)
    non_members = np.asarray(non_member_losses, dtype=float)
    if members.size < 2 or non_members.size < 2:
        msg = (
            f"the attack needs at least 2 training and 2 held-out patients, got {members.size} "
            f"and {non_members.size}."
        )
        raise ValueError(msg)
    if not (np.all(np.isfinite(members)) and np.all(np.isfinite(non_members))):
        msg = "every per-patient loss must be finite; check the checkpoint and the site's data."
        raise ValueError(msg)
    if not 0 < confidence < 1:
        msg = f"confidence must be in (0, 1), got {confidence}."
        raise ValueError(msg)

    placements = _placements(members, non_members)
    auc = float(placements.mean())

    # DeLong: the AUC's variance from the variance of each patient's mean placement.
    member_components = placements.mean(axis=1)
    non_member_components = placements.mean(axis=0)
    variance = (
        float(np.var(member_components, ddof=1)) / members.size
        + float(np.var(non_member_components, ddof=1)) / non_members.size
    )
    half_width = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(variance, 0.0))
    return MembershipAudit(
        auc=auc,
        ci_low=max(0.0, auc - half_width),
        ci_high=min(1.0, auc + half_width),
        confidence=confidence,
        advantage=_advantage(members, non_members),
        members=int(members.size),
        non_members=int(non_members.size),
    )
