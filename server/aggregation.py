"""Aggregation rules on named NumPy arrays: weighted FedAvg, trimmed mean and FedAdam.

Every function takes model updates as mappings of parameter name to `numpy.ndarray`,
all with the same names, shapes and dtypes (`server.validation` checks that before).
Sums are taken in float64 and cast back to each parameter's dtype; integer buffers
(such as a batch-norm step counter) are rounded.
FedProx aggregates like FedAvg because its proximal term acts in the sites' loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = ["NDArrays", "ServerAdam", "trimmed_mean", "weighted_average"]

NDArrays = dict[str, np.ndarray]


def _cast_like(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    if np.issubdtype(reference.dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value, dtype=reference.dtype)


def _check_same_names(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not updates:
        msg = "Cannot aggregate an empty list of updates."
        raise ValueError(msg)
    names = list(updates[0])
    for index, update in enumerate(updates[1:], start=1):
        if set(update) != set(names):
            msg = f"Update {index} has other parameter names than update 0; validate updates first."
            raise ValueError(msg)
    return names


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> NDArrays:
    """Average updates per parameter, each weighted by its weight (FedAvg).

    Parameters
    ----------
    updates
        Model arrays of each site.
    weights
        One non-negative weight per update, such as the site's number of patients.

    Returns
    -------
    NDArrays
        sum_k(weights[k] * updates[k]) / sum_k(weights[k]) for each parameter.
    """
    names = _check_same_names(updates)
    if len(weights) != len(updates):
        msg = f"Got {len(weights)} weights for {len(updates)} updates."
        raise ValueError(msg)
    factors = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(factors)) or np.any(factors < 0) or factors.sum() <= 0:
        msg = f"Weights must be finite, non-negative and sum to more than 0, got {list(weights)}."
        raise ValueError(msg)
    factors = factors / factors.sum()

    result: NDArrays = {}
    for name in names:
        total = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for factor, update in zip(factors, updates, strict=True):
            total += factor * np.asarray(update[name], dtype=np.float64)
        result[name] = _cast_like(total, updates[0][name])
    return result


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> NDArrays:
    """Average updates coordinate-wise after dropping the extremes.

    For each coordinate, the `floor(trim_fraction * n)` largest and as many smallest of
    the `n` values are dropped and the rest is averaged without weights (Yin et al.,
    "Byzantine-Robust Distributed Learning", ICML 2018, trimmed-mean rule).

    Parameters
    ----------
    updates
        Model arrays of each site.
    trim_fraction
        Fraction cut at each end, at least 0 and below 0.5.

    Returns
    -------
    NDArrays
        The trimmed mean per parameter.
    """
    names = _check_same_names(updates)
    if not 0.0 <= trim_fraction < 0.5:
        msg = f"trim_fraction must be at least 0 and below 0.5, got {trim_fraction}."
        raise ValueError(msg)

    result: NDArrays = {}
    for name in names:
        stacked = np.stack([np.asarray(update[name], dtype=np.float64) for update in updates])
        mean = stats.trim_mean(stacked, trim_fraction, axis=0)
        result[name] = _cast_like(np.asarray(mean), updates[0][name])
    return result


class ServerAdam:
    """FedAdam server optimizer that keeps its moment estimates between rounds.

    The pseudo-gradient of a round is `delta = aggregate - current`, where `aggregate`
    is the FedAvg of the site models. Each step follows Reddi et al., "Adaptive
    Federated Optimization", ICLR 2021, Algorithm 2 (FedAdam), without bias correction::

        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta**2
        w = current + learning_rate * m / (sqrt(v) + tau)

    Integer buffers are not optimised: they take the aggregate's value.

    Parameters
    ----------
    learning_rate
        Server step size (eta), greater than 0.
    beta1, beta2
        Decay of the first and second moment estimates, in [0, 1).
    tau
        Adaptivity constant added to sqrt(v), greater than 0.
    """

    def __init__(
        self,
        *,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if learning_rate <= 0:
            msg = f"The server learning rate must be greater than 0, got {learning_rate}."
            raise ValueError(msg)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            msg = f"beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}."
            raise ValueError(msg)
        if tau <= 0:
            msg = f"tau must be greater than 0, got {tau}."
            raise ValueError(msg)
        self.learning_rate = learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: NDArrays = {}
        self.v: NDArrays = {}

    def step(
        self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]
    ) -> NDArrays:
        """Return the new global arrays after one server step from `current`."""
        _check_same_names([current, aggregate])

        result: NDArrays = {}
        for name, weights in current.items():
            if not np.issubdtype(weights.dtype, np.floating):
                result[name] = np.asarray(aggregate[name]).copy()
                continue

            delta = np.asarray(aggregate[name], dtype=np.float64) - weights.astype(np.float64)
            m = self.m.get(name, np.zeros_like(delta))
            v = self.v.get(name, np.zeros_like(delta))
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            v = self.beta2 * v + (1.0 - self.beta2) * delta**2
            self.m[name] = m
            self.v[name] = v

            updated = weights.astype(np.float64) + self.learning_rate * m / (np.sqrt(v) + self.tau)
            result[name] = updated.astype(weights.dtype)
        return result

    def state_arrays(self) -> NDArrays:
        """Return the moment estimates as flat arrays named `m/<name>` and `v/<name>`."""
        state = {f"m/{name}": value for name, value in self.m.items()}
        state.update({f"v/{name}": value for name, value in self.v.items()})
        return state

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore moment estimates written by `state_arrays`."""
        m: NDArrays = {}
        v: NDArrays = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind == "m" and name:
                m[name] = np.asarray(value, dtype=np.float64)
            elif kind == "v" and name:
                v[name] = np.asarray(value, dtype=np.float64)
            else:
                msg = f"Server optimizer state has the unexpected entry {key!r}."
                raise ValueError(msg)
        if set(m) != set(v):
            msg = "Server optimizer state has first and second moments for different parameters."
            raise ValueError(msg)
        self.m = m
        self.v = v
