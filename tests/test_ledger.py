"""The signed privacy ledger: chaining, signatures, tamper detection, crash safety, ε properties."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from privacy.accountant import AccountantStore
from privacy.budget import check_policy
from privacy.keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, load_public_key
from privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FILE,
    LedgerError,
    LedgerRecord,
    SiteLedger,
    verify_ledger,
)
from privacy.policy import SitePolicy

REPO = Path(__file__).resolve().parent.parent


def _record(round_number: int, *, task: str = "crs-risk", epsilon: float = 1.0) -> LedgerRecord:
    return LedgerRecord(
        kind="round",
        site="site-a",
        run_id="run-1",
        round=round_number,
        task=task,
        model_version="CrsRiskNet@000000000000",
        feature_spec_sha256="f" * 64,
        privacy_unit="patient",
        patients=20,
        patients_rounding=1,
        sample_rate=0.5,
        steps=2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant="rdp",
        delta=1e-3,
        epsilon_round=0.5,
        epsilon_total=epsilon,
        epsilon_all_tasks=epsilon,
        secure_rng=False,
    )


def _ledger(tmp_path: Path, count: int) -> tuple[Path, Path]:
    ledger = SiteLedger(tmp_path / "state")
    for number in range(1, count + 1):
        ledger.append(_record(number, epsilon=0.5 * number))
    return ledger.path, tmp_path / "state" / PUBLIC_KEY_FILE


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------- format


def test_ledger_keys_created(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 1)
    private = tmp_path / "state" / PRIVATE_KEY_FILE
    assert path.name == LEDGER_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_ledger_readable_without_fedtwin(tmp_path: Path) -> None:
    """Check chain and signatures with json, hashlib and cryptography alone."""
    path, public = _ledger(tmp_path, 3)
    key = load_pem_public_key(public.read_bytes())
    previous = GENESIS_HASH
    for seq, line in enumerate(_lines(path)):
        entry = json.loads(line)
        assert entry["seq"] == seq
        assert entry["prev_hash"] == previous
        signature = base64.b64decode(entry.pop("signature"))
        signed = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        key.verify(signature, signed)  # type: ignore[union-attr]
        entry["signature"] = base64.b64encode(signature).decode()
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        previous = hashlib.sha256(canonical).hexdigest()


def test_ledger_entry_fields(tmp_path: Path) -> None:
    path, _ = _ledger(tmp_path, 1)
    entry = json.loads(_lines(path)[0])
    for name in (
        "run_id",
        "round",
        "task",
        "model_version",
        "feature_spec_sha256",
        "patients",
        "sample_rate",
        "steps",
        "noise_multiplier",
        "max_grad_norm",
        "accountant",
        "delta",
        "epsilon_round",
        "epsilon_total",
        "secure_rng",
        "timestamp",
        "prev_hash",
        "signature",
    ):
        assert name in entry, name


def test_ledger_verifies_intact(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 4)
    result = verify_ledger(path, load_public_key(public))
    assert result.intact
    assert [entry["seq"] for entry in result.entries] == [0, 1, 2, 3]


def test_ledger_append_after_reopen(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 2)
    SiteLedger(tmp_path / "state").append(_record(3))
    assert verify_ledger(path, load_public_key(public)).intact
    assert len(_lines(path)) == 3


# ---------------------------------------------------------------------------- tampering


def _edit_value(lines: list[str]) -> list[str]:
    entry = json.loads(lines[1])
    entry["epsilon_total"] = 0.01
    lines[1] = json.dumps(entry)
    return lines


def _drop(lines: list[str]) -> list[str]:
    return [lines[0], *lines[2:]]


def _reorder(lines: list[str]) -> list[str]:
    return [lines[0], lines[2], lines[1], lines[3]]


def _swap_signature(lines: list[str]) -> list[str]:
    first, second = json.loads(lines[1]), json.loads(lines[2])
    first["signature"], second["signature"] = second["signature"], first["signature"]
    return [lines[0], json.dumps(first), json.dumps(second), lines[3]]


@pytest.mark.parametrize(
    ("tamper", "kind", "line"),
    [
        (_edit_value, "edited", 2),
        (_drop, "dropped", 2),
        (_reorder, "reordered", 2),
        (_swap_signature, "bad-signature", 2),
    ],
    ids=["edit", "drop", "reorder", "swap-signature"],
)
def test_tamper_detected(tmp_path: Path, tamper: Any, kind: str, line: int) -> None:
    path, public = _ledger(tmp_path, 4)
    _write_lines(path, tamper(_lines(path)))
    result = verify_ledger(path, load_public_key(public))
    assert result.problem is not None
    assert result.problem.kind == kind
    assert result.problem.line == line
    assert f"line {line}" in result.problem.message


def test_tamper_truncate_is_torn(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    result = verify_ledger(path, load_public_key(public))
    assert result.problem is not None
    assert result.problem.kind == "torn"
    assert result.problem.line == 3
    assert len(result.entries) == 2


def test_tamper_not_json(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 3)
    lines = _lines(path)
    lines[0] = lines[0][:-5]
    _write_lines(path, lines)
    result = verify_ledger(path, load_public_key(public))
    assert result.problem is not None
    assert (result.problem.kind, result.problem.line) == ("corrupt", 1)


def test_verify_other_site_key(tmp_path: Path) -> None:
    path, _ = _ledger(tmp_path, 2)
    _, other_public = _ledger(tmp_path / "other", 1)
    result = verify_ledger(path, load_public_key(other_public))
    assert result.problem is not None
    assert result.problem.kind == "wrong-key"
    assert "another site" in result.problem.message


def test_verify_empty_ledger(tmp_path: Path) -> None:
    _, public = _ledger(tmp_path, 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(LedgerError, match=r"empty\.jsonl: ledger is empty"):
        verify_ledger(empty, load_public_key(public))


def test_torn_tail_moved_on_append(tmp_path: Path) -> None:
    path, public = _ledger(tmp_path, 2)
    with path.open("ab") as file:
        file.write(b'{"seq": 2, "half an entr')
    SiteLedger(tmp_path / "state").append(_record(3))
    result = verify_ledger(path, load_public_key(public))
    assert result.intact
    assert [entry["round"] for entry in result.entries] == [1, 2, 3]
    torn = path.with_name(LEDGER_FILE + ".torn").read_text()
    assert "half an entr" in torn


def test_corrupt_last_line_blocks_append(tmp_path: Path) -> None:
    path, _ = _ledger(tmp_path, 2)
    lines = _lines(path)
    lines[-1] = "not json"
    _write_lines(path, lines)
    with pytest.raises(LedgerError, match="line 2 is not valid JSON"):
        SiteLedger(tmp_path / "state").append(_record(3))


# ---------------------------------------------------------------------------- crashes

_WRITER = textwrap.dedent(
    """
    import sys
    from privacy.ledger import LedgerRecord, SiteLedger

    ledger = SiteLedger(sys.argv[1])
    ledger.prepare()
    print("ready", flush=True)
    round_number = 0
    while True:
        round_number += 1
        entry = ledger.append(LedgerRecord(
            kind="round", site="site-a", run_id="crash", round=round_number, task="crs-risk",
            model_version="m", feature_spec_sha256="f" * 64, privacy_unit="patient",
            patients=20, patients_rounding=1, sample_rate=0.5, steps=2, noise_multiplier=1.0,
            max_grad_norm=1.0, accountant="rdp", delta=1e-3, epsilon_round=0.1,
            epsilon_total=0.1, epsilon_all_tasks=0.1, secure_rng=False, reason="x" * 3000,
        ))
        print("ack", entry["seq"], flush=True)
    """
)


def test_crash_keeps_acknowledged(tmp_path: Path) -> None:
    """Kill writers with SIGKILL mid-run many times; every acknowledged entry survives."""
    state = tmp_path / "state"
    acknowledged: set[int] = set()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(12):
        process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(state)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.02 + 0.013 * attempt)
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        # Only complete lines count: the kill can cut the last acknowledgement in half.
        complete = output.split("\n")[:-1]
        acknowledged.update(
            int(line.split()[1]) for line in complete if re.fullmatch(r"ack \d+", line)
        )

        # After each kill the ledger is intact or ends in one torn line, never worse.
        result = verify_ledger(state / LEDGER_FILE, load_public_key(state / PUBLIC_KEY_FILE))
        assert result.problem is None or result.problem.kind == "torn", result.problem

    SiteLedger(state).prepare()
    result = verify_ledger(state / LEDGER_FILE, load_public_key(state / PUBLIC_KEY_FILE))
    assert result.intact, result.problem
    stored = {entry["seq"] for entry in result.entries}
    assert acknowledged
    assert acknowledged <= stored


# ---------------------------------------------------------------------------- ε properties

_NOISES = (0.8, 1.0, 1.6)
_RATES = (0.25, 0.5)
_STEPS = (2, 4)
_PATIENTS = 50


def _run_round(
    state: Path, policy: SitePolicy, task: str, noise: float, rate: float, steps: int
) -> dict[str, Any]:
    """One site round as a fresh process would run it: new store, new ledger, policy check."""
    store = AccountantStore(state, task)
    ledger = SiteLedger(state)
    decision = check_policy(
        policy=policy,
        store=store,
        model="CrsRiskNet",
        n_patients=_PATIENTS,
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
    )
    kind = "round" if decision.allowed else "refusal"
    epsilon_total = decision.epsilon_before
    if decision.allowed:
        recorded = store.record(
            noise_multiplier=noise,
            sample_rate=rate,
            steps=steps,
            delta=decision.delta,
            run_name="prop",
            server_round=1,
        )
        epsilon_total = recorded.epsilon_total
    all_tasks = decision.projected_epsilon_all_tasks if decision.allowed else None
    record = _record(1, task=task, epsilon=epsilon_total)
    record = LedgerRecord(
        **{
            **record.__dict__,
            "kind": kind,
            "noise_multiplier": noise,
            "sample_rate": rate,
            "steps": steps,
            "delta": decision.delta,
            "epsilon_all_tasks": all_tasks,
            "reason": decision.reason if not decision.allowed else "",
        }
    )
    return ledger.append(record)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cap=st.floats(min_value=0.5, max_value=6.0),
    total_cap=st.one_of(st.none(), st.floats(min_value=1.0, max_value=8.0)),
    schedule=st.lists(
        st.tuples(
            st.sampled_from(("crs-risk", "lab-forecast")),
            st.sampled_from(_NOISES),
            st.sampled_from(_RATES),
            st.sampled_from(_STEPS),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_epsilon_within_cap_matches_opacus(
    tmp_path_factory: pytest.TempPathFactory,
    cap: float,
    total_cap: float | None,
    schedule: list[tuple[str, float, float, int]],
) -> None:
    state = tmp_path_factory.mktemp("state")
    policy = SitePolicy(epsilon_cap=cap, epsilon_cap_total=total_cap, min_noise_multiplier=0.5)
    delta = 1 / (10 * _PATIENTS)
    allowed: dict[str, list[tuple[float, float, int]]] = {}
    for task, noise, rate, steps in schedule:
        entry = _run_round(state, policy, task, noise, rate, steps)
        assert entry["epsilon_total"] <= cap
        if entry["kind"] == "round":
            allowed.setdefault(task, []).append((noise, rate, steps))
            if total_cap is not None:
                assert entry["epsilon_all_tasks"] <= total_cap

    # The cumulative ε per task equals Opacus' RDP accountant on the rounds that ran.
    for task, history in allowed.items():
        accountant = RDPAccountant()
        accountant.history = list(history)
        expected = accountant.get_epsilon(delta=delta)
        last = [e for e in SiteLedger(state).entries() if e["task"] == task][-1]
        assert last["epsilon_total"] == pytest.approx(expected, rel=1e-9)

    assert verify_ledger(state / LEDGER_FILE, load_public_key(state / PUBLIC_KEY_FILE)).intact


_ROUND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_ledger import _run_round
    from privacy.policy import SitePolicy

    entry = _run_round(Path(sys.argv[1]), SitePolicy(epsilon_cap=6.0), "crs-risk", 1.0, 0.5, 4)
    print(json.dumps({"kind": entry["kind"], "epsilon_total": entry["epsilon_total"]}))
    """
)


def test_epsilon_across_processes(tmp_path: Path) -> None:
    """Each round in its own process: ε accumulates on disk and the cap holds."""
    outcomes = []
    for _ in range(2):
        completed = subprocess.run(
            [sys.executable, "-c", _ROUND_SCRIPT, str(tmp_path), str(REPO)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        outcomes.append(json.loads(completed.stdout.strip().splitlines()[-1]))

    trained = [outcome for outcome in outcomes if outcome["kind"] == "round"]
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.5, 4 * len(trained))]
    assert trained[-1]["epsilon_total"] == pytest.approx(accountant.get_epsilon(delta=1 / 500))
    assert all(outcome["epsilon_total"] <= 6.0 for outcome in outcomes)
    assert [outcome["kind"] for outcome in outcomes] == ["round", "refusal"]
