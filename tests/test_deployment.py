"""Real deployment on 127.0.0.1: SuperLink with TLS and site authentication, three SuperNodes.

Every process runs as it would at a consortium: `fedtwin-coordinator start` (flower-superlink),
`fedtwin-site join` (flower-supernode) per site folder built from the real MIMIC-IV demo FHIR
data, `flwr run .` against the SuperLink. Each process is started in its own session and
stopped by PID, together with the helpers Flower starts for it, in a finally block.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from client.cli import main as site_main
from server.cli import main as coordinator_main
from server.deploy import DeployError, superlink_command, write_certificates, write_connection

pytestmark = pytest.mark.deployment

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SITES = ("site-1", "site-2", "site-3")
CONNECTION = "fedtwin-test"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Return processes whose parent is `pid` or that Flower started with `--parent-pid pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        detached = any(
            arg == b"--parent-pid" and i + 1 < len(cmdline) and cmdline[i + 1] == str(pid).encode()
            for i, arg in enumerate(cmdline)
        )
        if parent == pid or detached:
            found.append(int(entry.name))
    return found


def _process_tree(pid: int) -> list[int]:
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        if current in tree:
            continue
        tree.append(current)
        queue.extend(_children(current))
    return tree


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started and every process it started, by PID."""
    pids = _process_tree(process.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class Deployment:
    """A running SuperLink with three registered, connected SuperNodes."""

    root: Path
    port: int
    env: dict[str, str]
    certs: Path
    supernodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    superlink: subprocess.Popen[bytes] | None = None
    superlink_command: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / log_name).open("wb")
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def log(self, log_name: str) -> str:
        return (self.root / "logs" / log_name).read_text(errors="replace")

    def join(self, site: str, key: Path, log_name: str) -> subprocess.Popen[bytes]:
        command = [
            str(BIN / "fedtwin-site"),
            "join",
            "--superlink",
            self.address,
            "--site-config",
            str(self.root / "sites" / site / "site.toml"),
            "--root-certificates",
            str(self.certs / "ca.crt"),
            "--key",
            str(key),
            "--runtime-port",
            str(_free_port()),
            "--max-wait-time",
            "30",
        ]
        return self.start(command, log_name)


def _wait_for_tls(port: int, ca_certificate: Path, process: subprocess.Popen[bytes]) -> None:
    """Wait until the SuperLink completes a TLS handshake that verifies against the CA."""
    context = ssl.create_default_context(cafile=str(ca_certificate))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperLink exited during start-up"
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"the SuperLink did not accept TLS on port {port} in {START_TIMEOUT_S} s")


def _flwr(
    deployment: Deployment, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=deployment.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _online_nodes(deployment: Deployment) -> int:
    listed = _flwr(deployment, "supernode", "list", CONNECTION, "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    return sum(1 for node in nodes if node["status"] == "online")


def _wait_online(deployment: Deployment, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _online_nodes(deployment) >= count:
            return
        time.sleep(1.0)
    raise AssertionError(f"fewer than {count} SuperNodes came online in {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def deployment(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    code = coordinator_main(
        [
            "-q",
            "partition",
            "--fhir",
            str(shared_data / "mimic-iv-demo-fhir"),
            "--sites",
            "3",
            "--seed",
            "0",
            "--out",
            str(root / "sites"),
            # This module runs six federations against the same sites and task, so each
            # site's cap is set above what they spend together (about 5 epsilon per run).
            "--epsilon-cap",
            "60",
        ]
    )
    assert code == 0

    # Coordinator: certificates; sites: key pairs (one site key stays unregistered)
    certs = root / "certs"
    assert coordinator_main(["-q", "certs", "--out", str(certs), "--hosts", "127.0.0.1"]) == 0
    for name in (*SITES, "unregistered"):
        assert site_main(["keygen", "--out", str(root / "keys" / name)]) == 0

    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(root / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    command = [
        str(BIN / "fedtwin-coordinator"),
        "start",
        "--certs",
        str(certs),
        "--database",
        str(root / "superlink" / "state.db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    running = Deployment(root, port, env, certs)
    try:
        superlink = running.start(command, "superlink.log")
        running.superlink = superlink
        running.superlink_command = command
        _wait_for_tls(port, certs / "ca.crt", superlink)
        write_connection(root / "flwr-home", running.address, certs / "ca.crt", name=CONNECTION)

        for site in SITES:
            registered = subprocess.run(
                [
                    str(BIN / "fedtwin-coordinator"),
                    "register-site",
                    str(root / "keys" / site / "site.pub"),
                    "--name",
                    site,
                    "--connection",
                    CONNECTION,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr

        for site in SITES:
            key = root / "keys" / site / "site.key"
            running.supernodes[site] = running.join(site, key, f"supernode-{site}.log")
        _wait_online(running, len(SITES))
        yield running
    finally:
        for process in reversed(running.processes):
            _stop(process)


def test_certs_verify_against_ca(tmp_path: Path) -> None:
    files = write_certificates(tmp_path, ["127.0.0.1", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())

    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert files.ca_key.stat().st_mode & 0o077 == 0
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_certs_refuse_overwrite(tmp_path: Path) -> None:
    write_certificates(tmp_path, ["127.0.0.1"])
    before = (tmp_path / "ca.crt").read_bytes()

    with pytest.raises(DeployError, match="--overwrite"):
        write_certificates(tmp_path, ["127.0.0.1"])
    assert (tmp_path / "ca.crt").read_bytes() == before


def test_start_missing_certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = coordinator_main(
        ["start", "--certs", str(tmp_path), "--database", str(tmp_path / "db"), "--print-command"]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert "ca.crt not found" in error
    assert "fedtwin-coordinator certs" in error


def test_start_command_flags(tmp_path: Path) -> None:
    write_certificates(tmp_path / "certs", ["127.0.0.1"])

    command = superlink_command(tmp_path / "certs", tmp_path / "state.db", port=9093)

    assert "--enable-supernode-auth" in command
    assert "--insecure" not in command
    assert command[command.index("--database") + 1] == str((tmp_path / "state.db").resolve())
    assert command[command.index("--ssl-ca-certfile") + 1].endswith("ca.crt")


def test_join_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_certificates(tmp_path / "certs", ["127.0.0.1"])
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "site.toml").write_text('[site]\nname = "a"\nfhir = ["fhir"]\n')

    code = site_main(
        [
            "join",
            "--superlink",
            "127.0.0.1:9093",
            "--site-config",
            str(tmp_path / "site" / "site.toml"),
            "--root-certificates",
            str(tmp_path / "certs" / "ca.crt"),
            "--key",
            str(tmp_path / "missing.key"),
            "--print-command",
        ]
    )

    assert code == 2
    assert "fedtwin-site keygen" in capsys.readouterr().err


def test_unregistered_site_rejected(deployment: Deployment) -> None:
    key = deployment.root / "keys" / "unregistered" / "site.key"
    process = deployment.join("site-1", key, "supernode-unregistered.log")

    code = process.wait(timeout=90)

    assert code != 0
    assert "Failed to activate SuperNode" in deployment.log("supernode-unregistered.log")
    assert _online_nodes(deployment) == len(SITES)


def test_client_without_tls_rejected(deployment: Deployment) -> None:
    command = [
        str(BIN / "flower-supernode"),
        "--superlink",
        deployment.address,
        "--insecure",
        "--max-retries",
        "1",
        "--max-wait-time",
        "15",
        "--port",
        str(_free_port()),
    ]
    process = deployment.start(command, "supernode-insecure.log")

    code = process.wait(timeout=90)

    assert code != 0
    assert "could not establish a connection" in deployment.log("supernode-insecure.log")
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        plain.settimeout(5)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            assert not plain.recv(1024).startswith(b"HTTP/1.1 200")


def test_flwr_run_two_rounds(deployment: Deployment) -> None:
    from privacy.accountant import AccountantStore
    from privacy.keys import load_public_key
    from privacy.ledger import verify_ledger

    runs = deployment.root / "runs"
    run_config = (
        f"task='lab-forecast' num-server-rounds=2 runs-dir='{runs}' run-name='deployed' "
        "min-sites=3 consortium=''"
    )

    completed = _flwr(
        deployment, "run", ".", CONNECTION, "--run-config", run_config, "--stream", timeout=420
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    manifest = json.loads((runs / "deployed" / "round-2" / "manifest.json").read_text())
    assert manifest["aggregated"] is True
    assert {entry["site"] for entry in manifest["sites"]} == set(SITES)
    for entry in manifest["sites"]:
        assert entry["status"] == "ok", entry

    for site in SITES:
        state = deployment.root / "sites" / site / "state"
        rounds = AccountantStore(state, "lab-forecast").rounds()
        assert [r.server_round for r in rounds if r.run_name == "deployed"] == [1, 2]
        verification = verify_ledger(
            state / "ledger.jsonl", load_public_key(state / "site-key.pub")
        )
        assert verification.intact, verification.problem
        assert len(verification.entries) >= 2


def test_flwr_run_secure(deployment: Deployment) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    from privacy.accountant import AccountantStore
    from privacy.keys import load_public_key
    from privacy.ledger import verify_ledger

    runs = deployment.root / "runs"
    run_config = (
        f"task='lab-forecast' num-server-rounds=2 runs-dir='{runs}' run-name='secure' "
        "min-sites=3 consortium='' secure-aggregation=true"
    )

    completed = _flwr(
        deployment, "run", ".", CONNECTION, "--run-config", run_config, "--stream", timeout=420
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for server_round in (1, 2):
        round_dir = runs / "secure" / f"round-{server_round}"
        manifest = json.loads((round_dir / "manifest.json").read_text())
        secure = manifest["secure-aggregation"]
        assert secure["enabled"] is True
        assert secure["halted"] is False
        assert manifest["aggregated"] is True
        assert manifest["num-updates"] == len(SITES)
        assert {entry["site"] for entry in manifest["sites"]} == set(SITES)
        for entry in manifest["sites"]:
            assert entry["status"] == "ok", entry
            assert entry["epsilon-round"] > 0, entry
            assert entry["epsilon-total"] >= entry["epsilon-round"], entry
            assert 0 < entry["delta"] < 1, entry
        weights = load_file(str(round_dir / "weights.safetensors"))
        assert weights
        assert all(np.all(np.isfinite(array)) for array in weights.values())

    for site in SITES:
        state = deployment.root / "sites" / site / "state"
        rounds = AccountantStore(state, "lab-forecast").rounds()
        assert [r.server_round for r in rounds if r.run_name == "secure"] == [1, 2]
        verification = verify_ledger(
            state / "ledger.jsonl", load_public_key(state / "site-key.pub")
        )
        assert verification.intact, verification.problem
        assert [e["round"] for e in verification.entries if e["run_id"] == "secure"] == [1, 2]


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return
        assert process.poll() is None, f"flwr run exited before {path} was written"
        time.sleep(1.0)
    raise AssertionError(f"{path} was not written within {timeout} s")


def test_site_killed_mid_run(deployment: Deployment) -> None:
    from privacy.keys import load_public_key
    from privacy.ledger import verify_ledger

    runs = deployment.root / "runs"
    run_config = (
        f"task='lab-forecast' num-server-rounds=2 runs-dir='{runs}' run-name='site-fault' "
        "min-sites=2 consortium=''"
    )
    command = [str(BIN / "flwr"), "run", ".", CONNECTION, "--run-config", run_config, "--stream"]
    run = deployment.start(command, "flwr-run-site-fault.log")
    _wait_for_file(runs / "site-fault" / "round-1" / "manifest.json", run, timeout=300)

    # Round 2 starts as soon as round 1 is checkpointed: kill site-3's SuperNode now
    _stop(deployment.supernodes["site-3"])
    code = run.wait(timeout=420)

    assert code == 0, deployment.log("flwr-run-site-fault.log")[-3000:]
    manifest = json.loads((runs / "site-fault" / "round-2" / "manifest.json").read_text())
    assert manifest["aggregated"] is True
    ok_sites = {entry["site"] for entry in manifest["sites"] if entry["status"] == "ok"}
    assert ok_sites == {"site-1", "site-2"}

    state = deployment.root / "sites" / "site-3" / "state"
    verification = verify_ledger(state / "ledger.jsonl", load_public_key(state / "site-key.pub"))
    assert verification.intact, verification.problem

    # The killed site rejoins with the same key
    key = deployment.root / "keys" / "site-3" / "site.key"
    deployment.supernodes["site-3"] = deployment.join("site-3", key, "supernode-site-3-rejoin.log")
    _wait_online(deployment, len(SITES))


def _released_sites(deployment: Deployment, run_name: str, server_round: int) -> set[str]:
    """Return the sites that stored their reply to (run, round) of lab-forecast."""
    from client.resend import ReleaseStore

    released = set()
    for site in SITES:
        store = ReleaseStore(deployment.root / "sites" / site / "state", "lab-forecast")
        json_path, _ = store.paths(run_name, server_round)
        if json_path.is_file():
            released.add(site)
    return released


def test_coordinator_killed_mid_round(deployment: Deployment) -> None:
    from privacy.accountant import AccountantStore
    from privacy.keys import load_public_key
    from privacy.ledger import verify_ledger

    runs = deployment.root / "runs"
    run_name = "coordinator-fault"
    run_config = (
        f"task='lab-forecast' num-server-rounds=2 runs-dir='{runs}' run-name='{run_name}' "
        "min-sites=3 consortium=''"
    )
    command = [str(BIN / "flwr"), "run", ".", CONNECTION, "--run-config", run_config, "--stream"]
    run = deployment.start(command, "flwr-run-coordinator-fault.log")

    # Every site has trained round 2: kill the SuperLink and its ServerApp before checkpoint 2
    deadline = time.monotonic() + 420
    while _released_sites(deployment, run_name, 2) != set(SITES):
        assert time.monotonic() < deadline, "the sites did not train round 2 in time"
        assert run.poll() is None, deployment.log("flwr-run-coordinator-fault.log")[-3000:]
        time.sleep(0.2)
    assert deployment.superlink is not None
    _stop(deployment.superlink)
    _stop(run)
    assert not (runs / run_name / "round-2").exists(), "checkpoint 2 was written before the kill"
    spent = {
        site: AccountantStore(deployment.root / "sites" / site / "state", "lab-forecast").rounds()
        for site in SITES
    }

    # Restart the SuperLink on the same database; SuperNodes that gave up rejoin
    deployment.superlink = deployment.start(deployment.superlink_command, "superlink-restart.log")
    _wait_for_tls(deployment.port, deployment.certs / "ca.crt", deployment.superlink)
    for site in SITES:
        if deployment.supernodes[site].poll() is not None:
            key = deployment.root / "keys" / site / "site.key"
            deployment.supernodes[site] = deployment.join(site, key, f"supernode-{site}-re.log")
    _wait_online(deployment, len(SITES))

    # The same run name resumes from checkpoint 1 and requests round 2 again
    again = deployment.start(command, "flwr-run-coordinator-fault-resume.log")
    code = again.wait(timeout=420)

    assert code == 0, deployment.log("flwr-run-coordinator-fault-resume.log")[-3000:]
    manifest = json.loads((runs / run_name / "round-2" / "manifest.json").read_text())
    assert manifest["aggregated"] is True
    assert {entry["site"] for entry in manifest["sites"]} == set(SITES)
    for entry in manifest["sites"]:
        site = entry["site"]
        state = deployment.root / "sites" / site / "state"
        rounds = AccountantStore(state, "lab-forecast").rounds()
        assert rounds == spent[site], site
        assert [r.server_round for r in rounds if r.run_name == run_name] == [1, 2], site

        verification = verify_ledger(
            state / "ledger.jsonl", load_public_key(state / "site-key.pub")
        )
        assert verification.intact, verification.problem
        round_two = [e for e in verification.entries if e["run_id"] == run_name and e["round"] == 2]
        assert len(round_two) == 1, site
        assert entry["status"] == "ok", entry
        assert entry["ledger-entry"] == round_two[0], site


def _signal_tree(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _pause_tree(pid: int) -> list[int]:
    """Stop `pid` with SIGSTOP, then every process it started, and return the stopped PIDs."""
    os.kill(pid, signal.SIGSTOP)
    stopped = _process_tree(pid)
    _signal_tree(stopped, signal.SIGSTOP)
    return stopped


def _clientapps(pid: int) -> list[int]:
    """Return the `flwr-clientapp` processes that `pid` started."""
    found = []
    for child in _process_tree(pid):
        with contextlib.suppress(OSError):
            if b"flwr-clientapp" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def _wait_for_log(
    deployment: Deployment,
    log_name: str,
    text: str,
    process: subprocess.Popen[bytes],
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in deployment.log(log_name):
            return
        assert process.poll() is None, f"flwr run exited before logging {text!r}"
        time.sleep(0.5)
    raise AssertionError(f"{log_name} did not contain {text!r} within {timeout} s")


def test_slow_site_dropped(deployment: Deployment) -> None:
    from client.resend import ReleaseStore
    from privacy.accountant import AccountantStore
    from privacy.keys import load_public_key
    from privacy.ledger import verify_ledger

    runs = deployment.root / "runs"
    run_name = "slow-site"
    slow = "site-2"
    round_timeout = 40
    log_name = "flwr-run-slow-site.log"
    _wait_online(deployment, len(SITES))
    run_config = (
        f"task='lab-forecast' num-server-rounds=2 runs-dir='{runs}' run-name='{run_name}' "
        f"min-sites=2 consortium='' round-timeout={round_timeout}"
    )
    command = [str(BIN / "flwr"), "run", ".", CONNECTION, "--run-config", run_config, "--stream"]
    run = deployment.start(command, log_name)
    _wait_for_file(runs / run_name / "round-1" / "manifest.json", run, timeout=300)

    # Round 2's train messages go out once round 1 is checkpointed: pause the slow site now,
    # and let it go on once the coordinator has given up waiting for its train reply
    stopped = _pause_tree(deployment.supernodes[slow].pid)
    try:
        _wait_for_log(deployment, log_name, "sent no train reply", run, timeout=4 * round_timeout)
    finally:
        _signal_tree(stopped, signal.SIGCONT)
    code = run.wait(timeout=300)

    output = deployment.log(log_name)
    assert code == 0, output[-3000:]
    dropped = [line for line in output.splitlines() if "sent no train reply" in line]
    assert len(dropped) == 1, dropped
    assert f"Round 2: site {slow} (node " in dropped[0]
    assert f"round timeout of {round_timeout} s" in dropped[0]

    manifest = json.loads((runs / run_name / "round-2" / "manifest.json").read_text())
    assert manifest["aggregated"] is True
    ok_sites = {entry["site"] for entry in manifest["sites"] if entry["status"] == "ok"}
    assert ok_sites == set(SITES) - {slow}
    no_reply = [error for error in manifest["errors"] if error["phase"] == "train"]
    assert len(no_reply) == 1, manifest["errors"]
    assert no_reply[0]["site"] == slow
    assert no_reply[0]["reason"] == "no reply"
    assert no_reply[0]["code"] is None

    # The slow site may still train round 2 after it is resumed: wait until it is idle
    supernode = deployment.supernodes[slow]
    deadline = time.monotonic() + 120
    while _clientapps(supernode.pid):
        assert time.monotonic() < deadline, "the slow site's ClientApp did not finish"
        time.sleep(1.0)

    # Its ledger verifies and contains one entry per round its accountant recorded
    state = deployment.root / "sites" / slow / "state"
    verification = verify_ledger(state / "ledger.jsonl", load_public_key(state / "site-key.pub"))
    assert verification.intact, verification.problem
    rounds = AccountantStore(state, "lab-forecast").rounds()
    spent = [r.server_round for r in rounds if r.run_name == run_name]
    ledger = [e["round"] for e in verification.entries if e["run_id"] == run_name]
    assert sorted(ledger) == sorted(spent)
    json_path, _ = ReleaseStore(state, "lab-forecast").paths(run_name, 2)
    assert sorted(spent) == ([1, 2] if json_path.is_file() else [1])
    _wait_online(deployment, len(SITES))
