"""A repeated round request: the site resends its stored update without a second privacy spend."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from client.resend import RELEASES_DIR, Release, ReleaseStore, weights_sha256
from client.site_config import SiteConfig, load_site_config
from client.site_task import RoundSettings, SiteOutcome, SiteTask
from models.wire import Status
from privacy.accountant import AccountantStore
from privacy.ledger import SiteLedger
from server.demo_cohort import generate_demo_cohort

TASK = "crs-risk"


def _settings(run_name: str, server_round: int = 1) -> RoundSettings:
    return RoundSettings(
        run_name=run_name,
        server_round=server_round,
        local_epochs=1,
        learning_rate=0.1,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        target_epsilon_per_round=0.0,
        proximal_mu=0.0,
        seed=0,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteConfig:
    """One synthetic crs-risk site; each test uses its own run name."""
    out = tmp_path_factory.mktemp("resend")
    cohort = generate_demo_cohort(out, num_sites=1, patients_per_site=24, seed=1)
    return load_site_config(Path(cohort.consortium) / "site-1")


def _initial(task: SiteTask) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return task.task.build_model(task.spec).state_dict()


def _spend(site: SiteConfig) -> tuple[list[Any], list[dict[str, Any]]]:
    """Return the accountant's rounds and the ledger's entries of the site."""
    rounds = AccountantStore(site.state_dir, TASK).rounds()
    return rounds, SiteLedger(site.state_dir).entries()


def _assert_same_reply(first: SiteOutcome, again: SiteOutcome) -> None:
    assert again.status == first.status
    assert again.message == first.message
    assert again.metrics == first.metrics
    assert again.accountant == first.accountant
    assert again.ledger_entry == first.ledger_entry
    assert first.state_dict is not None
    assert again.state_dict is not None
    assert list(again.state_dict) == list(first.state_dict)
    for name, tensor in first.state_dict.items():
        assert again.state_dict[name].dtype == tensor.dtype, name
        assert torch.equal(again.state_dict[name], tensor), name


# ---------------------------------------------------------------------------- site task


def test_repeat_resends_reply(site: SiteConfig) -> None:
    task = SiteTask(site, TASK)
    state_dict = _initial(task)
    first = task.train(state_dict, _settings("repeat"))
    assert first.status == Status.OK
    rounds, entries = _spend(site)

    again = task.train(state_dict, _settings("repeat"))

    _assert_same_reply(first, again)
    assert _spend(site) == (rounds, entries)


def test_repeat_after_restart(site: SiteConfig) -> None:
    state_dict = _initial(SiteTask(site, TASK))
    first = SiteTask(site, TASK).train(state_dict, _settings("restart", 2))
    rounds, entries = _spend(site)

    # A new SiteTask reads the release from the state folder, as a restarted ClientApp does
    again = SiteTask(site, TASK).train(state_dict, _settings("restart", 2))

    _assert_same_reply(first, again)
    assert _spend(site) == (rounds, entries)
    runs = [(r.run_name, r.server_round) for r in rounds]
    assert runs.count(("restart", 2)) == 1


def test_other_weights_train_anew(site: SiteConfig, caplog: pytest.LogCaptureFixture) -> None:
    task = SiteTask(site, TASK)
    state_dict = _initial(task)
    first = task.train(state_dict, _settings("changed"))
    rounds, entries = _spend(site)
    other = {
        name: tensor + 0.5 if tensor.is_floating_point() else tensor.clone()
        for name, tensor in state_dict.items()
    }

    with caplog.at_level(logging.WARNING, logger="client.site_task"):
        again = task.train(other, _settings("changed"))

    assert again.status == Status.OK
    assert "run changed round 1 was requested again with other global weights" in caplog.text
    rounds_after, entries_after = _spend(site)
    assert len(rounds_after) == len(rounds) + 1
    assert len(entries_after) == len(entries) + 1
    assert entries_after[-1]["kind"] == "round"
    assert entries_after[-1]["seq"] == entries[-1]["seq"] + 1
    assert again.ledger_entry == entries_after[-1]
    assert first.ledger_entry != again.ledger_entry
    assert again.metrics["epsilon-total"] > first.metrics["epsilon-total"]

    # The new release replaces the first, so a third request with the new weights is a resend
    stored = ReleaseStore(site.state_dir, TASK).load("changed", 1)
    assert stored is not None
    assert stored.global_sha256 == weights_sha256(other)
    third = task.train(other, _settings("changed"))
    _assert_same_reply(again, third)
    assert _spend(site) == (rounds_after, entries_after)


def test_damaged_release_trains_anew(site: SiteConfig, caplog: pytest.LogCaptureFixture) -> None:
    task = SiteTask(site, TASK)
    state_dict = _initial(task)
    task.train(state_dict, _settings("damaged"))
    rounds, _ = _spend(site)
    _, weights_path = ReleaseStore(site.state_dir, TASK).paths("damaged", 1)
    weights_path.write_bytes(weights_path.read_bytes()[:-8])

    with caplog.at_level(logging.WARNING, logger="client.resend"):
        again = task.train(state_dict, _settings("damaged"))

    assert again.status == Status.OK
    assert "does not match the SHA-256" in caplog.text
    assert len(_spend(site)[0]) == len(rounds) + 1


def test_refusal_not_stored(site: SiteConfig) -> None:
    task = SiteTask(site, TASK)
    settings = _settings("refused")
    low_noise = RoundSettings(**{**settings.__dict__, "noise_multiplier": 0.01})

    outcome = task.train(_initial(task), low_noise)

    assert outcome.status == Status.REFUSED_POLICY
    json_path, weights_path = ReleaseStore(site.state_dir, TASK).paths("refused", 1)
    assert not json_path.exists()
    assert not weights_path.exists()


# ---------------------------------------------------------------------------- store


def test_weights_sha256_order() -> None:
    weights = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor(3, dtype=torch.int64)}
    reordered = {"a": weights["a"], "b": weights["b"].t().contiguous().t()}
    assert weights_sha256(weights) == weights_sha256(reordered)
    changed = {**weights, "b": weights["b"] + 1e-6}
    assert weights_sha256(weights) != weights_sha256(changed)
    as_double = {**weights, "b": weights["b"].double()}
    assert weights_sha256(weights) != weights_sha256(as_double)


def test_store_unsafe_run_name(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path, TASK)
    release = Release(
        run_name="../../escape",
        server_round=3,
        task=TASK,
        global_sha256="0" * 64,
        status=Status.OK,
        message="",
        metrics={"num-examples": 12.0},
        accountant="rdp",
        ledger_entry={"seq": 4},
        state_dict={"w": torch.ones(2, 2), "n": torch.tensor(1, dtype=torch.int64)},
    )

    json_path = store.save(release)

    assert json_path.resolve().is_relative_to((tmp_path / RELEASES_DIR).resolve())
    assert json.loads(json_path.read_text())["run_name"] == "../../escape"
    loaded = store.load("../../escape", 3)
    assert loaded is not None
    assert list(loaded.state_dict) == ["w", "n"]
    assert torch.equal(loaded.state_dict["w"], release.state_dict["w"])
    assert loaded.ledger_entry == {"seq": 4}
    assert store.load("../../escape", 4) is None
    assert ReleaseStore(tmp_path, "lab-forecast").load("../../escape", 3) is None
