"""Coordinator commands of a real deployment: `certs`, `start`, `connect` and `register-site`."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from server.deploy import (
    DEFAULT_CONNECTION,
    register_site_command,
    superlink_command,
    write_certificates,
    write_connection,
)

__all__ = ["add_deploy_parsers"]

# `flwr supernode register` only sends one request; a minute covers a slow TLS handshake.
_REGISTER_TIMEOUT_S = 60.0


def _run_certs(args: argparse.Namespace) -> int:
    files = write_certificates(
        args.out, args.hosts, valid_days=args.valid_days, overwrite=args.overwrite
    )
    print(f"Wrote {files.ca_certificate} (send it to every site)")
    print(f"Wrote {files.server_certificate} and {files.server_key} (for the SuperLink)")
    print(f"Wrote {files.ca_key} (keep it offline; it signs new server certificates)")
    return 0


def _run_start(args: argparse.Namespace) -> int:
    command = superlink_command(
        args.certs, args.database, host=args.host, port=args.port, log_file=args.log_file
    )
    if args.print_command:
        print(shlex.join(command))
        return 0

    # The SuperLink starts `flower-superexec` and `flwr-serverapp` by name, from PATH.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def _run_connect(args: argparse.Namespace) -> int:
    flwr_home = args.flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    path = write_connection(
        flwr_home, args.superlink, args.root_certificates, name=args.name, default=args.default
    )
    print(f"Wrote SuperLink connection {args.name!r} ({args.superlink}) to {path}")
    return 0


def _run_register_site(args: argparse.Namespace) -> int:
    command = register_site_command(args.public_key, connection=args.connection, name=args.name)
    try:
        completed = subprocess.run(command, timeout=_REGISTER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        print(
            f"fedtwin-coordinator register-site: `flwr supernode register` timed out after "
            f"{_REGISTER_TIMEOUT_S:g} s; check that the SuperLink of connection "
            f"{args.connection!r} is running.",
            file=sys.stderr,
        )
        return 1
    return completed.returncode


def _add_certs(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="create the consortium CA and the SuperLink's TLS certificate",
        description=(
            "Create a consortium CA (ca.crt, ca.key) and a SuperLink server certificate "
            "(server.crt, server.key) signed by it, ECDSA P-384. Every site receives ca.crt."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--hosts",
        nargs="+",
        required=True,
        metavar="NAME",
        help="DNS names and IP addresses under which sites reach the SuperLink",
    )
    parser.add_argument(
        "--valid-days",
        type=int,
        default=825,
        metavar="DAYS",
        help="validity of both certificates in days (default: 825)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing certificates")
    parser.set_defaults(handler=_run_certs)


def _add_start(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "start",
        help="run the SuperLink with TLS, site authentication and a persistent state",
        description=(
            "Replace this process with flower-superlink: HTTPS with the certificates of "
            "`certs`, only registered site keys admitted, state kept in a SQLite database."
        ),
    )
    parser.add_argument(
        "--certs", type=Path, required=True, metavar="DIR", help="folder written by `certs`"
    )
    parser.add_argument(
        "--database",
        type=Path,
        required=True,
        metavar="FILE",
        help="SQLite file of the SuperLink's state (registered sites, runs); created if absent",
    )
    parser.add_argument(
        "--host",
        default="0.0.0.0",
        help="address to listen on (default: 0.0.0.0, every interface)",
    )
    parser.add_argument(
        "--port", type=int, default=9093, help="HTTPS port of the SuperLink (default: 9093)"
    )
    parser.add_argument("--log-file", type=Path, metavar="FILE", help="also log to this file")
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="print the flower-superlink command instead of running it",
    )
    parser.set_defaults(handler=_run_start)


def _add_connect(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "connect",
        help="add the SuperLink to Flower's config.toml for `flwr run` and `register-site`",
        description=(
            "Write a [superlink.NAME] table with the SuperLink's address and the consortium's "
            "ca.crt into $FLWR_HOME/config.toml (default ~/.flwr/config.toml)."
        ),
    )
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address"
    )
    parser.add_argument(
        "--root-certificates",
        type=Path,
        required=True,
        metavar="FILE",
        help="the consortium's ca.crt",
    )
    parser.add_argument(
        "--name",
        default=DEFAULT_CONNECTION,
        help=f"connection name (default: {DEFAULT_CONNECTION})",
    )
    parser.add_argument(
        "--flwr-home", type=Path, metavar="DIR", help="Flower's home folder (default: $FLWR_HOME)"
    )
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    parser.set_defaults(handler=_run_connect)


def _add_register_site(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "register-site",
        help="admit a site's public key to the SuperLink (flwr supernode register)",
        description=(
            "Register the public key a site created with `fedtwin-site keygen`; the SuperLink "
            "then accepts that site's SuperNode. Needs the connection written by `connect`."
        ),
    )
    parser.add_argument("public_key", type=Path, metavar="PUBLIC_KEY", help="the site's site.pub")
    parser.add_argument("--name", default="", help="site name shown by `flwr supernode list`")
    parser.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        help=f"SuperLink connection in Flower's config.toml (default: {DEFAULT_CONNECTION})",
    )
    parser.set_defaults(handler=_run_register_site)


def add_deploy_parsers(subparsers: Any) -> None:
    """Register `certs`, `start`, `connect` and `register-site`."""
    _add_certs(subparsers)
    _add_start(subparsers)
    _add_connect(subparsers)
    _add_register_site(subparsers)
