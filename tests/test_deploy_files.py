"""Static checks of deploy/: compose files, Kubernetes manifests, systemd units, the Dockerfile.

No Docker engine or Kubernetes cluster runs here, so the files are checked without one: JSON
schemas of the fields they use, cross-references (volumes, secrets, claims, mount paths), and
every Flower command line parsed by Flower's own argument parser.
"""

from __future__ import annotations

import argparse
import configparser
import shlex
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from client.cli import _load_subcommands
from client.cli import _parser as site_parser
from server.cli import build_parser as coordinator_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FLWR_VERSION = version("flwr")
APP_VERSION = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["version"]
APP_IMAGE = f"fedtwin-app:{APP_VERSION}"
# Claims that a site creates itself, because only the site has the path to its data.
SITE_PROVIDED_CLAIMS = {"fedtwin-site-data"}

_ARGS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
COMPOSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "services"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "services": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["image", "command"],
                "additionalProperties": False,
                "properties": {
                    "image": {"type": "string"},
                    "build": {
                        "type": "object",
                        "required": ["context", "dockerfile"],
                        "additionalProperties": False,
                        "properties": {
                            "context": {"type": "string"},
                            "dockerfile": {"type": "string"},
                        },
                    },
                    "command": _ARGS,
                    "ports": {
                        "type": "array",
                        "items": {"type": "string", "pattern": r"^\d+:\d+$"},
                    },
                    "secrets": {"type": "array", "items": {"type": "string"}},
                    "volumes": {"type": "array", "items": {"type": "string"}},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                    "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
                },
            },
        },
        "secrets": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["file"],
                "additionalProperties": False,
                "properties": {"file": {"type": "string"}},
            },
        },
        "volumes": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "args"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "args": _ARGS,
        "env": {"type": "array"},
        "ports": {"type": "array"},
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "readOnly": {"type": "boolean"},
                },
            },
        },
    },
}
KUBERNETES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {"metadata": _METADATA},
    "oneOf": [
        {
            "properties": {
                "apiVersion": {"const": "v1"},
                "kind": {"const": "PersistentVolumeClaim"},
                "spec": {
                    "type": "object",
                    "required": ["accessModes", "resources"],
                    "properties": {
                        "accessModes": {"type": "array", "items": {"enum": ["ReadWriteOnce"]}},
                        "resources": {
                            "type": "object",
                            "required": ["requests"],
                            "properties": {
                                "requests": {
                                    "type": "object",
                                    "required": ["storage"],
                                    "properties": {
                                        "storage": {"type": "string", "pattern": r"^\d+[MG]i$"}
                                    },
                                }
                            },
                        },
                    },
                },
            },
            "required": ["spec"],
        },
        {
            "properties": {
                "apiVersion": {"const": "v1"},
                "kind": {"const": "ConfigMap"},
                "data": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["data"],
        },
        {
            "properties": {
                "apiVersion": {"const": "v1"},
                "kind": {"const": "Service"},
                "spec": {"type": "object", "required": ["selector", "ports"]},
            },
            "required": ["spec"],
        },
        {
            "properties": {
                "apiVersion": {"const": "apps/v1"},
                "kind": {"const": "Deployment"},
                "spec": {
                    "type": "object",
                    "required": ["replicas", "selector", "template"],
                    "properties": {
                        "replicas": {"const": 1},
                        "template": {
                            "type": "object",
                            "required": ["metadata", "spec"],
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["containers", "volumes"],
                                    "properties": {
                                        "containers": {"type": "array", "items": _CONTAINER},
                                        "volumes": {"type": "array"},
                                    },
                                }
                            },
                        },
                    },
                },
            },
            "required": ["spec"],
        },
    ],
}


def _compose_files() -> list[Path]:
    return sorted((DEPLOY / "compose").glob("*.yaml"))


def _kubernetes_files() -> list[Path]:
    return sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _parse_flower(image: str, args: list[str]) -> argparse.Namespace:
    """Parse a container's arguments with the parser of the Flower command its image runs."""
    if image == f"flwr/superlink:{FLWR_VERSION}":
        parser = _parse_args_run_superlink()
    elif image == f"flwr/supernode:{FLWR_VERSION}":
        parser = _parse_args_run_supernode()
    elif image == APP_IMAGE:
        parser = superexec_parser()
    else:
        pytest.fail(f"image {image} is neither a Flower {FLWR_VERSION} image nor {APP_IMAGE}")
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{image}: Flower rejects the arguments {args}")


def test_deploy_folders_present() -> None:
    assert len(_compose_files()) == 2
    assert len(_kubernetes_files()) == 2
    assert (DEPLOY / "docker" / "Dockerfile").is_file()
    assert len(list((DEPLOY / "systemd").glob("*.service"))) == 2


@pytest.mark.parametrize("path", _compose_files(), ids=lambda p: p.name)
def test_compose_schema(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())

    jsonschema.validate(compose, COMPOSE_SCHEMA)


@pytest.mark.parametrize("path", _compose_files(), ids=lambda p: p.name)
def test_compose_references(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    secrets = set(compose.get("secrets", {}))
    volumes = set(compose.get("volumes", {}))

    for name, service in compose["services"].items():
        assert set(service.get("secrets", [])) <= secrets, name
        assert set(service.get("depends_on", [])) <= set(compose["services"]), name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith("./") or source in volumes, (name, mount)

        # Every file a Flower option names is a mounted secret
        for arg in service["command"]:
            value = arg.partition("=")[2]
            if value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in service["secrets"], (name, arg)

    for secret in compose.get("secrets", {}).values():
        assert not Path(secret["file"]).is_absolute()


@pytest.mark.parametrize("path", _compose_files(), ids=lambda p: p.name)
def test_compose_flower_arguments(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())

    for service in compose["services"].values():
        args = _parse_flower(service["image"], service["command"])
        if service["image"].startswith("flwr/superlink"):
            assert args.enable_supernode_auth is True
            assert args.insecure is False
            assert args.database.startswith("/var/lib/")
        if service["image"].startswith("flwr/supernode"):
            assert args.insecure is False
            assert args.root_certificates is not None
            assert args.auth_supernode_private_key is not None


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", _kubernetes_files(), ids=lambda p: p.name)
def test_kubernetes_schema(path: Path) -> None:
    documents = _documents(path)

    assert documents
    for document in documents:
        jsonschema.validate(document, KUBERNETES_SCHEMA)


@pytest.mark.parametrize("path", _kubernetes_files(), ids=lambda p: p.name)
def test_kubernetes_references(path: Path) -> None:
    documents = _documents(path)
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    config_maps = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    deployments = [d for d in documents if d["kind"] == "Deployment"]

    assert deployments
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims | SITE_PROVIDED_CLAIMS, claim
            else:
                assert volume["secret"]["defaultMode"] == 0o400

        for container in pod["containers"]:
            mounts = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (container["name"], mount["name"])
            for variable in container.get("env", []):
                assert variable["valueFrom"]["configMapKeyRef"]["name"] in config_maps
            for arg in container["args"]:
                value = arg.partition("=")[2].strip("'")
                if value.startswith("/etc/"):
                    assert any(value.startswith(m + "/") for m in mounts), (container["name"], arg)

    services = [d for d in documents if d["kind"] == "Service"]
    for service in services:
        assert any(
            service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments
        )


@pytest.mark.parametrize("path", _kubernetes_files(), ids=lambda p: p.name)
def test_kubernetes_flower_arguments(path: Path) -> None:
    for document in _documents(path):
        if document["kind"] != "Deployment":
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            args = _parse_flower(container["image"], container["args"])
            if container["image"].startswith("flwr/"):
                assert args.insecure is False, container["name"]


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


@pytest.mark.parametrize(
    ("name", "program"),
    [
        ("fedtwin-superlink.service", "fedtwin-coordinator"),
        ("fedtwin-supernode@.service", "fedtwin-site"),
    ],
)
def test_systemd_units(name: str, program: str) -> None:
    unit = _unit(DEPLOY / "systemd" / name)

    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["User"] != "root"
    assert service["Restart"] == "on-failure"
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == program
    assert Path(command[0]).is_absolute()

    # Fill the unit's placeholders with example values, then parse with fedtwin's own CLI
    samples = {
        "${SUPERLINK}": "superlink.example:9093",
        "${SITE_CONFIG}": "/srv/site.toml",
        "${RUNTIME_PORT}": "9094",
        "%i": "berlin",
    }
    args = []
    for arg in command[1:]:
        for placeholder, sample in samples.items():
            arg = arg.replace(placeholder, sample)
        args.append(arg)
    if program == "fedtwin-coordinator":
        parsed = coordinator_parser().parse_args(args)
        assert parsed.command == "start"
    else:
        _load_subcommands()
        parsed = site_parser().parse_args(args)
        assert parsed.command == "join"
        assert "EnvironmentFile" in service


def test_dockerfile_base_and_sources() -> None:
    lines = (DEPLOY / "docker" / "Dockerfile").read_text().splitlines()
    instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")]

    assert instructions[0] == ["FROM", f"flwr/superexec:{FLWR_VERSION}"]
    copies = [args.split()[0] for keyword, args in instructions if keyword == "COPY"]
    for source in copies:
        assert (DEPLOY.parent / source).exists(), source
    assert ["ENTRYPOINT", '["flower-superexec"]'] in instructions
