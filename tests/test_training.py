"""Tests of patient-level DP-SGD training (`train_dp`) and the non-private reference trainer."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from client.training import (
    TrainResult,
    make_private_training,
    steps_per_epoch,
    train_dp,
    train_plain,
)
from privacy.accountant import AccountantStore

TASK = "lab-forecast"
DELTA = 1e-3
N_FEATURES = 5


def _dataset(n_patients: int, *, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_patients, N_FEATURES, generator=generator) * scale
    true_weight = torch.full((N_FEATURES, 1), 3.0)
    y = x @ true_weight + 0.1 * torch.randn(n_patients, 1, generator=generator)
    return TensorDataset(x, y)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 4), nn.ReLU(), nn.Linear(4, 1))


def _mse(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(
    model: nn.Module, dataset: TensorDataset, store: AccountantStore, **overrides: object
) -> TrainResult:
    arguments: dict[str, object] = {
        "delta": DELTA,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.25,
        "epochs": 2,
        "learning_rate": 0.05,
    }
    arguments.update(overrides)
    return train_dp(model, dataset, _mse, store=store, **arguments)  # type: ignore[arg-type]


def test_train_dp_two_rounds(tmp_path: Path) -> None:
    model = _model()
    dataset = _dataset(32)
    store = AccountantStore(tmp_path, TASK)

    first = _train(model, dataset, store, run_name="run-a", server_round=1)
    second = _train(model, dataset, store, run_name="run-a", server_round=2)

    expected_steps = steps_per_epoch(0.25) * 2
    assert first.steps == expected_steps
    assert second.steps == expected_steps
    assert first.num_examples == 32
    assert second.epsilon_total > first.epsilon_total
    assert second.epsilon_round == pytest.approx(first.epsilon_round)

    # An independent Opacus accountant fed the same steps gives the same cumulative ε.
    reference = RDPAccountant()
    for _ in range(first.steps + second.steps):
        reference.step(noise_multiplier=1.0, sample_rate=0.25)
    assert second.epsilon_total == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-9)
    assert store.epsilon(DELTA) == pytest.approx(second.epsilon_total, rel=1e-12)

    restarted = AccountantStore(tmp_path, TASK)
    assert restarted.epsilon(DELTA) == pytest.approx(second.epsilon_total, rel=1e-12)
    assert [entry.server_round for entry in restarted.rounds()] == [1, 2]
    assert restarted.rounds()[1].run_name == "run-a"


def test_train_dp_result_fields(tmp_path: Path) -> None:
    store = AccountantStore(tmp_path, TASK, accountant="rdp")
    result = _train(_model(), _dataset(16), store, noise_multiplier=1.3, max_grad_norm=0.7)
    assert result.noise_multiplier == 1.3
    assert result.max_grad_norm == 0.7
    assert result.sample_rate == 0.25
    assert result.delta == DELTA
    assert result.accountant == "rdp"
    assert math.isfinite(result.loss)
    assert result.epsilon_round == pytest.approx(
        AccountantStore.round_epsilon(
            noise_multiplier=1.3, sample_rate=0.25, steps=result.steps, delta=DELTA
        )
    )


def test_train_dp_state_dict_keys(tmp_path: Path) -> None:
    model = _model()
    keys = list(model.state_dict())
    before = _flat(model)
    _train(model, _dataset(16), AccountantStore(tmp_path, TASK))

    assert list(model.state_dict()) == keys
    assert not torch.equal(_flat(model), before)
    assert isinstance(model, nn.Sequential)
    for parameter in model.parameters():
        assert not hasattr(parameter, "grad_sample")
        assert not hasattr(parameter, "summed_grad")
        assert parameter.grad is None
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._backward_hooks


def test_train_dp_twice_same_model(tmp_path: Path) -> None:
    """A model trained once trains again without stacking Opacus hooks from the first round."""
    model = _model()
    store = AccountantStore(tmp_path, TASK)
    _train(model, _dataset(16), store)
    result = _train(model, _dataset(16), store)
    assert result.steps == steps_per_epoch(0.25) * 2


def test_engine_attached_as_requested() -> None:
    dataset = _dataset(30)
    private = make_private_training(
        _model(),
        dataset,
        noise_multiplier=1.7,
        max_grad_norm=0.4,
        sample_rate=0.3,
        learning_rate=0.1,
        steps=7,
    )
    assert private.optimizer.noise_multiplier == 1.7
    assert private.optimizer.max_grad_norm == 0.4
    assert private.optimizer.expected_batch_size == pytest.approx(0.3 * 30)
    assert private.data_loader.batch_sampler.sample_rate == 0.3  # type: ignore[union-attr]
    assert len(private.data_loader) == 7
    assert private.engine.accountant.mechanism() == "rdp"
    private.module.to_standard_module()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_clipping_bounds_patient_update() -> None:
    """One patient, no noise, a huge gradient: the step's norm is learning_rate x max_grad_norm."""
    model = nn.Linear(N_FEATURES, 1)
    dataset = _dataset(1, scale=100.0)
    max_grad_norm = 0.5
    learning_rate = 0.1
    private = make_private_training(
        model,
        dataset,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        sample_rate=1.0,
        learning_rate=learning_rate,
        steps=1,
    )

    before = _flat(model)
    batch = tuple(next(iter(private.data_loader)))
    assert batch[0].shape[0] == 1
    loss = _mse(model, batch)
    loss.backward()
    per_sample = [p.grad_sample for p in model.parameters()]  # type: ignore[attr-defined]
    raw_norm = torch.cat([grad.reshape(-1) for grad in per_sample]).norm()
    assert raw_norm > 100 * max_grad_norm
    private.optimizer.step()

    step_norm = (_flat(model) - before).norm()
    assert step_norm == pytest.approx(learning_rate * max_grad_norm, rel=1e-4)
    private.module.to_standard_module()


def test_train_dp_empty_batches(tmp_path: Path) -> None:
    """Two patients sampled at 5 %: most batches are empty, and each still takes a noisy step."""
    dataset = _dataset(2)
    private = make_private_training(
        _model(),
        dataset,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.05,
        learning_rate=0.1,
        steps=40,
    )
    sizes = [int(batch[0].shape[0]) for batch in private.data_loader]
    empty = [batch for batch in private.data_loader if batch[0].shape[0] == 0]
    private.module.to_standard_module()
    assert len(sizes) == 40
    assert 0 in sizes
    assert empty
    assert tuple(empty[0][0].shape) == (0, N_FEATURES)
    assert tuple(empty[0][1].shape) == (0, 1)

    model = _model()
    before = _flat(model)
    result = _train(model, dataset, AccountantStore(tmp_path, TASK), sample_rate=0.05, epochs=1)
    assert result.steps == 20
    assert not torch.equal(_flat(model), before)
    assert math.isfinite(result.epsilon_total)


def test_train_dp_fedprox_anchors(tmp_path: Path) -> None:
    """A large proximal_mu keeps the weights near the round's starting (global) weights."""
    dataset = _dataset(40)
    distances = {}
    for proximal_mu in (0.0, 20.0):
        model = nn.Linear(N_FEATURES, 1)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        _train(
            model,
            dataset,
            AccountantStore(tmp_path / str(proximal_mu), TASK),
            noise_multiplier=0.05,
            max_grad_norm=100.0,
            sample_rate=0.5,
            epochs=20,
            learning_rate=0.05,
            proximal_mu=proximal_mu,
        )
        distances[proximal_mu] = float(_flat(model).norm())
    assert distances[20.0] < 0.3 * distances[0.0]


def test_train_dp_seed_not_noise(tmp_path: Path) -> None:
    """The same seed and start give different weights: the seed never fixes sampling or noise."""
    results = []
    for index in range(2):
        model = _model()
        _train(model, _dataset(16), AccountantStore(tmp_path / str(index), TASK), seed=7)
        results.append(_flat(model))
    assert not torch.equal(results[0], results[1])


def test_train_dp_logs_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="client.training"):
        _train(_model(), _dataset(16), AccountantStore(tmp_path, TASK), server_round=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "client.training"]
    round_lines = [line for line in lines if line.startswith("Round 3")]
    assert len(round_lines) == 1
    assert "ε total" in round_lines[0]
    assert "RDP, δ=0.001, unit: patient" in round_lines[0]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
        ({"delta": 0.0}, "delta"),
    ],
    ids=["noise", "rate", "epochs", "lr", "clip", "mu", "delta"],
)
def test_train_dp_invalid(tmp_path: Path, overrides: dict[str, object], match: str) -> None:
    store = AccountantStore(tmp_path, TASK)
    with pytest.raises(ValueError, match=match):
        _train(_model(), _dataset(8), store, **overrides)
    assert store.rounds() == []


def test_train_dp_empty_dataset(tmp_path: Path) -> None:
    empty = TensorDataset(torch.zeros(0, N_FEATURES), torch.zeros(0, 1))
    store = AccountantStore(tmp_path, TASK)
    with pytest.raises(ValueError, match="no patients"):
        _train(_model(), empty, store)
    assert store.rounds() == []


def test_train_dp_failure_still_recorded(tmp_path: Path) -> None:
    """A loss that fails after some steps still records the ε of the steps taken."""
    calls = {"count": 0}

    def failing_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        calls["count"] += 1
        if calls["count"] > 2:
            raise RuntimeError("loss failed")
        return _mse(model, batch)

    store = AccountantStore(tmp_path, TASK)
    with pytest.raises(RuntimeError, match="loss failed"):
        train_dp(
            _model(),
            _dataset(32),
            failing_loss,
            store=store,
            delta=DELTA,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.5,
            epochs=5,
            learning_rate=0.1,
        )
    assert len(store.rounds()) == 1
    assert store.rounds()[0].steps >= 2
    assert store.epsilon(DELTA) > 0


def test_train_plain_lowers_loss() -> None:
    model = _model()
    dataset = _dataset(64)
    x, y = dataset.tensors
    with torch.no_grad():
        before = float(_mse(model, (x, y)))
    last = train_plain(model, dataset, _mse, epochs=20, learning_rate=0.01, batch_size=8, seed=0)
    with torch.no_grad():
        after = float(_mse(model, (x, y)))
    assert after < 0.5 * before
    assert math.isfinite(last)


def test_steps_per_epoch_rounds() -> None:
    assert steps_per_epoch(0.5) == 2
    assert steps_per_epoch(0.3) == 3
    assert steps_per_epoch(1 / 3) == 3
    assert steps_per_epoch(1.0) == 1
    with pytest.raises(ValueError, match="sample_rate"):
        steps_per_epoch(0.0)
