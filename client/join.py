"""`fedtwin-site keygen` and `fedtwin-site join`: connect a site's SuperNode to the consortium.

`keygen` writes the site's authentication key pair (ECDSA P-384, OpenSSH format, the form
flwr 1.42 reads). The site sends the public key to the coordinator, who registers it with
`flwr supernode register`. `join` then replaces itself with `flower-supernode`, which
connects over TLS, trusting only the consortium's root certificate, and signs its requests
with the private key.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.cli import Subcommand, register
from client.site_config import SiteConfigError, load_site_config
from client.site_lookup import NODE_SITE_CONFIG

__all__ = ["SiteKeys", "supernode_command", "write_site_keys"]

logger = logging.getLogger(__name__)

EXIT_UNUSABLE = 2
_KEY_MODE = 0o600


class JoinError(ValueError):
    """Raised when a `join` or `keygen` input is missing or invalid."""


@dataclass(frozen=True)
class SiteKeys:
    """Paths of a site's SuperNode authentication key pair."""

    private_key: Path
    public_key: Path


def write_site_keys(out: Path, *, overwrite: bool = False) -> SiteKeys:
    """Create the site's SuperNode key pair as `site.key` (mode 0600) and `site.pub`.

    Raises
    ------
    JoinError
        When a key file exists and `overwrite` is false.
    """
    keys = SiteKeys(private_key=out.resolve() / "site.key", public_key=out.resolve() / "site.pub")
    for path in (keys.private_key, keys.public_key):
        if path.exists() and not overwrite:
            msg = (
                f"Key file {path} already exists; pass --overwrite to replace it (the coordinator "
                "must then register the new site.pub)."
            )
            raise JoinError(msg)
    out.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    fd = os.open(keys.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    keys.public_key.write_bytes(public + b"\n")
    return keys


def _flower_supernode() -> str:
    beside = Path(sys.executable).parent / "flower-supernode"
    if beside.is_file():
        return str(beside)
    found = shutil.which("flower-supernode")
    if found is None:
        msg = f"Command flower-supernode not found beside {sys.executable} or on PATH."
        raise JoinError(msg)
    return found


def _quote(value: str) -> str:
    if "'" in value:
        msg = f"Path {value!r} contains a single quote, which a node config value cannot hold."
        raise JoinError(msg)
    return f"'{value}'"


def supernode_command(
    superlink: str,
    site_config: Path,
    root_certificates: Path,
    private_key: Path,
    *,
    runtime_port: int = 9094,
    max_wait_time: float | None = None,
) -> list[str]:
    """Build the `flower-supernode` command of a site.

    Parameters
    ----------
    superlink
        The SuperLink's address as HOST:PORT.
    site_config
        The site's `site.toml` (or its folder); the ClientApp reads it through node config
        key `site-config`.
    root_certificates
        The consortium's `ca.crt`.
    private_key
        The site's `site.key` from `write_site_keys`.
    runtime_port
        Local port of the SuperNode's runtime API, on 127.0.0.1; two SuperNodes on one
        machine need two ports.
    max_wait_time
        Seconds the SuperNode keeps trying to reach the SuperLink before it exits; None
        retries without limit.

    Raises
    ------
    JoinError, SiteConfigError
        When a file is missing or `site.toml` is invalid.
    """
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit():
        msg = f"SuperLink address {superlink!r} is invalid; pass HOST:PORT, e.g. superlink:9093."
        raise JoinError(msg)
    for path, fix in (
        (root_certificates, "copy the consortium's ca.crt from the coordinator"),
        (private_key, "create it with `fedtwin-site keygen --out DIR`"),
    ):
        if not path.is_file():
            msg = f"File {path} not found; {fix}."
            raise JoinError(msg)

    # Fail here, before connecting, when site.toml is missing or invalid
    site = load_site_config(site_config)

    command = [
        _flower_supernode(),
        "--superlink",
        superlink,
        "--root-certificates",
        str(root_certificates.resolve()),
        "--auth-supernode-private-key",
        str(private_key.resolve()),
        "--node-config",
        f"{NODE_SITE_CONFIG}={_quote(str(site.path))}",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if max_wait_time is not None:
        command += ["--max-wait-time", f"{max_wait_time:g}"]
    return command


# Command line


def _keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for site.key and site.pub"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing key pair")


def _run_keygen(args: argparse.Namespace) -> int:
    try:
        keys = write_site_keys(args.out, overwrite=args.overwrite)
    except (JoinError, OSError) as err:
        print(f"fedtwin-site keygen: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"Wrote {keys.private_key} (keep it on this site) and {keys.public_key}")
    print("Send site.pub to the coordinator, who registers it before you run `fedtwin-site join`.")
    return 0


def _join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    parser.add_argument(
        "--site-config", type=Path, required=True, metavar="FILE", help="the site's site.toml"
    )
    parser.add_argument(
        "--root-certificates",
        type=Path,
        required=True,
        metavar="FILE",
        help="the consortium's ca.crt, received from the coordinator",
    )
    parser.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="FILE",
        help="the site's private key (site.key from `fedtwin-site keygen`)",
    )
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=9094,
        metavar="PORT",
        help="local port of the SuperNode's runtime API on 127.0.0.1 (default: 9094)",
    )
    parser.add_argument(
        "--max-wait-time",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds without reaching the SuperLink (default: retry forever)",
    )
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the flower-supernode command instead of running it",
    )


def _run_join(args: argparse.Namespace) -> int:
    try:
        command = supernode_command(
            args.superlink,
            args.site_config,
            args.root_certificates,
            args.key,
            runtime_port=args.runtime_port,
            max_wait_time=args.max_wait_time,
        )
    except (JoinError, SiteConfigError) as err:
        print(f"fedtwin-site join: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.print_command:
        print(" ".join(command))
        return 0

    # flower-supernode starts the ClientApp with flwr-clientapp, found on PATH
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


register(
    Subcommand(
        name="keygen",
        help="create the site's SuperNode key pair (site.key, site.pub)",
        add_arguments=_keygen_arguments,
        run=_run_keygen,
    )
)
register(
    Subcommand(
        name="join",
        help="connect this site's SuperNode to the consortium's SuperLink (TLS, site key)",
        add_arguments=_join_arguments,
        run=_run_join,
    )
)
