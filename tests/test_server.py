"""Tests of the coordinator: run config, aggregation, validation, checkpoints and strategy."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from models.spec import load_spec
from models.wire import ARRAYS, CONFIG, METRICS, REPLY, Config, Metric, Reply, Status
from server.aggregation import ServerAdam, trimmed_mean, weighted_average
from server.app import make_server_app, run_server
from server.checkpoint import (
    CheckpointError,
    Rejection,
    RoundRecord,
    SiteEntry,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    write_checkpoint,
)
from server.run_config import SCHEMA, RunConfig, RunConfigError, parse_run_config
from server.strategy import (
    FedTwinStrategy,
    SiteWaitTimeoutError,
    arrays_to_numpy,
    numpy_to_arrays,
    wait_for_nodes,
)
from server.validation import norm_outlier_reason, update_norm, validate_update

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_SHA = "a" * 64
OTHER_SHA = "b" * 64


def global_arrays() -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.zeros((2, 3), dtype=np.float32),
        "layer.bias": np.zeros(2, dtype=np.float32),
        "norm.num_batches_tracked": np.array(4, dtype=np.int64),
    }


def shifted(offset: float) -> dict[str, np.ndarray]:
    arrays = global_arrays()
    return {
        name: (value + offset).astype(value.dtype) if value.dtype.kind == "f" else value.copy()
        for name, value in arrays.items()
    }


# --- run config ----------------------------------------------------------------------


def test_run_config_defaults() -> None:
    assert parse_run_config({}) == RunConfig()


def test_run_config_unknown_key() -> None:
    with pytest.raises(RunConfigError, match="'num-rounds'") as info:
        parse_run_config({"num-rounds": 3})
    assert "num-server-rounds" in str(info.value)
    assert "trim-fraction" in str(info.value)


def test_run_config_converts_strings() -> None:
    config = parse_run_config({"num-server-rounds": "5", "learning-rate": "0.2", "seed": 7.0})
    assert config.num_server_rounds == 5
    assert config.learning_rate == pytest.approx(0.2)
    assert config.seed == 7
    assert isinstance(config.seed, int)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task", "kinetics"),
        ("strategy", "krum"),
        ("trim-fraction", 0.5),
        ("sample-rate", 0.0),
        ("fraction-train", 1.5),
        ("num-server-rounds", 0),
        ("num-server-rounds", 2.5),
        ("learning-rate", "fast"),
        ("max-grad-norm", True),
        ("noise-multiplier", float("nan")),
        ("run-name", "../escape"),
        ("task", 3),
        ("round-timeout", 0.0),
        ("round-timeout", -5),
    ],
    ids=lambda item: str(item),
)
def test_run_config_bad_value(key: str, value: Any) -> None:
    with pytest.raises(RunConfigError, match=f"'{key}'"):
        parse_run_config({key: value})


def test_pyproject_matches_schema() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    config = pyproject["tool"]["flwr"]["app"]["config"]
    assert list(config) == list(SCHEMA)
    for key, value in config.items():
        assert value == SCHEMA[key].default, key
        assert type(value) is SCHEMA[key].type, key


def test_docs_match_schema() -> None:
    text = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z-]+)` \| (\w+) \| `([^`]*)` \|", text, flags=re.MULTILINE)
    assert [key for key, _, _ in rows] == list(SCHEMA)
    for key, type_name, default in rows:
        assert type_name == SCHEMA[key].type.__name__, key
        assert tomllib.loads(f"value = {default}")["value"] == SCHEMA[key].default, key


def test_run_config_to_dict() -> None:
    config = parse_run_config({"strategy": "fedadam"})
    assert parse_run_config(config.to_dict()) == config


# --- aggregation ---------------------------------------------------------------------


def test_weighted_average_weights() -> None:
    first = {"w": np.array([0.0, 0.0], dtype=np.float32), "n": np.array(2, dtype=np.int64)}
    second = {"w": np.array([4.0, 8.0], dtype=np.float32), "n": np.array(4, dtype=np.int64)}
    result = weighted_average([first, second], [1.0, 3.0])
    np.testing.assert_allclose(result["w"], [3.0, 6.0])
    assert result["w"].dtype == np.float32
    assert result["n"] == 4  # 0.25 * 2 + 0.75 * 4 = 3.5, rounded to even
    assert result["n"].dtype == np.int64


def test_weighted_average_bad_weights() -> None:
    update = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="Weights"):
        weighted_average([update, update], [0.0, 0.0])
    with pytest.raises(ValueError, match="2 weights for 1 updates"):
        weighted_average([update], [1.0, 1.0])


def test_trimmed_mean_drops_outliers() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    updates = [{"w": np.array([v, -v], dtype=np.float32)} for v in values]
    result = trimmed_mean(updates, 0.2)
    np.testing.assert_allclose(result["w"], [3.0, -3.0])
    plain = weighted_average(updates, [1.0] * 5)
    assert plain["w"][0] > 200.0


def test_trimmed_mean_zero_fraction() -> None:
    updates = [{"w": np.array([v])} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(trimmed_mean(updates, 0.0)["w"], [3.0])


def test_fedadam_step_toward_mean() -> None:
    optimizer = ServerAdam(learning_rate=0.05)
    current = {"w": np.zeros(3, dtype=np.float32), "n": np.array(1, dtype=np.int64)}
    target = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32), "n": np.array(2, dtype=np.int64)}

    first = optimizer.step(current, target)
    delta = target["w"].astype(np.float64)
    expected = 0.05 * 0.1 * delta / (np.sqrt(0.01 * delta**2) + 1e-3)
    np.testing.assert_allclose(first["w"], expected, rtol=1e-6)
    assert np.all(np.sign(first["w"]) == np.sign(target["w"]))
    assert first["n"] == 2

    distance = np.linalg.norm(target["w"] - current["w"])
    state = first
    for _ in range(10):
        state = optimizer.step(state, target)
    assert np.linalg.norm(target["w"] - state["w"]) < distance


def test_fedadam_state_round_trip() -> None:
    optimizer = ServerAdam(learning_rate=0.1)
    current = {"w": np.zeros(2)}
    optimizer.step(current, {"w": np.array([1.0, 2.0])})
    restored = ServerAdam(learning_rate=0.1)
    restored.load_state_arrays(optimizer.state_arrays())
    aggregate = {"w": np.array([0.5, 0.5])}
    np.testing.assert_allclose(
        optimizer.step(current, aggregate)["w"], restored.step(current, aggregate)["w"]
    )


# --- validation ----------------------------------------------------------------------


def check(arrays: dict[str, np.ndarray], **kwargs: Any) -> str | None:
    options: dict[str, Any] = {
        "spec_sha256": SPEC_SHA,
        "reply_spec_sha256": SPEC_SHA,
        "max_update_norm": 0.0,
    }
    options.update(kwargs)
    return validate_update(arrays, global_arrays(), **options)


def test_validate_accepts_normal() -> None:
    assert check(shifted(0.1)) is None
    assert check(shifted(0.1), max_update_norm=5.0) is None


def test_validate_rejects_nan() -> None:
    arrays = shifted(0.1)
    arrays["layer.bias"][1] = np.nan
    reason = check(arrays)
    assert reason is not None
    assert "layer.bias" in reason
    assert "NaN" in reason


def test_validate_rejects_shape() -> None:
    arrays = shifted(0.0)
    arrays["layer.weight"] = np.zeros((3, 2), dtype=np.float32)
    assert "shape" in (check(arrays) or "")


def test_validate_rejects_dtype() -> None:
    arrays = shifted(0.0)
    arrays["layer.bias"] = arrays["layer.bias"].astype(np.float64)
    assert "dtype" in (check(arrays) or "")


def test_validate_rejects_keys() -> None:
    missing = shifted(0.0)
    del missing["layer.bias"]
    assert "missing parameters layer.bias" in (check(missing) or "")
    extra = shifted(0.0)
    extra["head.weight"] = np.zeros(1, dtype=np.float32)
    assert "unexpected parameters head.weight" in (check(extra) or "")


def test_validate_rejects_hash() -> None:
    assert "feature spec" in (check(shifted(0.0), reply_spec_sha256=OTHER_SHA) or "")
    assert "feature spec" in (check(shifted(0.0), reply_spec_sha256=None) or "")


def test_validate_rejects_huge_norm() -> None:
    arrays = shifted(100.0)
    reason = check(arrays, max_update_norm=10.0)
    assert reason is not None
    assert "max-update-norm" in reason
    assert update_norm(arrays, global_arrays()) == pytest.approx(100.0 * np.sqrt(8))


def test_validate_auto_norm() -> None:
    huge = shifted(100.0)
    assert "median" in (check(huge, other_norms=[1.0, 1.2]) or "")
    assert check(huge, other_norms=[1.0]) is None  # only 2 updates in the round
    assert check(shifted(0.1), other_norms=[1.0, 1.2]) is None
    assert norm_outlier_reason(5.0, [0.0, 0.0]) is None


# --- checkpoints ---------------------------------------------------------------------


def sample_record(server_round: int) -> RoundRecord:
    return RoundRecord(
        server_round=server_round,
        sites=[
            SiteEntry(
                site="site-a",
                node_id=11,
                status=Status.OK,
                patients=12,
                epsilon_round=0.8,
                epsilon_total=1.6,
                delta=1e-3,
                accountant="rdp",
                secure_rng=False,
                privacy_unit="patient",
            ),
            SiteEntry(site="site-b", node_id=12, status=Status.REFUSED_BUDGET, message="cap 2.0"),
        ],
        rejected=[Rejection(site="site-c", node_id=13, reason="NaN")],
        num_updates=1,
        aggregated=True,
        train_metrics={"train-loss": 0.5, "num-examples": 12},
        evaluate_metrics={"eval-loss": float("nan")},
    )


def write(run_dir: Path, server_round: int, offset: float = 0.0, **kwargs: Any) -> Path:
    return write_checkpoint(
        run_dir,
        sample_record(server_round),
        shifted(offset),
        run_name="demo",
        run_config=RunConfig().to_dict(),
        task="lab-forecast",
        spec_sha256=SPEC_SHA,
        **kwargs,
    )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    round_dir = write(tmp_path, 1, offset=0.5, optimizer_state={"m/w": np.ones(2)})
    assert round_dir == tmp_path / "round-1"

    checkpoint = load_checkpoint(round_dir)
    for name, value in shifted(0.5).items():
        np.testing.assert_array_equal(checkpoint.arrays[name], value)
        assert checkpoint.arrays[name].shape == value.shape
        assert checkpoint.arrays[name].dtype == value.dtype
    np.testing.assert_array_equal(checkpoint.optimizer_state["m/w"], np.ones(2))

    manifest = json.loads((round_dir / "manifest.json").read_text(encoding="utf-8"))
    weights_sha = hashlib.sha256((round_dir / "weights.safetensors").read_bytes()).hexdigest()
    assert manifest["weights"]["sha256"] == weights_sha
    assert manifest["round"] == 1
    assert manifest["feature-spec-sha256"] == SPEC_SHA
    assert manifest["run-config"]["strategy"] == "fedavg"
    assert manifest["sites"][0]["epsilon-total"] == 1.6
    assert manifest["sites"][0]["delta"] == 1e-3
    assert manifest["sites"][1]["status"] == Status.REFUSED_BUDGET
    assert manifest["rejected"][0]["site"] == "site-c"
    assert manifest["evaluate-metrics"]["eval-loss"] is None
    assert manifest["fedtwin-version"]
    assert manifest["created-utc"].endswith("+00:00")
    assert not list(tmp_path.glob("round-1/.*"))  # no temporary files left


def test_checkpoint_sha_mismatch(tmp_path: Path) -> None:
    round_dir = write(tmp_path, 1)
    weights = round_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors has SHA-256"):
        latest_checkpoint(tmp_path)


def test_checkpoint_resume_highest(tmp_path: Path) -> None:
    for server_round in (1, 2, 10):
        write(tmp_path, server_round, offset=float(server_round))
    (tmp_path / "round-11").mkdir()  # interrupted write: no manifest
    (tmp_path / "notes").mkdir()

    found = latest_checkpoint(tmp_path)
    assert found is not None
    server_round, arrays = found
    assert server_round == 10
    np.testing.assert_array_equal(arrays["layer.bias"], shifted(10.0)["layer.bias"])


def test_checkpoint_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    assert load_latest_checkpoint(tmp_path) is None


# --- strategy ------------------------------------------------------------------------

SiteFn = Callable[[Message], Message]


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Set the process identity that `Message` reads, as the SuperLink or a simulation does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LoopbackGrid(Grid):
    """In-process grid: each node id maps to a function that replies to a message."""

    def __init__(self, sites: dict[int, SiteFn]) -> None:
        self.sites = sites
        self.sent: list[Message] = []

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            replies.append(self.sites[message.metadata.dst_node_id](message))
        return replies


def train_reply(
    instruction: Message,
    site: str,
    *,
    offset: float | None = 0.0,
    patients: int = 10,
    status: str = Status.OK,
    spec_sha256: str | None = None,
    nan: bool = False,
    loss: float = 1.0,
) -> Message:
    if spec_sha256 is None:
        spec_sha256 = str(instruction.content[CONFIG][Config.SPEC_SHA256])
    content = RecordDict()
    if offset is not None:
        arrays = arrays_to_numpy(instruction.content.array_records[ARRAYS])
        arrays = {
            name: (value + offset).astype(value.dtype) if value.dtype.kind == "f" else value
            for name, value in arrays.items()
        }
        if nan:
            arrays["layer.weight"][0, 0] = np.nan
        content[ARRAYS] = numpy_to_arrays(arrays)
    content[METRICS] = MetricRecord(
        {
            Metric.NUM_EXAMPLES: patients,
            Metric.TRAIN_LOSS: loss,
            Metric.EPSILON_ROUND: 0.5,
            Metric.EPSILON_TOTAL: 0.5 * int(instruction.content[CONFIG][Config.SERVER_ROUND]),
            Metric.DELTA: 1e-3,
            Metric.NOISE_MULTIPLIER: 1.0,
            Metric.MAX_GRAD_NORM: 1.0,
            Metric.SAMPLE_RATE: 0.5,
            Metric.STEPS: 4,
        }
    )
    content[REPLY] = ConfigRecord(
        {
            Reply.STATUS: status,
            Reply.SITE: site,
            Reply.MESSAGE: "" if status == Status.OK else "epsilon cap reached",
            Reply.SPEC_SHA256: spec_sha256,
            Reply.ACCOUNTANT: "rdp",
            Reply.SECURE_RNG: False,
            Reply.PRIVACY_UNIT: "patient",
        }
    )
    return Message(content, reply_to=instruction)


def evaluate_reply(
    instruction: Message, site: str, *, loss: float, patients: int, status: str = Status.OK
) -> Message:
    content = RecordDict()
    if status == Status.OK:
        content[METRICS] = MetricRecord(
            {Metric.NUM_EXAMPLES: patients, Metric.EVAL_LOSS: loss, "mae": loss / 2}
        )
    content[REPLY] = ConfigRecord({Reply.STATUS: status, Reply.SITE: site})
    return Message(content, reply_to=instruction)


def make_strategy(tmp_path: Path, **overrides: Any) -> FedTwinStrategy:
    config = parse_run_config({"runs-dir": str(tmp_path), **overrides})
    return FedTwinStrategy(config, spec_sha256=SPEC_SHA, run_name="test", run_dir=tmp_path / "test")


def configure(strategy: FedTwinStrategy, node_ids: list[int]) -> list[Message]:
    grid = LoopbackGrid({node_id: lambda m: m for node_id in node_ids})
    messages = strategy.configure_train(
        1, numpy_to_arrays(global_arrays()), strategy.config_record(), grid
    )
    return list(messages)


def test_configure_train_config(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, strategy="fedprox", **{"proximal-mu": 0.3})
    messages = configure(strategy, [1, 2, 3])
    assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]
    config = messages[0].content[CONFIG]
    wire_keys = {v for k, v in vars(Config).items() if k.isupper()}
    assert set(config) == wire_keys
    assert config[Config.SERVER_ROUND] == 1
    assert config[Config.PROXIMAL_MU] == pytest.approx(0.3)
    assert config[Config.SPEC_SHA256] == SPEC_SHA

    fedavg = make_strategy(tmp_path, **{"proximal-mu": 0.3})
    assert fedavg.config_record()[Config.PROXIMAL_MU] == 0.0


def test_configure_train_fraction(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, **{"fraction-train": 0.5, "min-sites": 1})
    assert len(configure(strategy, [1, 2, 3, 4, 5])) == 3
    again = make_strategy(tmp_path, **{"fraction-train": 0.5, "min-sites": 1})
    first = [m.metadata.dst_node_id for m in configure(strategy, [1, 2, 3, 4, 5])]
    second = [m.metadata.dst_node_id for m in configure(again, [1, 2, 3, 4, 5])]
    assert first == second


def test_aggregate_train_mixed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy(tmp_path)
    a, b, c, d, e, f = configure(strategy, [1, 2, 3, 4, 5, 6])
    replies = [
        train_reply(a, "site-a", offset=1.0, patients=10, loss=0.5),
        train_reply(b, "site-b", offset=2.0, patients=30, loss=1.0),
        train_reply(c, "site-c", offset=None, status=Status.REFUSED_BUDGET),
        train_reply(d, "site-d", offset=0.5, nan=True),
        train_reply(e, "site-e", offset=0.5, spec_sha256=OTHER_SHA),
        Message(Error(code=0, reason="ClientApp crashed"), reply_to=f),
    ]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    result = arrays_to_numpy(arrays)
    np.testing.assert_allclose(result["layer.weight"], np.full((2, 3), 1.75), rtol=1e-6)
    assert result["norm.num_batches_tracked"] == 4
    assert metrics is not None
    assert metrics[Metric.TRAIN_LOSS] == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)
    assert metrics[Metric.NUM_EXAMPLES] == 40
    assert Metric.EPSILON_TOTAL not in metrics

    record = strategy.round_record(1)
    assert [s.site for s in record.sites] == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    assert record.sites[2].status == Status.REFUSED_BUDGET
    assert record.sites[0].epsilon_total == pytest.approx(0.5)
    assert {r.site for r in record.rejected} == {"site-d", "site-e"}
    assert record.errors[0]["reason"] == "ClientApp crashed"
    assert record.num_updates == 2

    assert "site-c" in caplog.text
    assert "epsilon cap reached" in caplog.text
    assert "site-d" in caplog.text
    assert "NaN" in caplog.text
    assert "site-e" in caplog.text


def test_aggregate_train_none_valid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy(tmp_path)
    a, b = configure(strategy, [1, 2])
    replies = [
        train_reply(a, "site-a", offset=1.0, nan=True),
        train_reply(b, "site-b", offset=None, status=Status.NO_DATA),
    ]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for name, value in arrays_to_numpy(arrays).items():
        np.testing.assert_array_equal(value, global_arrays()[name])
    assert metrics is None
    assert not strategy.round_record(1).aggregated
    assert "no valid update" in caplog.text


def test_aggregate_train_norm_outlier(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    messages = configure(strategy, [1, 2, 3, 4])
    offsets = [0.1, 0.12, 0.11, 50.0]
    replies = [
        train_reply(message, f"site-{index}", offset=offset)
        for index, (message, offset) in enumerate(zip(messages, offsets, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert [r.site for r in strategy.round_record(1).rejected] == ["site-3"]
    np.testing.assert_allclose(arrays_to_numpy(arrays)["layer.bias"], [0.11, 0.11], rtol=1e-5)


def test_aggregate_train_trimmed_mean(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path, strategy="trimmed-mean", **{"max-update-norm": 1e6})
    messages = configure(strategy, [1, 2, 3, 4, 5])
    offsets = [1.0, 2.0, 3.0, 4.0, 40.0]
    replies = [
        train_reply(message, f"site-{index}", offset=offset)
        for index, (message, offset) in enumerate(zip(messages, offsets, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays_to_numpy(arrays)["layer.bias"], [3.0, 3.0])


def test_aggregate_evaluate_withheld(tmp_path: Path) -> None:
    strategy = make_strategy(tmp_path)
    a, b, c = configure(strategy, [1, 2, 3])
    replies = [
        evaluate_reply(a, "site-a", loss=1.0, patients=10),
        evaluate_reply(b, "site-b", loss=3.0, patients=30),
        evaluate_reply(c, "site-c", loss=0.0, patients=0, status=Status.BELOW_MIN_COHORT),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    assert metrics[Metric.EVAL_LOSS] == pytest.approx(2.5)
    assert metrics["mae"] == pytest.approx(1.25)
    assert metrics[Metric.NUM_EXAMPLES] == 40
    assert metrics["num-sites"] == 2
    statuses = [s["status"] for s in strategy.round_record(1).evaluate_sites]
    assert statuses == [Status.OK, Status.OK, Status.BELOW_MIN_COHORT]


def site_function(name: str, offset: float, patients: int) -> SiteFn:
    def answer(message: Message) -> Message:
        if message.metadata.message_type == "train":
            return train_reply(message, name, offset=offset, patients=patients)
        return evaluate_reply(message, name, loss=abs(offset), patients=patients)

    return answer


def three_sites() -> LoopbackGrid:
    return LoopbackGrid(
        {
            1: site_function("site-a", 0.1, 10),
            2: site_function("site-b", 0.2, 20),
            3: site_function("site-c", 0.3, 30),
        }
    )


def test_run_server_resume(tmp_path: Path) -> None:
    spec = load_spec()
    raw = {"runs-dir": str(tmp_path), "num-server-rounds": 2, "strategy": "fedadam"}
    first = run_server(
        three_sites(), parse_run_config(raw), initial_arrays_fn=lambda c, s: global_arrays()
    )
    run_dir = tmp_path / f"consortium-lab-forecast-{spec.sha256[:8]}"
    assert [r.server_round for r in first.history] == [1, 2]
    assert all(r.aggregated and not r.rejected for r in first.history)
    assert first.last_checkpoint == str(run_dir / "round-2")
    manifest = json.loads((run_dir / "round-2" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sites"][0]["epsilon-total"] == pytest.approx(1.0)
    assert manifest["evaluate-metrics"]["num-examples"] == 60
    assert "server-optimizer" in manifest

    grid = three_sites()
    raw["num-server-rounds"] = 3
    second = run_server(grid, parse_run_config(raw), initial_arrays_fn=lambda c, s: global_arrays())
    assert [r.server_round for r in second.history] == [3]
    assert grid.sent[0].content[CONFIG][Config.SERVER_ROUND] == 3
    resumed_from = load_checkpoint(run_dir / "round-2").arrays
    sent = arrays_to_numpy(grid.sent[0].content.array_records[ARRAYS])
    np.testing.assert_array_equal(sent["layer.weight"], resumed_from["layer.weight"])


def test_run_server_resume_other_spec(tmp_path: Path) -> None:
    run_dir = tmp_path / "mine"
    write(run_dir, 1)  # written with SPEC_SHA, not the packaged spec's hash
    config = parse_run_config({"runs-dir": str(tmp_path), "run-name": "mine"})
    with pytest.raises(CheckpointError, match="feature spec"):
        run_server(three_sites(), config, initial_arrays_fn=lambda c, s: global_arrays())


def test_make_server_app_unknown() -> None:
    with pytest.raises(RunConfigError, match="'rounds'"):
        make_server_app({"rounds": 2})


def test_aggregate_train_missing_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy(tmp_path)
    a, b, _ = configure(strategy, [1, 2, 3])
    replies = [train_reply(a, "site-a", offset=1.0), train_reply(b, "site-b", offset=1.0)]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    errors = strategy.round_record(1).errors
    assert errors == [{"phase": "train", "node-id": 3, "code": None, "reason": "no reply"}]
    assert "node 3 sent no train reply within the round timeout of 3600 s" in caplog.text


def test_wait_for_nodes_timeout() -> None:
    grid = LoopbackGrid({1: site_function("site-a", 0.1, 10)})
    assert wait_for_nodes(grid, 1, timeout=0.0) == [1]
    with pytest.raises(SiteWaitTimeoutError, match="Only 1 of the 3 sites"):
        wait_for_nodes(grid, 3, timeout=0.05, poll_interval=0.01)


def test_run_server_completed_run(tmp_path: Path) -> None:
    raw = {"runs-dir": str(tmp_path), "num-server-rounds": 1, "min-sites": 2}
    config = parse_run_config(raw)
    first = run_server(
        LoopbackGrid({1: site_function("a", 0.1, 5), 2: site_function("b", 0.2, 5)}),
        config,
        initial_arrays_fn=lambda c, s: global_arrays(),
    )
    assert len(first.history) == 1

    empty = LoopbackGrid({})
    again = run_server(
        empty, config, initial_arrays_fn=lambda c, s: global_arrays(), node_wait_timeout=0.0
    )
    assert again.history == []
    assert empty.sent == []
    final = arrays_to_numpy(again.arrays)
    np.testing.assert_allclose(final["layer.bias"], [0.15, 0.15], rtol=1e-6)


class ThreadedGrid(LoopbackGrid):
    """Grid whose sites reply in threads; replies later than the timeout are left out."""

    def __init__(self, sites: dict[int, SiteFn]) -> None:
        super().__init__(sites)
        self.timeouts: list[float | None] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.timeouts.append(timeout)
        replies: queue.Queue[Message] = queue.Queue()
        messages = list(messages)
        for message in messages:
            self.sent.append(message)
            site = self.sites[message.metadata.dst_node_id]
            worker = threading.Thread(
                target=lambda m=message, f=site: replies.put(f(m)), daemon=True
            )
            worker.start()

        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        received: list[Message] = []
        while len(received) < len(messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                received.append(replies.get(timeout=remaining))
            except queue.Empty:
                break
        return received


def test_round_timeout_drops_slow_site(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    fast_c = site_function("site-c", 0.3, 30)

    def slow_c(message: Message) -> Message:
        # site-c replies in round 1, then takes longer than the round timeout to train round 2
        if message.metadata.message_type == "train" and message.metadata.group_id == "2":
            release.wait(timeout=10.0)
        return fast_c(message)

    grid = ThreadedGrid(
        {1: site_function("site-a", 0.1, 10), 2: site_function("site-b", 0.2, 20), 3: slow_c}
    )
    raw = {"runs-dir": str(tmp_path), "run-name": "slow", "num-server-rounds": 2}
    raw["round-timeout"] = 1.5
    try:
        with caplog.at_level(logging.WARNING, logger="server.strategy"):
            result = run_server(
                grid, parse_run_config(raw), initial_arrays_fn=lambda c, s: global_arrays()
            )
    finally:
        release.set()

    assert grid.timeouts == [1.5, 1.5, 1.5, 1.5]
    first, second = result.history
    assert first.num_updates == 3
    assert first.errors == []
    assert second.aggregated is True
    assert second.num_updates == 2
    assert {entry.site for entry in second.sites} == {"site-a", "site-b"}
    expected = {
        "phase": "train",
        "node-id": 3,
        "code": None,
        "reason": "no reply",
        "site": "site-c",
    }
    assert second.errors == [expected]
    assert "site site-c (node 3) sent no train reply within the round timeout of 1.5 s" in (
        caplog.text
    )

    manifest = json.loads((tmp_path / "slow" / "round-2" / "manifest.json").read_text())
    assert manifest["errors"] == [expected]
    assert len(manifest["evaluate-sites"]) == 3
