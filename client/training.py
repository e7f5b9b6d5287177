"""Local training at a site: patient-level DP-SGD with Opacus, and a non-private reference trainer.

One dataset row is one patient's whole record, so Opacus' per-sample clipping bounds each
patient's influence on a step. Every round is recorded in the task's `AccountantStore`, so ε is
cumulative across rounds and restarts.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from privacy.accountant import (
    SECURE_RNG,
    AccountantStore,
    validate_delta,
    validate_mechanism,
    validate_sampling,
)

__all__ = [
    "LossFn",
    "PrivateTraining",
    "TrainResult",
    "make_private_training",
    "steps_per_epoch",
    "train_dp",
    "train_plain",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
"""Loss of a batch: called as `loss_fn(model, batch)`, returns the mean of the per-patient losses.

The mean must be over the batch dimension (patients), because Opacus rescales the gradient of a
mean by the batch size to recover per-patient gradients.
"""

_SECURE_RNG_WARNING = "Secure RNG turned off"
# torch warns on every backward pass through Opacus' hooks when the inputs do not require gradients,
# which is the normal case for training data.
_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"
_insecure_rng_logged = False


@dataclass
class TrainResult:
    """Outcome and privacy cost of one DP-SGD round.

    Attributes
    ----------
    loss
        Mean training loss over the patients sampled in the round, without the FedProx term.
        It is computed without noise, so the DP guarantee does not cover it.
    steps
        Noisy optimizer steps, counted by the Opacus accountant of the round.
    num_examples
        Patients in the local dataset.
    epsilon_round
        ε of this round alone at `delta`.
    epsilon_total
        Cumulative ε of the task at the site at `delta`, this round included.
    delta
        δ of both ε values.
    noise_multiplier
        Ratio of the noise's standard deviation to `max_grad_norm`.
    max_grad_norm
        Per-patient clipping bound on the gradient's L2 norm.
    sample_rate
        Poisson sampling probability of each patient per step.
    accountant
        `rdp` or `prv`.
    """

    loss: float
    steps: int
    num_examples: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    accountant: str


@dataclass
class PrivateTraining:
    """The Opacus objects of one round: engine, wrapped module, DP optimizer and Poisson loader."""

    engine: PrivacyEngine
    module: Any  # opacus GradSampleModule wrapping the caller's model
    optimizer: Any  # opacus DPOptimizer
    data_loader: DataLoader[tuple[Tensor, ...]]


def steps_per_epoch(sample_rate: float) -> int:
    """Return round(1 / sample_rate): steps per epoch, so each patient is sampled about once."""
    validate_sampling(sample_rate=sample_rate, steps=1)
    return max(1, round(1 / sample_rate))


def _random_generator(device: torch.device) -> torch.Generator:
    """Return a torch generator seeded from the operating system's entropy, never from a seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def _poisson_loader(
    dataset: TensorDataset, *, sample_rate: float, steps: int
) -> DataLoader[tuple[Tensor, ...]]:
    """Build a loader of `steps` batches, each patient joining each batch with `sample_rate`."""
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset),
        sample_rate=sample_rate,
        generator=_random_generator(torch.device("cpu")),
        steps=steps,
    )
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *tensor.shape) for tensor in first],
        dtypes=[tensor.dtype for tensor in first],
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def _new_privacy_engine(accountant: str) -> PrivacyEngine:
    """Create a PrivacyEngine, logging the insecure-RNG caveat once per process."""
    global _insecure_rng_logged
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SECURE_RNG_WARNING)
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    if not SECURE_RNG and not _insecure_rng_logged:
        logger.warning(
            "DP noise and Poisson sampling use torch's default PRNG, not a cryptographically "
            "secure one (Opacus secure_mode needs torchcsprng, which is not installed)"
        )
        _insecure_rng_logged = True
    return engine


def make_private_training(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    learning_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> PrivateTraining:
    """Attach Opacus to `model` for one round of `steps` Poisson-sampled DP-SGD steps.

    The loader samples each patient with exactly `sample_rate`, and the engine's accountant counts
    each step at that rate, not at Opacus' default of 1 / len(loader), which differs when
    1 / sample_rate is not an integer. A noise_multiplier of 0 clips without noise; only tests and
    diagnostics use it, and `train_dp` rejects it.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        msg = f"noise_multiplier must be zero or positive, got {noise_multiplier}."
        raise ValueError(msg)
    if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        msg = f"max_grad_norm must be a positive number, got {max_grad_norm}."
        raise ValueError(msg)
    validate_sampling(sample_rate=sample_rate, steps=steps)
    if len(dataset) == 0:
        msg = "the training dataset has no patients; DP-SGD needs at least one."
        raise ValueError(msg)

    parameters = [p for p in model.parameters() if p.requires_grad]
    device = parameters[0].device if parameters else torch.device("cpu")
    engine = _new_privacy_engine(accountant)
    model.train()  # Opacus rejects a module in eval mode
    module, optimizer, data_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(parameters, lr=learning_rate),
        data_loader=_poisson_loader(dataset, sample_rate=sample_rate, steps=steps),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction="mean",
        # The loader above already samples by Poisson at `sample_rate`; Opacus would rebuild it at
        # 1 / len(loader).
        poisson_sampling=False,
        noise_generator=_random_generator(device),
    )
    module.forbid_grad_accumulation()

    # Average the summed noisy gradient over the expected batch, sample_rate x patients, and account
    # each step at the true sample_rate.
    optimizer.expected_batch_size = sample_rate * len(dataset)
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(
        engine=engine, module=module, optimizer=optimizer, data_loader=data_loader
    )


def _set_empty_grad_sample(optimizer: Any) -> None:
    """Give every parameter zero per-sample gradients for an empty Poisson batch.

    The step must still run and add noise, because skipping it would reveal that no patient was
    sampled.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _add_proximal_grad(
    optimizer: Any, global_params: dict[int, Tensor], proximal_mu: float
) -> None:
    """Add the FedProx gradient mu · (w − w_global) to every patient's gradient, before clipping."""
    for p in optimizer.params:
        proximal_grad = proximal_mu * (p.detach() - global_params[id(p)])
        p.grad_sample = p.grad_sample + proximal_grad.unsqueeze(0)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _validate_training(*, epochs: int, learning_rate: float, max_grad_norm: float) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        msg = f"epochs must be a positive integer, got {epochs!r}."
        raise ValueError(msg)
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        msg = f"learning_rate must be a positive number, got {learning_rate}."
        raise ValueError(msg)
    if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        msg = f"max_grad_norm must be a positive number, got {max_grad_norm}."
        raise ValueError(msg)


def train_dp(
    model: nn.Module,
    dataset: TensorDataset,
    loss_fn: LossFn,
    *,
    store: AccountantStore,
    delta: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    epochs: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    seed: int = 0,
    run_name: str = "",
    server_round: int = 0,
) -> TrainResult:
    """Train `model` in place for one round of patient-level DP-SGD and record its privacy cost.

    Parameters
    ----------
    model
        The global model of the round; it stays a plain module with unchanged `state_dict` keys.
    dataset
        One row per patient (the privacy unit), each row a tuple of tensors.
    loss_fn
        `loss_fn(model, batch)` returns the mean per-patient loss of a non-empty batch; it is never
        called with an empty Poisson batch.
    store
        The task's accountant state; the round is appended to it, so ε is cumulative and persisted.
    delta
        δ at which ε is computed.
    noise_multiplier, max_grad_norm, sample_rate
        DP-SGD parameters: each patient's gradient is clipped to max_grad_norm, the noise's
        standard deviation is noise_multiplier x max_grad_norm, and each step samples each patient
        with sample_rate.
    epochs
        Local epochs; each has round(1 / sample_rate) steps.
    learning_rate
        SGD learning rate.
    proximal_mu
        FedProx weight mu: (mu / 2) · ||w − w_global||² joins each patient's loss, so its gradient
        is clipped with the patient's. 0 is plain FedAvg.
    seed
        Seeds torch's global RNG (dropout and other randomness inside the model) for the round.
        The Poisson sampler and the noise never use it, because anyone with the seed could
        regenerate the noise and the batches.
    run_name, server_round
        Stored with the round in the accountant file.

    Returns
    -------
    TrainResult
        Loss, steps and the round's and cumulative ε at `delta`.
    """
    validate_delta(delta)
    validate_mechanism(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1)
    _validate_training(epochs=epochs, learning_rate=learning_rate, max_grad_norm=max_grad_norm)
    if not math.isfinite(proximal_mu) or proximal_mu < 0:
        msg = f"proximal_mu must be zero or positive, got {proximal_mu}."
        raise ValueError(msg)

    steps = steps_per_epoch(sample_rate) * epochs
    private = make_private_training(
        model,
        dataset,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        learning_rate=learning_rate,
        steps=steps,
        accountant=store.accountant,
    )
    optimizer = private.optimizer
    global_params = {id(p): p.detach().clone() for p in optimizer.params}
    device = optimizer.params[0].device if optimizer.params else torch.device("cpu")

    loss_sum = 0.0
    patients_seen = 0
    privacy = None
    try:
        with _seeded(seed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING)
            model.train()
            for batch in private.data_loader:
                optimizer.zero_grad(set_to_none=True)
                batch = tuple(tensor.to(device) for tensor in batch)
                batch_size = int(batch[0].shape[0])

                # Compute per-patient gradients, or none for an empty batch
                if batch_size == 0:
                    _set_empty_grad_sample(optimizer)
                else:
                    loss = loss_fn(model, batch)
                    loss.backward()
                    loss_sum += float(loss.detach()) * batch_size
                    patients_seen += batch_size
                    if proximal_mu > 0:
                        _add_proximal_grad(optimizer, global_params, proximal_mu)

                # Clip, add noise and step; the engine's accountant counts each step
                optimizer.step()
    finally:
        # A failed round still spends the ε of the steps it took, since the model has changed.
        steps_taken = sum(entry[2] for entry in private.engine.accountant.history)
        private.module.to_standard_module()
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        model.zero_grad(set_to_none=True)
        if steps_taken > 0:
            privacy = store.record(
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps_taken,
                delta=delta,
                run_name=run_name,
                server_round=server_round,
            )

    if privacy is None:
        msg = "DP-SGD round took no optimizer steps; nothing was trained or recorded."
        raise RuntimeError(msg)

    result = TrainResult(
        loss=loss_sum / patients_seen if patients_seen else math.nan,
        steps=steps_taken,
        num_examples=len(dataset),
        epsilon_round=privacy.epsilon_round,
        epsilon_total=privacy.epsilon_total,
        delta=delta,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        accountant=store.accountant,
    )
    logger.info(
        "Round %d of %s: loss %.4f, %d steps, ε round %.3f, ε total %.3f (%s, δ=%g, unit: patient)",
        server_round,
        store.task,
        result.loss,
        result.steps,
        result.epsilon_round,
        result.epsilon_total,
        result.accountant.upper(),
        delta,
    )
    return result


def train_plain(
    model: nn.Module,
    dataset: TensorDataset,
    loss_fn: LossFn,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train `model` in place with plain mini-batch SGD, no privacy, and return its final loss.

    It exists for the centralised, non-private reference in the results. A model it trained has no
    privacy guarantee and must not leave a site.
    """
    _validate_training(epochs=epochs, learning_rate=learning_rate, max_grad_norm=1.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise ValueError(msg)
    if len(dataset) == 0:
        msg = "the training dataset has no patients."
        raise ValueError(msg)

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=learning_rate)
    shuffle_generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle_generator)
    device = parameters[0].device if parameters else torch.device("cpu")

    epoch_loss = math.nan
    with _seeded(seed):
        model.train()
        for _ in range(epochs):
            loss_sum = 0.0
            for batch in loader:
                batch = tuple(tensor.to(device) for tensor in batch)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * int(batch[0].shape[0])
            epoch_loss = loss_sum / len(dataset)
    model.zero_grad(set_to_none=True)
    return epoch_loss
