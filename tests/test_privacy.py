"""Tests of the persistent accountant, the site budget check and `fedtwin-steward budget`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accountant import (
    SECURE_RNG,
    AccountantStateError,
    AccountantStore,
    epsilon_of_history,
    state_file,
)
from privacy.budget import check_round, default_delta, noise_for_target
from privacy.cli import main

TASK = "lab-forecast"
DELTA = 1e-5
ROUNDS = [(1.1, 0.25, 8), (1.1, 0.25, 8), (0.9, 0.5, 4)]


def _recorded_store(state_dir: Path, accountant: str = "rdp") -> AccountantStore:
    store = AccountantStore(state_dir, TASK, accountant=accountant)
    for server_round, (noise_multiplier, sample_rate, steps) in enumerate(ROUNDS, start=1):
        store.record(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=DELTA,
            run_name="run-a",
            server_round=server_round,
        )
    return store


def _opacus_epsilon(accountant_class: type, rounds: list[tuple[float, float, int]]) -> float:
    """ε of `rounds` from a fresh Opacus accountant fed one step at a time."""
    accountant = accountant_class()
    for noise_multiplier, sample_rate, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta=DELTA))


# ---------------------------------------------------------------------------- AccountantStore


def test_store_empty_epsilon_zero(tmp_path: Path) -> None:
    store = AccountantStore(tmp_path, TASK)
    assert store.epsilon(DELTA) == 0.0
    assert store.rounds() == []
    assert store.accountant == "rdp"
    assert not state_file(tmp_path, TASK).exists()


def test_store_matches_opacus_rdp(tmp_path: Path) -> None:
    store = _recorded_store(tmp_path)
    expected = _opacus_epsilon(RDPAccountant, ROUNDS)
    assert store.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    assert store.rounds()[-1].epsilon_total == pytest.approx(expected, rel=1e-9)
    assert store.steps == sum(steps for _, _, steps in ROUNDS)


def test_store_matches_opacus_prv(tmp_path: Path) -> None:
    store = _recorded_store(tmp_path, accountant="prv")
    expected = _opacus_epsilon(PRVAccountant, ROUNDS)
    assert store.accountant == "prv"
    assert store.epsilon(DELTA) == pytest.approx(expected, rel=1e-3)


def test_store_epsilon_grows_per_round(tmp_path: Path) -> None:
    totals = [entry.epsilon_total for entry in _recorded_store(tmp_path).rounds()]
    assert totals[0] < totals[1] < totals[2]
    assert all(entry.accountant == "rdp" for entry in _recorded_store(tmp_path / "b").rounds())


def test_store_restart_same_epsilon(tmp_path: Path) -> None:
    before = _recorded_store(tmp_path)
    after = AccountantStore(tmp_path, TASK)
    assert after.epsilon(DELTA) == before.epsilon(DELTA)
    assert after.rounds() == before.rounds()
    assert after.history == before.history
    assert after.accountant == "rdp"


def test_store_record_keeps_other_writer(tmp_path: Path) -> None:
    first = AccountantStore(tmp_path, TASK)
    second = AccountantStore(tmp_path, TASK)
    first.record(
        noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=DELTA, run_name="a", server_round=1
    )
    second.record(
        noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=DELTA, run_name="b", server_round=1
    )
    reread = AccountantStore(tmp_path, TASK)
    assert [entry.run_name for entry in reread.rounds()] == ["a", "b"]
    assert reread.steps == 4


def test_store_file_is_json(tmp_path: Path) -> None:
    _recorded_store(tmp_path)
    content = json.loads(state_file(tmp_path, TASK).read_text(encoding="utf-8"))
    assert content["accountant"] == "rdp"
    assert content["privacy_unit"] == "patient"
    assert len(content["rounds"]) == len(ROUNDS)
    # The two equal rounds are merged into one history entry.
    assert content["history"] == [[1.1, 0.25, 16], [0.9, 0.5, 4]]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_store_accountant_mismatch(tmp_path: Path) -> None:
    _recorded_store(tmp_path)
    with pytest.raises(AccountantStateError, match="stored accountant is 'rdp'"):
        AccountantStore(tmp_path, TASK, accountant="prv")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot be read as JSON"),
        ('{"format": "other"}', "is not a fedtwin-accountant file"),
        ("[]", "is not a fedtwin-accountant file"),
    ],
    ids=["syntax", "format", "list"],
)
def test_store_corrupt_file(tmp_path: Path, content: str, match: str) -> None:
    path = state_file(tmp_path, TASK)
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AccountantStateError, match=match) as caught:
        AccountantStore(tmp_path, TASK)
    assert str(path) in str(caught.value)
    assert "reset" in str(caught.value)
    assert path.read_text(encoding="utf-8") == content


def test_store_invalid_history(tmp_path: Path) -> None:
    _recorded_store(tmp_path)
    path = state_file(tmp_path, TASK)
    content = json.loads(path.read_text(encoding="utf-8"))
    content["history"][0][0] = -1.0
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(AccountantStateError, match=r"invalid history\[0\]"):
        AccountantStore(tmp_path, TASK)


def test_store_dropped_round(tmp_path: Path) -> None:
    _recorded_store(tmp_path)
    path = state_file(tmp_path, TASK)
    content = json.loads(path.read_text(encoding="utf-8"))
    content["rounds"].pop()
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(AccountantStateError, match="do not match"):
        AccountantStore(tmp_path, TASK)


@pytest.mark.parametrize(
    "task", ["", "../x", "a/b", ".hidden"], ids=["empty", "up", "slash", "dot"]
)
def test_store_invalid_task(tmp_path: Path, task: str) -> None:
    with pytest.raises(ValueError, match="task name"):
        AccountantStore(tmp_path, task)


def test_store_projection_unchanged(tmp_path: Path) -> None:
    store = _recorded_store(tmp_path)
    before = store.epsilon(DELTA)
    projected = store.projected_epsilon(DELTA, noise_multiplier=1.0, sample_rate=0.5, steps=4)
    assert store.epsilon(DELTA) == before
    assert projected > before
    store.record(
        noise_multiplier=1.0, sample_rate=0.5, steps=4, delta=DELTA, run_name="", server_round=4
    )
    assert store.epsilon(DELTA) == pytest.approx(projected, rel=1e-12)


def test_round_epsilon_matches_opacus() -> None:
    epsilon = AccountantStore.round_epsilon(
        noise_multiplier=1.1, sample_rate=0.25, steps=8, delta=DELTA
    )
    assert epsilon == pytest.approx(_opacus_epsilon(RDPAccountant, [(1.1, 0.25, 8)]), rel=1e-9)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
    ids=[
        "noise-zero",
        "noise-nan",
        "rate-zero",
        "rate-high",
        "steps-zero",
        "steps-float",
        "delta-0",
        "delta-1",
    ],
)
def test_record_rejects_invalid(tmp_path: Path, arguments: dict[str, float], match: str) -> None:
    values: dict[str, float] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 2,
        "delta": DELTA,
    }
    values.update(arguments)
    store = AccountantStore(tmp_path, TASK)
    with pytest.raises(ValueError, match=match):
        store.record(run_name="", server_round=1, **values)  # type: ignore[arg-type]
    assert not state_file(tmp_path, TASK).exists()


def test_secure_rng_flag_false() -> None:
    assert SECURE_RNG is False


# ---------------------------------------------------------------------------- budget


def test_check_round_allowed(tmp_path: Path) -> None:
    store = _recorded_store(tmp_path)
    decision = check_round(
        store=store,
        delta=DELTA,
        epsilon_cap=1000.0,
        noise_multiplier=1.0,
        min_noise_multiplier=0.3,
        sample_rate=0.5,
        steps=2,
    )
    assert decision.allowed
    assert decision.epsilon_before == pytest.approx(store.epsilon(DELTA))
    assert decision.projected_epsilon > decision.epsilon_before
    assert "within the cap" in decision.reason


def test_check_round_over_cap(tmp_path: Path) -> None:
    store = _recorded_store(tmp_path)
    before = store.epsilon(DELTA)
    projected = store.projected_epsilon(DELTA, noise_multiplier=0.8, sample_rate=0.5, steps=20)
    cap = (before + projected) / 2
    decision = check_round(
        store=store,
        delta=DELTA,
        epsilon_cap=cap,
        noise_multiplier=0.8,
        min_noise_multiplier=0.3,
        sample_rate=0.5,
        steps=20,
    )
    assert not decision.allowed
    assert decision.projected_epsilon == pytest.approx(projected)
    assert f"from {before:.2f} to {projected:.2f}" in decision.reason
    assert "(RDP, δ=1e-05, unit: patient)" in decision.reason
    assert f"above the cap {cap:g}" in decision.reason
    assert "\n" not in decision.reason
    assert store.epsilon(DELTA) == before


def test_check_round_low_noise(tmp_path: Path) -> None:
    store = AccountantStore(tmp_path, TASK)
    decision = check_round(
        store=store,
        delta=DELTA,
        epsilon_cap=10.0,
        noise_multiplier=0.2,
        min_noise_multiplier=0.3,
        sample_rate=0.5,
        steps=2,
    )
    assert not decision.allowed
    assert "below the site's minimum 0.3" in decision.reason
    assert decision.projected_epsilon == 0.0


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"epsilon_cap": 0.0}, "epsilon_cap"),
        ({"epsilon_cap": math.inf}, "epsilon_cap"),
        ({"min_noise_multiplier": -0.1}, "min_noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sample_rate": 2.0}, "sample_rate"),
        ({"delta": 0.0}, "delta"),
    ],
    ids=["cap-zero", "cap-inf", "min-noise", "noise", "rate", "delta"],
)
def test_check_round_invalid(tmp_path: Path, arguments: dict[str, float], match: str) -> None:
    values: dict[str, float] = {
        "delta": DELTA,
        "epsilon_cap": 10.0,
        "noise_multiplier": 1.0,
        "min_noise_multiplier": 0.3,
        "sample_rate": 0.5,
        "steps": 2,
    }
    values.update(arguments)
    with pytest.raises(ValueError, match=match):
        check_round(store=AccountantStore(tmp_path, TASK), **values)  # type: ignore[arg-type]


def test_noise_for_target_reaches_target() -> None:
    noise = noise_for_target(target_epsilon=2.0, delta=DELTA, sample_rate=0.25, steps=8)
    spent = AccountantStore.round_epsilon(
        noise_multiplier=noise, sample_rate=0.25, steps=8, delta=DELTA
    )
    assert spent <= 2.0
    assert spent > 2.0 - 0.05
    less_noise = AccountantStore.round_epsilon(
        noise_multiplier=noise * 0.9, sample_rate=0.25, steps=8, delta=DELTA
    )
    assert less_noise > 2.0


def test_noise_for_target_unreachable() -> None:
    with pytest.raises(ValueError, match="no noise_multiplier reaches"):
        noise_for_target(target_epsilon=1e-9, delta=DELTA, sample_rate=1.0, steps=1000)


def test_noise_for_target_invalid() -> None:
    with pytest.raises(ValueError, match="accountant"):
        noise_for_target(target_epsilon=1.0, delta=DELTA, sample_rate=0.5, steps=2, accountant="x")
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_for_target(target_epsilon=0.0, delta=DELTA, sample_rate=0.5, steps=2)


def test_default_delta_below_one_over_n() -> None:
    assert default_delta(40) == pytest.approx(1 / 400)
    assert default_delta(1) < 1.0
    with pytest.raises(ValueError, match="n_patients"):
        default_delta(0)


# ------------------------------------------------------------------ fedtwin-steward budget


def test_cli_budget_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _recorded_store(tmp_path)
    assert main(["budget", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "not the signed ledger" in output
    assert f"task {TASK}" in output
    assert f"ε {store.epsilon(DELTA):.3f} at δ=1e-05 (RDP, unit: patient)" in output
    assert f"{len(ROUNDS)} rounds, {store.steps} steps" in output
    assert output.count("run-a") == len(ROUNDS)


def test_cli_budget_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _recorded_store(tmp_path)
    AccountantStore(tmp_path, "crs-risk", accountant="prv").record(
        noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=DELTA, run_name="", server_round=1
    )
    assert main(["budget", str(tmp_path), "--json", "--delta", "1e-4"]) == 0
    content = json.loads(capsys.readouterr().out)
    assert content["signed"] is False
    tasks = {task["task"]: task for task in content["tasks"]}
    assert sorted(tasks) == ["crs-risk", TASK]
    assert tasks[TASK]["epsilon"] == pytest.approx(store.epsilon(1e-4))
    assert tasks[TASK]["delta"] == 1e-4
    assert tasks[TASK]["rounds"] == len(ROUNDS)
    assert tasks["crs-risk"]["accountant"] == "prv"
    assert tasks[TASK]["secure_rng"] is False


def test_cli_budget_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _recorded_store(tmp_path)
    broken = state_file(tmp_path, "crs-risk")
    broken.write_text("{", encoding="utf-8")
    assert main(["budget", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"task {TASK}" in captured.out
    assert str(broken) in captured.err
    assert "Traceback" not in captured.err


def test_cli_budget_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budget", str(tmp_path)]) == 0
    assert "No accountant files" in capsys.readouterr().out


def test_cli_budget_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budget", str(tmp_path / "absent")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_budget_bad_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["budget", str(tmp_path), "--delta", "2"]) == 1
    assert "--delta" in capsys.readouterr().err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["budget", "--help"])
    assert exited.value.code == 0
    assert "STATE_DIR" in capsys.readouterr().out


def test_cli_restores_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An in-process run leaves no handler bound to this test's captured standard error."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    assert main(["--verbose", "budget", str(tmp_path)]) == 0
    assert root.handlers == handlers
    assert root.level == level
    assert "No accountant files" in capsys.readouterr().out


def test_rdp_merged_history_equals_opacus() -> None:
    """Merging equal mechanisms before accounting gives Opacus' ε of the round-by-round history."""
    history = [(1.0, 0.5, 2)] * 12 + [(1.5, 0.25, 4)] * 3 + [(1.0, 0.5, 2)] * 5
    reference = RDPAccountant()
    reference.history = list(history)

    merged = epsilon_of_history("rdp", history, 1e-5)

    assert merged == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
