"""Coordinator side of a deployment: TLS certificates, the SuperLink command, site registration.

A consortium runs Flower's deployment engine. The coordinator starts `flower-superlink` with
TLS, SuperNode authentication and a persistent state database. Each site runs
`flower-supernode` with the consortium's root certificate and its own private key, whose
public key the coordinator registers first with `flwr supernode register`.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_CONNECTION",
    "DeployError",
    "TlsFiles",
    "flower_executable",
    "register_site_command",
    "superlink_command",
    "tls_files",
    "write_certificates",
    "write_connection",
]

logger = logging.getLogger(__name__)

# Name of the SuperLink connection in Flower's config.toml that fedtwin commands use.
DEFAULT_CONNECTION = "fedtwin"

_CA_NAME = "fedtwin consortium CA"
_KEY_MODE = 0o600


class DeployError(ValueError):
    """Raised when a deployment input (certificate folder, host name, key file) is unusable."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a consortium's TLS setup, as `write_certificates` names them."""

    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path


def tls_files(folder: Path) -> TlsFiles:
    """Return the TLS file paths inside a certificate folder (they may not exist yet)."""
    folder = folder.resolve()
    return TlsFiles(
        ca_certificate=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_certificate=folder / "server.crt",
        server_key=folder / "server.key",
    )


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host or "/" in host or " " in host:
            msg = f"Host name {host!r} is invalid; pass DNS names or IP addresses to --hosts."
            raise DeployError(msg)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_pem(path: Path, data: bytes, *, private: bool) -> None:
    # Private keys are created with mode 0600 so that no other account can read them.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, _KEY_MODE if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_certificates(
    out: Path,
    hosts: Sequence[str],
    *,
    valid_days: int = 825,
    overwrite: bool = False,
) -> TlsFiles:
    """Create a consortium CA and a SuperLink server certificate signed by it.

    Both keys are ECDSA P-384. The server certificate names every entry of `hosts`
    as a subject alternative name (IP address or DNS name), because SuperNodes and
    the `flwr` CLI check the SuperLink address against it.

    Parameters
    ----------
    out
        Folder that receives `ca.crt`, `ca.key`, `server.crt` and `server.key`.
    hosts
        DNS names and IP addresses under which sites reach the SuperLink.
    valid_days
        Validity of both certificates (days).
    overwrite
        Replace existing files in `out`; otherwise existing files raise `DeployError`.

    Returns
    -------
    TlsFiles
        The paths written.

    Raises
    ------
    DeployError
        On no hosts, an invalid host, a non-positive validity or existing files.
    """
    if not hosts:
        msg = "No host names given; pass --hosts with the SuperLink's DNS names or IP addresses."
        raise DeployError(msg)
    if valid_days < 1:
        msg = f"Certificate validity {valid_days} days is invalid; pass at least 1."
        raise DeployError(msg)
    names = _subject_alternative_names(hosts)
    files = tls_files(out)
    existing = [p for p in vars(files).values() if p.exists()]
    if existing and not overwrite:
        msg = (
            f"Certificate file {existing[0]} already exists; pass --overwrite to replace the "
            "consortium's certificates (every site then needs the new ca.crt)."
        )
        raise DeployError(msg)
    out.mkdir(parents=True, exist_ok=True)

    # The consortium CA: signs only the SuperLink certificate
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    # The SuperLink's server certificate, valid for every host name given
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip())]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_pem(files.ca_key, _private_pem(ca_key), private=True)
    _write_pem(files.server_key, _private_pem(server_key), private=True)
    _write_pem(
        files.ca_certificate, ca_certificate.public_bytes(serialization.Encoding.PEM), private=False
    )
    _write_pem(
        files.server_certificate,
        server_certificate.public_bytes(serialization.Encoding.PEM),
        private=False,
    )
    logger.info("Wrote the consortium CA and server certificate for %s to %s", hosts, out)
    return files


def flower_executable(name: str) -> str:
    """Return the path of a Flower command, preferring the one beside this Python.

    Raises
    ------
    DeployError
        When the command is neither beside this Python nor on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        msg = f"Command {name} not found beside {sys.executable} or on PATH; install flwr 1.42."
        raise DeployError(msg)
    return found


def _require_files(paths: Sequence[Path], fix: str) -> None:
    for path in paths:
        if not path.is_file():
            msg = f"File {path} not found; {fix}."
            raise DeployError(msg)


def superlink_command(
    certificates: Path,
    database: Path,
    *,
    host: str = "0.0.0.0",
    port: int = 9093,
    log_file: Path | None = None,
) -> list[str]:
    """Build the `flower-superlink` command of a consortium's coordinator.

    The SuperLink serves its Fleet, Control and runtime APIs on one HTTPS port (flwr
    1.42) and accepts only SuperNodes whose public key was registered. It keeps its state
    in the SQLite file `database`, so registrations survive a restart. It runs each
    ServerApp in a subprocess without installing the app's dependencies at run time.

    Parameters
    ----------
    certificates
        Folder written by `write_certificates`.
    database
        SQLite file of the SuperLink's state; its folder is created.
    host, port
        Address the SuperLink listens on.
    log_file
        File for the SuperLink's log, rotated by Flower; None logs to stderr only.

    Raises
    ------
    DeployError
        When a certificate file is missing or the port is out of range.
    """
    files = tls_files(certificates)
    _require_files(
        [files.ca_certificate, files.server_certificate, files.server_key],
        "create the certificates with `fedtwin-coordinator certs --out DIR --hosts NAME...`",
    )
    if not 0 < port < 65536:
        msg = f"Port {port} is invalid; pass a port from 1 to 65535."
        raise DeployError(msg)
    database = database.resolve()
    database.parent.mkdir(parents=True, exist_ok=True)

    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(files.ca_certificate),
        "--ssl-certfile",
        str(files.server_certificate),
        "--ssl-keyfile",
        str(files.server_key),
        "--enable-supernode-auth",
        "--database",
        str(database),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if log_file is not None:
        command += ["--log-file", str(log_file.resolve())]
    return command


def write_connection(
    flwr_home: Path,
    address: str,
    root_certificates: Path,
    *,
    name: str = DEFAULT_CONNECTION,
    default: bool = False,
) -> Path:
    """Add or replace a SuperLink connection in Flower's `config.toml`.

    `flwr run`, `flwr supernode register` and the other `flwr` commands then reach the
    SuperLink at `address` over TLS, trusting `root_certificates`.

    Parameters
    ----------
    flwr_home
        Flower's home folder (`$FLWR_HOME`, default `~/.flwr`).
    address
        SuperLink address as HOST:PORT.
    root_certificates
        The consortium's `ca.crt`.
    name
        Connection name, the SUPERLINK argument of `flwr` commands.
    default
        Also make it the default connection.

    Returns
    -------
    Path
        The config file written.
    """
    _require_files([root_certificates], "copy the consortium's ca.crt here")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        msg = f"SuperLink address {address!r} is invalid; pass HOST:PORT, e.g. superlink:9093."
        raise DeployError(msg)

    path = flwr_home / "config.toml"
    config: dict[str, object] = {}
    if path.is_file():
        try:
            config = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            msg = f"Flower config {path} is not valid TOML ({err}); fix or remove it."
            raise DeployError(msg) from err
    superlinks = config.setdefault("superlink", {})
    if not isinstance(superlinks, dict):
        msg = f"Flower config {path}: key `superlink` is not a table; fix or remove it."
        raise DeployError(msg)
    superlinks[name] = {
        "address": address,
        "root-certificates": str(root_certificates.resolve()),
    }
    if default or "default" not in superlinks:
        superlinks["default"] = name

    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def register_site_command(
    public_key: Path, *, connection: str = DEFAULT_CONNECTION, name: str = ""
) -> list[str]:
    """Build the `flwr supernode register` command that admits a site's public key.

    Raises
    ------
    DeployError
        When the public key file is missing.
    """
    _require_files([public_key], "ask the site for the public key that `fedtwin-site keygen` wrote")
    command = [flower_executable("flwr"), "supernode", "register", str(public_key.resolve())]
    command.append(connection)
    if name:
        command += ["--name", name]
    return command
