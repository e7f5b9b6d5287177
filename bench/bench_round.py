"""Benchmark a fedtwin round against a bare Flower + PyTorch round on the same model and tensors.

Run from the repository root:

    .venv/bin/python bench/bench_round.py [--task crs-risk] [--sites 3] [--num-rounds 6]

The script writes a synthetic demo cohort (`generate_demo_cohort`) into a temporary folder and
runs three variants, each in a fresh Python process with Flower's simulation engine
(`flwr.simulation.run_simulation`, Ray backend, one CPU per simulated site):

- `fedtwin`: the product, through `server.simulation.run_federation`: site datasets read from
  FHIR and .h5ad (through the site cache), budget check, Opacus DP-SGD, accountant files,
  update validation, FedAvg and a checkpoint per round.
- `bare-dp`: a minimal Message-API app written here, `flwr.serverapp.strategy.FedAvg` and a
  ClientApp. The ClientApp trains the same model on the same tensors, which are exported once
  from the site datasets. It runs a plain Opacus `make_private` loop at the same noise, clipping
  bound, sample rate and number of steps, so the comparison shows what the platform adds
  around DP-SGD.
- `bare-sgd`: the same app with plain SGD, the same number of steps and batch size, no privacy.

All three evaluate every site on its held-out patients each round, with the task's `evaluate`.
Round times come from timestamps taken in the server process when the strategy calls
`configure_train` (round start) and when `start` returns (end of the last round). The sizes of the
train messages and replies are measured after the run, on the Message objects the strategy
received: Flower's protobuf serde (`flwr.common.serde.message_to_proto`) and the object tree that
Flower 1.42's transport pushes (the deflated bytes of `get_all_nested_objects`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_dp_step import machine_info
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

BENCH_DIR = Path(__file__).resolve().parent
VARIANTS = ("fedtwin", "bare-dp", "bare-sgd")
DEFAULT_OUT = BENCH_DIR / "out" / "round.json"
BACKEND_CONFIG: dict[str, Any] = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}}

# The training settings of fedtwin's run config defaults, which the bare apps copy.
LEARNING_RATE = 0.1
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
SAMPLE_RATE = 0.5
LOCAL_EPOCHS = 1


# ---------------------------------------------------------------------------------------------
# Cohort and the tensors of the bare apps


def site_folders(cohort: Path) -> list[Path]:
    """Return the site folders of a demo cohort, sorted by name as fedtwin's simulation does."""
    consortium = cohort / "consortium"
    return sorted(p for p in consortium.iterdir() if (p / "site.toml").is_file())


def export_site_tensors(cohort: Path, task_name: str) -> Path:
    """Write each site's train and held-out tensors as fedtwin builds them, for the bare apps.

    The examples come from `load_site_dataset` and the task's `build_examples` with seed 0, and
    the split from `split_patients` with seed 0, exactly as a fedtwin site builds them. Returns the
    folder with `<site>.safetensors` and `<site>.json` (patient ids, tensor names, meta).
    """
    from safetensors.torch import save_file

    from client.dataset import load_site_dataset
    from client.site_config import load_site_config
    from models.spec import load_spec
    from models.tasks import get_task, split_patients

    target = cohort / "bare-tensors" / task_name
    target.mkdir(parents=True, exist_ok=True)
    task = get_task(task_name)
    for folder in site_folders(cohort):
        config = load_site_config(folder)
        spec = load_spec(config.spec)
        data = load_site_dataset(config, spec)
        examples = task.build_examples(
            spec, data.patients, data.timeline, data.events, data.cells, seed=0
        )
        train_idx, test_idx = split_patients(examples.patient_ids, seed=0)

        tensors = {}
        for part, indices in (("train", train_idx), ("test", test_idx)):
            subset = examples.subset(indices)
            for name, tensor in zip(subset.names, subset.tensors, strict=True):
                tensors[f"{part}/{name}"] = tensor.contiguous()
        save_file(tensors, str(target / f"{folder.name}.safetensors"))
        description = {
            "names": list(examples.names),
            "train_ids": [examples.patient_ids[i] for i in train_idx],
            "test_ids": [examples.patient_ids[i] for i in test_idx],
            "meta": examples.meta,
            "spec": str(config.spec or ""),
        }
        (target / f"{folder.name}.json").write_text(
            json.dumps(description, default=list), encoding="utf-8"
        )
    return target


def reset_site_state(cohort: Path) -> None:
    """Delete each site's accountant files, so every run starts with no ε spent.

    The FHIR cache under `state/cache` stays, as it does at a site between runs.
    """
    for folder in site_folders(cohort):
        for file in (folder / "state").glob("accountant-*"):
            file.unlink()


# ---------------------------------------------------------------------------------------------
# The bare Flower app


_SITE_CACHE: dict[tuple[str, str], Any] = {}


def load_bare_site(tensor_dir: str, site: str) -> Any:
    """Load (once per process) a site's exported examples as two TaskExamples and the spec."""
    key = (tensor_dir, site)
    if key not in _SITE_CACHE:
        from safetensors.torch import load_file

        from models.examples import TaskExamples
        from models.spec import load_spec

        folder = Path(tensor_dir)
        description = json.loads((folder / f"{site}.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / f"{site}.safetensors"))
        names = tuple(description["names"])
        meta = {k: tuple(v) if isinstance(v, list) else v for k, v in description["meta"].items()}
        parts = {}
        for part in ("train", "test"):
            parts[part] = TaskExamples(
                task=folder.name,
                patient_ids=list(description[f"{part}_ids"]),
                tensors=tuple(tensors[f"{part}/{name}"] for name in names),
                names=names,
                meta=dict(meta),
            )
        _SITE_CACHE[key] = (parts["train"], parts["test"], load_spec(description["spec"] or None))
    return _SITE_CACHE[key]


def _bare_site(msg: Message, context: Context) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    config = msg.content["config"]
    from models.tasks import get_task

    torch.set_num_threads(1)
    partition = int(context.node_config["partition-id"])
    sites = json.loads(str(config["sites"]))
    train, test, spec = load_bare_site(str(config["tensor-dir"]), sites[partition])
    task = get_task(str(config["task"]))
    model = task.build_model(spec)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return task, model, train, test, dict(config)


def _train_plain(task: Any, model: torch.nn.Module, train: Any, steps: int) -> float:
    from torch.utils.data import DataLoader

    batch_size = max(1, round(SAMPLE_RATE * len(train)))
    loader = DataLoader(train.dataset(), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    model.train()
    for _ in range(LOCAL_EPOCHS):
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return statistics.fmean(losses) if losses else float("nan")


def _train_opacus(task: Any, model: torch.nn.Module, train: Any) -> tuple[float, float]:
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    batch_size = max(1, round(SAMPLE_RATE * len(train)))
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
        data_loader=DataLoader(train.dataset(), batch_size=batch_size),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
    )
    losses = []
    module.train()
    for _ in range(LOCAL_EPOCHS):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(module, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    epsilon = engine.get_epsilon(delta=1.0 / len(train))
    module.to_standard_module()
    return (statistics.fmean(losses) if losses else float("nan")), epsilon


BARE_CLIENT_APP = ClientApp()


@BARE_CLIENT_APP.train()
def bare_train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's training tensors, with Opacus or plain SGD."""
    task, model, train, _, config = _bare_site(msg, context)
    metrics: dict[str, MetricRecordValues] = {"num-examples": float(len(train))}
    if config["variant"] == "bare-dp":
        loss, epsilon = _train_opacus(task, model, train)
        metrics["epsilon"] = epsilon
    else:
        steps = LOCAL_EPOCHS * max(1, round(1 / SAMPLE_RATE))
        loss = _train_plain(task, model, train, steps)
    metrics["train-loss"] = loss
    # More than one means this process kept its loaded tensors across messages.
    metrics["sites-cached"] = float(len(_SITE_CACHE))
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@BARE_CLIENT_APP.evaluate()
def bare_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out tensors with the task's metrics."""
    task, model, _, test, _ = _bare_site(msg, context)
    model.eval()
    with torch.no_grad():
        scores = task.evaluate(model, test)
    metrics: dict[str, MetricRecordValues] = {
        k: float(v) for k, v in scores.items() if isinstance(v, int | float)
    }
    metrics["num-examples"] = float(len(test))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_bare_server_app(
    *, task_name: str, spec: str, num_sites: int, num_rounds: int, config: dict[str, Any]
) -> ServerApp:
    """Return a ServerApp that runs Flower's FedAvg over every site for `num_rounds` rounds."""
    from flwr.serverapp.strategy import FedAvg

    from models.spec import load_spec
    from models.tasks import get_task

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        model = get_task(task_name).build_model(load_spec(spec or None))
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=num_sites,
            min_evaluate_nodes=num_sites,
            min_available_nodes=num_sites,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=num_rounds,
            train_config=ConfigRecord(config),
            evaluate_config=ConfigRecord(config),
        )

    return server_app


# ---------------------------------------------------------------------------------------------
# Instrumentation of a strategy class, in the server process


class RoundClock:
    """Timestamps of the strategy's round steps and the messages it sent and received."""

    def __init__(self) -> None:
        # (step, round, wall seconds, CPU seconds of this process and its descendants)
        self.marks: list[tuple[str, int, float, float]] = []
        self.sent: list[tuple[int, Message]] = []
        self.received: list[tuple[int, Message]] = []

    def mark(self, step: str, server_round: int) -> None:
        """Record the wall clock and the process tree's CPU time at a round step."""
        self.marks.append((step, server_round, time.perf_counter(), tree_cpu_seconds(os.getpid())))

    def instrument(self, strategy_class: type[Any]) -> None:
        """Wrap `configure_train`, `configure_evaluate`, `aggregate_train` and `start`."""
        clock = self
        configure_train = strategy_class.configure_train
        configure_evaluate = strategy_class.configure_evaluate
        aggregate_train = strategy_class.aggregate_train
        start = strategy_class.start

        def timed_configure_train(
            self: Any, server_round: int, *args: Any, **kwargs: Any
        ) -> Iterable[Message]:
            clock.mark("train", server_round)
            messages = list(configure_train(self, server_round, *args, **kwargs))
            clock.sent.extend((server_round, m) for m in messages)
            return messages

        def timed_configure_evaluate(
            self: Any, server_round: int, *args: Any, **kwargs: Any
        ) -> Iterable[Message]:
            clock.mark("evaluate", server_round)
            return configure_evaluate(self, server_round, *args, **kwargs)

        def kept_aggregate_train(self: Any, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            clock.received.extend((server_round, m) for m in replies)
            return aggregate_train(self, server_round, replies)

        def timed_start(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return start(self, *args, **kwargs)
            finally:
                clock.mark("end", 0)

        strategy_class.configure_train = timed_configure_train
        strategy_class.configure_evaluate = timed_configure_evaluate
        strategy_class.aggregate_train = kept_aggregate_train
        strategy_class.start = timed_start

    def rounds(self) -> list[dict[str, float]]:
        """Return per round the wall and CPU seconds: in total, of training, of evaluation.

        The evaluate step runs from `configure_evaluate` to the next round's
        `configure_train`, so it includes fedtwin's checkpoint write.
        """
        starts = [(r, t, c) for step, r, t, c in self.marks if step == "train"]
        evaluates = {r: (t, c) for step, r, t, c in self.marks if step == "evaluate"}
        ends = [(t, c) for step, _, t, c in self.marks if step == "end"]
        out = []
        for index, (server_round, started, cpu_started) in enumerate(starts):
            stop = starts[index + 1][1:] if index + 1 < len(starts) else ends[-1]
            middle = evaluates.get(server_round, stop)
            out.append(
                {
                    "round": server_round,
                    "seconds": stop[0] - started,
                    "train_seconds": middle[0] - started,
                    "evaluate_seconds": stop[0] - middle[0],
                    "cpu_seconds": stop[1] - cpu_started,
                }
            )
        return out


def message_sizes(message: Message) -> dict[str, int]:
    """Return the raw parameter bytes of a message and its serialised sizes."""
    from flwr.common.serde import (
        array_record_to_proto,
        config_record_to_proto,
        message_to_proto,
        metric_record_to_proto,
        recorddict_to_proto,
    )
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    content = message.content
    raw = 0
    for record in content.array_records.values():
        for array in record.values():
            raw += int(array.numpy().nbytes)
    objects = get_all_nested_objects(message)
    return {
        "parameter_bytes": raw,
        "arrays": len(next(iter(content.array_records.values()), {})),
        "proto_message": message_to_proto(message).ByteSize(),
        "proto_content": recorddict_to_proto(content).ByteSize(),
        "proto_array_records": sum(
            array_record_to_proto(r).ByteSize() for r in content.array_records.values()
        ),
        "proto_metric_records": sum(
            metric_record_to_proto(r).ByteSize() for r in content.metric_records.values()
        ),
        "proto_config_records": sum(
            config_record_to_proto(r).ByteSize() for r in content.config_records.values()
        ),
        "object_tree_bytes": sum(len(obj.deflate()) for obj in objects.values()),
        "object_tree_objects": len(objects),
    }


# ---------------------------------------------------------------------------------------------
# One variant in this process


def run_variant(variant: str, cohort: Path, task_name: str, num_rounds: int) -> dict[str, Any]:
    """Run one simulated federation in this process; return round times and message sizes."""
    clock = RoundClock()
    sites = site_folders(cohort)
    statuses: list[str] = []
    started = time.perf_counter()
    spec = str(cohort / "spec.toml")

    if variant == "fedtwin":
        from server.simulation import run_federation
        from server.strategy import FedTwinResult, FedTwinStrategy

        clock.instrument(FedTwinStrategy)
        runs_dir = Path(tempfile.mkdtemp(prefix="fedtwin-bench-runs-"))

        def keep(result: FedTwinResult) -> None:
            for record in result.history:
                statuses.extend(site.status for site in record.sites)

        try:
            run_federation(
                {
                    "consortium": str(cohort / "consortium"),
                    "task": task_name,
                    "num-server-rounds": num_rounds,
                    "spec": spec,
                    "runs-dir": str(runs_dir),
                    "run-name": "bench",
                },
                on_result=keep,
            )
        finally:
            shutil.rmtree(runs_dir, ignore_errors=True)
    else:
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation

        clock.instrument(FedAvg)
        tensor_dir = cohort / "bare-tensors" / task_name
        config = {
            "variant": variant,
            "task": task_name,
            "tensor-dir": str(tensor_dir),
            "sites": json.dumps([p.name for p in sites]),
        }
        run_simulation(
            server_app=make_bare_server_app(
                task_name=task_name,
                spec=spec,
                num_sites=len(sites),
                num_rounds=num_rounds,
                config=config,
            ),
            client_app=BARE_CLIENT_APP,
            num_supernodes=len(sites),
            backend_config=BACKEND_CONFIG,
        )
    wall = time.perf_counter() - started

    replies = [{"round": r, **message_sizes(m)} for r, m in clock.received if m.has_content()]
    sent = [{"round": r, **message_sizes(m)} for r, m in clock.sent]
    cached = 0.0
    if variant != "fedtwin":
        statuses = ["ok" if not m.has_error() else "error" for _, m in clock.received]
        for _, m in clock.received:
            if m.has_content():
                value = m.content.metric_records["metrics"]["sites-cached"]
                cached = max(cached, float(value) if isinstance(value, int | float) else 0.0)
    return {
        "variant": variant,
        "task": task_name,
        "sites": len(sites),
        "num_rounds": num_rounds,
        "wall_seconds": wall,
        "rounds": clock.rounds(),
        "statuses": statuses,
        "bare_sites_cached_max": cached,
        "replies": replies,
        "train_messages": sent,
    }


# ---------------------------------------------------------------------------------------------
# Process-tree memory, read from /proc


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """Return `pid` and all its descendants."""
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(_children(tree[index]))
        index += 1
    return tree


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds of `pid` and its live descendants.

    CPU time is less sensitive than wall time to other jobs on a shared machine. Processes that
    ended before the call no longer count.
    """
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat", encoding="ascii") as handle:
                # The fields after the command name, which may contain spaces and brackets.
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def _memory_kib(pid: int) -> tuple[int, int]:
    # (RSS, PSS) in KiB from smaps_rollup; PSS splits shared pages among the processes mapping them.
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemorySampler:
    """Poll the RSS and PSS of a process tree in a thread; keep the peaks and the process count."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.pid)
            totals = [_memory_kib(p) for p in pids]
            self.peak_rss_kib = max(self.peak_rss_kib, sum(t[0] for t in totals))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(t[1] for t in totals))
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_worker_process(
    script: Path, variant: str, cohort: Path, task_name: str, num_rounds: int, timeout: float
) -> dict[str, Any]:
    """Run one variant in a fresh Python process; return its result with the tree's peak memory."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = Path(handle.name)
    command = [
        sys.executable,
        str(script),
        "--worker",
        variant,
        "--cohort",
        str(cohort),
        "--task",
        task_name,
        "--num-rounds",
        str(num_rounds),
        "--result",
        str(result_file),
    ]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    log_file = result_file.with_suffix(".log")
    load_before = os.getloadavg()[0]

    # Run the worker while sampling its memory; on timeout stop it and the Ray processes it started
    try:
        with log_file.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            with TreeMemorySampler(process.pid) as sampler:
                try:
                    code = process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    for pid in reversed(process_tree(process.pid)):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    process.wait()
                    code = -9

        # Read the worker's result file
        if code != 0 or result_file.stat().st_size == 0:
            tail = log_file.read_text(errors="replace")[-2000:]
            msg = f"{variant} worker failed with exit code {code}; log tail:\n{tail}"
            raise RuntimeError(msg)
        result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    finally:
        result_file.unlink(missing_ok=True)
        log_file.unlink(missing_ok=True)

    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    result["peak_rss_mib"] = sampler.peak_rss_kib / 1024
    result["peak_pss_mib"] = sampler.peak_pss_kib / 1024
    result["peak_processes"] = sampler.peak_processes
    return result


# ---------------------------------------------------------------------------------------------
# The driver


# Rounds 1 and 2 are not steady: round 1 starts the Ray actors and loads every site's data, and
# in round 2 an actor can meet a site it has not served yet and load that site's data too.
WARM_ROUNDS = 2


def steady_round_seconds(result: dict[str, Any], key: str = "seconds") -> float:
    """Return the median time of the rounds after the first `WARM_ROUNDS`."""
    later = [r[key] for r in result["rounds"] if r["round"] > WARM_ROUNDS]
    if not later:
        msg = f"run has {len(result['rounds'])} rounds; use more than {WARM_ROUNDS}."
        raise ValueError(msg)
    return statistics.median(later)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return medians and spreads per variant and the ratios measured within each repeat."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)

    summary: dict[str, Any] = {}
    for variant, items in by_variant.items():
        steady = [steady_round_seconds(r) for r in items]
        train = [steady_round_seconds(r, "train_seconds") for r in items]
        evaluate = [steady_round_seconds(r, "evaluate_seconds") for r in items]
        cpu = [steady_round_seconds(r, "cpu_seconds") for r in items]
        summary[variant] = {
            "steady_round_cpu_s_median": statistics.median(cpu),
            "steady_round_cpu_s_range": [min(cpu), max(cpu)],
            "steady_round_s_median": statistics.median(steady),
            "steady_round_s_range": [min(steady), max(steady)],
            "steady_train_step_s_median": statistics.median(train),
            "steady_evaluate_step_s_median": statistics.median(evaluate),
            "first_round_s_median": statistics.median(r["rounds"][0]["seconds"] for r in items),
            "second_round_s_median": statistics.median(r["rounds"][1]["seconds"] for r in items),
            "wall_s_median": statistics.median(r["wall_seconds"] for r in items),
            "peak_pss_mib_median": statistics.median(r["peak_pss_mib"] for r in items),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in items),
        }

    ratios: dict[str, Any] = {}
    repeats = sorted({r["repeat"] for r in runs})
    for base in ("bare-dp", "bare-sgd"):
        for key, label in (("seconds", "wall"), ("cpu_seconds", "cpu")):
            values = []
            for repeat in repeats:
                pair = {r["variant"]: r for r in runs if r["repeat"] == repeat}
                if "fedtwin" in pair and base in pair:
                    values.append(
                        steady_round_seconds(pair["fedtwin"], key)
                        / steady_round_seconds(pair[base], key)
                    )
            if values:
                ratios[f"fedtwin/{base} {label}"] = {
                    "median": statistics.median(values),
                    "range": [min(values), max(values)],
                    "per_repeat": values,
                }
    summary["ratios"] = ratios
    summary["bytes"] = bytes_summary(runs)
    return summary


def bytes_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per variant the sizes of replies and train messages against their parameter bytes."""
    out: dict[str, Any] = {}
    for run in runs:
        if run["variant"] in out:
            continue
        entry: dict[str, Any] = {}
        for kind in ("replies", "train_messages"):
            items = [m for m in run[kind] if m["parameter_bytes"] > 0]
            if not items:
                continue
            first = items[0]
            entry[kind] = {
                "parameter_bytes": first["parameter_bytes"],
                "arrays": first["arrays"],
                "proto_message_bytes": statistics.median(m["proto_message"] for m in items),
                "proto_array_record_bytes": statistics.median(
                    m["proto_array_records"] for m in items
                ),
                "proto_metric_record_bytes": statistics.median(
                    m["proto_metric_records"] for m in items
                ),
                "proto_config_record_bytes": statistics.median(
                    m["proto_config_records"] for m in items
                ),
                "object_tree_bytes": statistics.median(m["object_tree_bytes"] for m in items),
                "proto_over_parameters": statistics.median(
                    m["proto_message"] / m["parameter_bytes"] for m in items
                ),
                "object_tree_over_parameters": statistics.median(
                    m["object_tree_bytes"] / m["parameter_bytes"] for m in items
                ),
            }
        out[run["variant"]] = entry
    return out


def print_summary(summary: dict[str, Any], task_name: str) -> None:
    """Print the round-time and message-size tables in Markdown."""
    print(f"\nround time, task {task_name}: median over repeats (range)")
    print(
        "| variant | round 1 s | round 2 s | rounds 3+ s | train step s | evaluate step s "
        "| rounds 3+ CPU s | peak PSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        if variant not in summary:
            continue
        s = summary[variant]
        low, high = s["steady_round_s_range"]
        print(
            f"| {variant} | {s['first_round_s_median']:.2f} | {s['second_round_s_median']:.2f} "
            f"| {s['steady_round_s_median']:.2f} ({low:.2f}-{high:.2f}) "
            f"| {s['steady_train_step_s_median']:.2f} | {s['steady_evaluate_step_s_median']:.2f} "
            f"| {s['steady_round_cpu_s_median']:.2f} | {s['peak_pss_mib_median']:.0f} |"
        )
    for name, ratio in summary["ratios"].items():
        low, high = ratio["range"]
        print(f"{name} (rounds 3+): {ratio['median']:.2f} ({low:.2f}-{high:.2f})")

    print("\nbytes per site and round (median)")
    print("| variant | message | parameter B | protobuf B | x | object tree B | x |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant, entry in summary["bytes"].items():
        for kind, b in entry.items():
            print(
                f"| {variant} | {kind} | {b['parameter_bytes']} | {b['proto_message_bytes']:.0f} "
                f"| {b['proto_over_parameters']:.3f} | {b['object_tree_bytes']:.0f} "
                f"| {b['object_tree_over_parameters']:.3f} |"
            )


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--task", default="crs-risk", help="twin task (default: crs-risk)")
    parser.add_argument("--sites", type=int, default=3, help="sites in the generated cohort")
    parser.add_argument("--patients-per-site", type=int, default=24, help="patients per site")
    parser.add_argument(
        "--num-rounds", type=int, default=6, help="server rounds per run (more than 2)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--cohort", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def worker_main(args: argparse.Namespace) -> None:
    """Run one variant and write its result file (the driver's subprocess)."""
    result = run_variant(args.worker, args.cohort, args.task, args.num_rounds)
    args.result.write_text(json.dumps(result), encoding="utf-8")


def run_repeats(
    cohort: Path,
    *,
    task_name: str,
    variants: list[str],
    num_rounds: int,
    repeat: int,
    timeout: float,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every variant `repeat` times in rotating order; return the runs."""
    runs = []
    for index in range(repeat):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        for variant in order:
            if variant == "fedtwin":
                reset_site_state(cohort)
            result = run_worker_process(
                Path(__file__).resolve(), variant, cohort, task_name, num_rounds, timeout
            )
            result["repeat"] = index
            runs.append(result)
            if on_run is not None:
                on_run(result)
    return runs


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return

    from server.demo_cohort import generate_demo_cohort

    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="fedtwin-bench-") as tmp:
        cohort = Path(tmp)
        generate_demo_cohort(
            cohort, num_sites=args.sites, patients_per_site=args.patients_per_site, seed=0
        )
        export_site_tensors(cohort, args.task)

        def show(run: dict[str, Any]) -> None:
            print(
                f"repeat {run['repeat']} {run['variant']}: rounds "
                + ", ".join(f"{r['seconds']:.2f}" for r in run["rounds"])
                + f" s; wall {run['wall_seconds']:.1f} s; statuses {sorted(set(run['statuses']))}; "
                f"load average {run['load_average_1min'][0]:.1f} to "
                f"{run['load_average_1min'][1]:.1f}",
                flush=True,
            )

        runs = run_repeats(
            cohort,
            task_name=args.task,
            variants=variants,
            num_rounds=args.num_rounds,
            repeat=args.repeat,
            timeout=args.timeout,
            on_run=show,
        )

    summary = summarise(runs)
    print_summary(summary, args.task)
    document = {
        "benchmark": "round",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "task": args.task,
            "sites": args.sites,
            "patients_per_site": args.patients_per_site,
            "num_rounds": args.num_rounds,
            "repeat": args.repeat,
            "backend_config": BACKEND_CONFIG,
            "goals": {"round_time": "fedtwin <= 1.1x bare", "bytes": "<= 1.05x parameter bytes"},
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        # Import this file as the module `bench_round`, so that Ray pickles the bare ClientApp by
        # reference and each simulated site's process keeps its loaded tensors across messages.
        import bench_round

        bench_round.main()
    else:
        main()
