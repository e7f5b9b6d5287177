"""Find the site folder a ClientApp serves, from its node config or the consortium folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.site_config import SiteConfig, SiteConfigError, load_site_config

__all__ = ["NODE_SITE_CONFIG", "consortium_sites", "resolve_site"]

# Node config key of a SuperNode, e.g. `--node-config "site-config='/srv/site/site.toml'"`.
NODE_SITE_CONFIG = "site-config"


def consortium_sites(consortium: str | Path) -> list[Path]:
    """Return the site folders (subfolders with `site.toml`) of a consortium, sorted by name."""
    root = Path(consortium)
    if not root.is_dir():
        msg = (
            f"Consortium folder {root} not found; set run config key `consortium` "
            "to a folder of site folders."
        )
        raise SiteConfigError(msg)
    sites = sorted(p for p in root.iterdir() if (p / "site.toml").is_file())
    if not sites:
        msg = f"Consortium folder {root} has no site folders (subfolders with site.toml)."
        raise SiteConfigError(msg)
    return sites


def resolve_site(node_config: Mapping[str, Any], consortium: str) -> SiteConfig:
    """Load the site config of this node.

    A SuperNode of a real deployment names its `site.toml` in the node config key
    `site-config`. In a simulation, node `partition-id` i serves the i-th site folder
    (sorted by name) of the consortium folder.
    """
    if NODE_SITE_CONFIG in node_config:
        return load_site_config(str(node_config[NODE_SITE_CONFIG]))

    if "partition-id" not in node_config:
        msg = (
            f"Node config has neither `{NODE_SITE_CONFIG}` nor `partition-id`; start the SuperNode "
            f"with --node-config \"{NODE_SITE_CONFIG}='/path/to/site.toml'\"."
        )
        raise SiteConfigError(msg)
    if not consortium:
        msg = (
            "Run config key `consortium` is empty, so a simulated node cannot find its site folder."
        )
        raise SiteConfigError(msg)

    sites = consortium_sites(consortium)
    partition_id = int(node_config["partition-id"])
    if partition_id >= len(sites):
        msg = (
            f"Simulated node {partition_id} has no site: consortium {consortium} has {len(sites)} "
            "site folders; set num-supernodes to the number of sites."
        )
        raise SiteConfigError(msg)
    return load_site_config(sites[partition_id])
