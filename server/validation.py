"""Checks on a site's model update before the coordinator aggregates it.

A rejected update is left out of the round's aggregate. The checks return a one-line
reason instead of raising, so the strategy can log the reason and store it in the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "AUTO_NORM_FACTOR",
    "AUTO_NORM_MIN_UPDATES",
    "norm_outlier_reason",
    "update_norm",
    "validate_update",
]

# With max-update-norm 0, an update is rejected when its norm exceeds this factor
# times the median norm of the round's other updates.
AUTO_NORM_FACTOR = 10.0
# The automatic bound needs this many updates in the round, the checked one included,
# so that the median of the others rests on at least two values.
AUTO_NORM_MIN_UPDATES = 3


def update_norm(arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of `arrays - global_arrays` over all floating-point parameters."""
    total = 0.0
    for name, reference in global_arrays.items():
        if not np.issubdtype(reference.dtype, np.floating):
            continue
        difference = np.asarray(arrays[name], dtype=np.float64) - reference.astype(np.float64)
        total += float(np.sum(difference * difference))
    return float(np.sqrt(total))


def norm_outlier_reason(norm: float, other_norms: Sequence[float]) -> str | None:
    """Return why an update norm is an outlier among the round's other updates, or None.

    Parameters
    ----------
    norm
        L2 norm of the checked update.
    other_norms
        L2 norms of the round's other valid updates.

    Returns
    -------
    str or None
        A reason if `norm` exceeds `AUTO_NORM_FACTOR` times the median of
        `other_norms`. None when the update passes, when the round has fewer than
        `AUTO_NORM_MIN_UPDATES` updates, or when the median is 0 (no scale to compare
        against).
    """
    if len(other_norms) + 1 < AUTO_NORM_MIN_UPDATES:
        return None
    median = float(np.median(np.asarray(other_norms, dtype=np.float64)))
    if median <= 0.0:
        return None
    bound = AUTO_NORM_FACTOR * median
    if norm > bound:
        return (
            f"update norm {norm:.4g} is above {AUTO_NORM_FACTOR:g} x the median norm "
            f"{median:.4g} of the round's other updates"
        )
    return None


def _structure_reason(
    arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]
) -> str | None:
    missing = sorted(set(global_arrays) - set(arrays))
    if missing:
        return f"missing parameters {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
    extra = sorted(set(arrays) - set(global_arrays))
    if extra:
        return f"unexpected parameters {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")

    for name, reference in global_arrays.items():
        value = arrays[name]
        if value.shape != reference.shape:
            return f"parameter {name} has shape {value.shape}, expected {reference.shape}"
        if value.dtype != reference.dtype:
            return f"parameter {name} has dtype {value.dtype}, expected {reference.dtype}"
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            return f"parameter {name} contains NaN or infinite values"
    return None


def validate_update(
    arrays: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    *,
    spec_sha256: str,
    reply_spec_sha256: str | None,
    max_update_norm: float,
    other_norms: Sequence[float] = (),
) -> str | None:
    """Return why a site update must be rejected, or None if it may be aggregated.

    Parameters
    ----------
    arrays
        The site's model arrays.
    global_arrays
        The global arrays the site received this round.
    spec_sha256
        SHA-256 of the coordinator's feature spec.
    reply_spec_sha256
        SHA-256 of the feature spec the site reports, or None if it sent none.
    max_update_norm
        Largest accepted L2 norm of `arrays - global_arrays`. 0 selects the automatic
        bound of `norm_outlier_reason`, which needs `other_norms`.
    other_norms
        Norms of the round's other valid updates, used only when `max_update_norm` is 0.

    Returns
    -------
    str or None
        The first reason found, in this order: feature spec hash, missing or extra
        parameters, shape, dtype, non-finite values, update norm.
    """
    if reply_spec_sha256 != spec_sha256:
        sent = reply_spec_sha256[:12] if reply_spec_sha256 else "none"
        return (
            f"feature spec SHA-256 {sent}... differs from the coordinator's {spec_sha256[:12]}..."
        )

    reason = _structure_reason(arrays, global_arrays)
    if reason is not None:
        return reason

    norm = update_norm(arrays, global_arrays)
    if max_update_norm > 0.0:
        if norm > max_update_norm:
            return f"update norm {norm:.4g} is above max-update-norm {max_update_norm:g}"
        return None
    return norm_outlier_reason(norm, other_norms)
