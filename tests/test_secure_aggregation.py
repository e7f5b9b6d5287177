"""Secure aggregation with Flower's SecAgg+: a real 3-site simulation and the mode's run config.

The fixture runs one 2-round crs-risk federation with `secure-aggregation = true`. The
aggregate check rebuilds the plain FedAvg of the same site updates from what each site
stored on disk (its released weights per round) and compares it with the checkpoint the
coordinator built from the masked sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_helpers import demo_run_config, read_manifest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Metadata
from safetensors.numpy import load_file

from client.resend import ReleaseStore
from client.secure_app import secure_aggregation_mod
from models.spec import load_spec
from privacy.keys import load_public_key
from privacy.ledger import verify_ledger
from server.app import build_initial_arrays
from server.cli_run import simulate
from server.demo_cohort import generate_demo_cohort
from server.run_config import RunConfigError, parse_run_config

RUN_NAME = "secure-crs"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic 3-site cohort and one 2-round SecAgg+ crs-risk federation over it."""
    out = tmp_path_factory.mktemp("secure")
    cohort = generate_demo_cohort(out, num_sites=3, patients_per_site=16, seed=0)
    run_config = {
        **demo_run_config(cohort, out / "runs", RUN_NAME),
        "secure-aggregation": True,
    }
    result = simulate(run_config)
    return {"out": out, "cohort": cohort, "run_config": run_config, "result": result}


def _round_dir(secure: dict[str, Any], server_round: int) -> Path:
    return Path(secure["out"]) / "runs" / RUN_NAME / f"round-{server_round}"


@pytest.mark.simulation
def test_secure_checkpoint_per_round(secure: dict[str, Any]) -> None:
    run_dir = Path(secure["out"]) / "runs" / RUN_NAME
    assert sorted(p.name for p in run_dir.iterdir()) == ["round-1", "round-2"]
    for server_round in (1, 2):
        manifest = read_manifest(_round_dir(secure, server_round))
        assert manifest["round"] == server_round
        assert manifest["aggregated"] is True
        assert manifest["num-updates"] == 3
        assert manifest["run-config"]["secure-aggregation"] is True


@pytest.mark.simulation
def test_secure_manifest_states_mode(secure: dict[str, Any]) -> None:
    for server_round in (1, 2):
        facts = read_manifest(_round_dir(secure, server_round))["secure-aggregation"]
        assert facts["enabled"] is True
        assert facts["halted"] is False
        assert facts["per-update-validation"] is False
        assert "SecAgg+" in facts["protocol"]


@pytest.mark.simulation
def test_secure_weights_finite(secure: dict[str, Any]) -> None:
    arrays = load_file(str(Path(secure["result"].last_checkpoint) / "weights.safetensors"))
    assert arrays
    for name, array in arrays.items():
        assert np.all(np.isfinite(array)), name


@pytest.mark.simulation
def test_secure_epsilon_per_site(secure: dict[str, Any]) -> None:
    previous: dict[str, float] = {}
    for server_round in (1, 2):
        manifest = read_manifest(_round_dir(secure, server_round))
        assert {entry["site"] for entry in manifest["sites"]} == {"site-1", "site-2", "site-3"}
        for entry in manifest["sites"]:
            assert entry["status"] == "ok"
            assert entry["accountant"] == "rdp"
            assert entry["privacy-unit"] == "patient"
            assert 0 < entry["delta"] < 1 / entry["patients"]
            assert entry["epsilon-round"] > 0
            assert entry["epsilon-total"] > previous.get(entry["site"], 0.0)
            assert entry["ledger-entry"]["epsilon_total"] == pytest.approx(entry["epsilon-total"])
            previous[entry["site"]] = entry["epsilon-total"]


@pytest.mark.simulation
def test_secure_ledgers_verify(secure: dict[str, Any]) -> None:
    for site in ("site-1", "site-2", "site-3"):
        state = Path(secure["cohort"].consortium) / site / "state"
        verification = verify_ledger(
            state / "ledger.jsonl", load_public_key(state / "site-key.pub")
        )
        assert verification.intact, verification.problem
        rounds = [entry["round"] for entry in verification.entries]
        assert rounds == [1, 2]


@pytest.mark.simulation
def test_secure_aggregate_matches_fedavg(secure: dict[str, Any]) -> None:
    """The unmasked aggregate equals plain FedAvg of the sites' weights up to quantization."""
    run_config = parse_run_config(secure["run_config"])
    global_arrays = build_initial_arrays(run_config, load_spec(run_config.spec))
    for server_round in (1, 2):
        manifest = read_manifest(_round_dir(secure, server_round))
        checkpoint = load_file(str(_round_dir(secure, server_round) / "weights.safetensors"))

        # Plain FedAvg of the weights each site stored for this round, weighted by patients
        site_weights = []
        patients = []
        for entry in manifest["sites"]:
            state = Path(secure["cohort"].consortium) / entry["site"] / "state"
            release = ReleaseStore(state, "crs-risk").load(RUN_NAME, server_round)
            assert release is not None, entry["site"]
            site_weights.append({k: v.numpy() for k, v in release.state_dict.items()})
            patients.append(entry["patients"])
        total = float(sum(patients))
        fedavg = {
            name: sum(
                w[name].astype(np.float64) * p for w, p in zip(site_weights, patients, strict=True)
            )
            / total
            for name in global_arrays
        }

        # SecAgg+ error: one quantization step of each site's weighted update, over the
        # summed weights, plus float32 rounding of the stored weights.
        facts = manifest["secure-aggregation"]
        step = 2 * facts["clipping-range"] / facts["quantization-range"]
        tolerance = len(patients) * step / (total / facts["max-weight"]) + 1e-6

        moved = 0.0
        for name, expected in fedavg.items():
            error = float(np.max(np.abs(checkpoint[name].astype(np.float64) - expected)))
            assert error <= tolerance, (server_round, name, error, tolerance)
            moved = max(moved, float(np.max(np.abs(expected - global_arrays[name]))))
        # The updates are far larger than the tolerance, so the check can tell them apart.
        assert moved > 100 * tolerance
        global_arrays = checkpoint


def _train_message(content: RecordDict) -> Message:
    # Explicit metadata, so the message can be built outside a running Flower task.
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def test_mod_passes_plain_train_messages() -> None:
    content = RecordDict({"config": ConfigRecord({"task": "crs-risk"})})
    message = _train_message(content)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen: list[Message] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict(), reply_to=msg)

    secure_aggregation_mod(message, context, call_next)
    assert seen == [message]
    assert not context.state.config_records


def test_run_config_secure_keys() -> None:
    config = parse_run_config({"secure-aggregation": "true", "secagg-num-shares": 3})
    assert config.secure_aggregation is True
    assert config.secagg_num_shares == 3.0
    assert parse_run_config({}).secure_aggregation is False


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"secure-aggregation": 1}, "secure-aggregation"),
        ({"secure-aggregation": True, "strategy": "trimmed-mean"}, "strategy"),
        ({"secure-aggregation": True, "max-update-norm": 5.0}, "max-update-norm"),
        ({"secagg-num-shares": 2}, "secagg-num-shares"),
        ({"secagg-num-shares": 3.5}, "secagg-num-shares"),
        ({"secagg-num-shares": 5, "secagg-reconstruction-threshold": 5}, "threshold"),
        ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"),
        ({"secagg-quantization-range": 1}, "secagg-quantization-range"),
    ],
)
def test_run_config_secure_invalid(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(RunConfigError, match=key):
        parse_run_config(raw)
