"""`fedtwin-steward audit-mia`: a membership-inference test of a checkpoint, run on site.

The command loads the site's dataset and a global checkpoint, computes each patient's loss under
the checkpoint, and runs the loss-threshold attack (`privacy.mia`) on the site's training patients
against its held-out patients. The split is the one the site trains with, so "member" means a
patient whose record the site used in training. Only the attack's summary is printed; no
per-patient value leaves this command.

It is registered as a steward command through the `fedtwin.steward_commands` entry point, because
privacy/ may not import the site's data loader.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from client.site_config import SiteConfigError, load_site_config
from client.site_task import SiteTask
from models.spec import SpecError
from privacy.cli import EXIT_FAILED, EXIT_INPUT, EXIT_OK, StewardCommand
from privacy.ledger import LEDGER_FILE, LedgerError, read_entries
from privacy.mia import MembershipAudit, loss_threshold_audit

__all__ = ["AuditInputError", "per_patient_losses", "read_checkpoint", "register"]

logger = logging.getLogger(__name__)

_MANIFEST = "manifest.json"


class AuditInputError(ValueError):
    """Raised when the checkpoint or the site cannot be audited."""


def _round_folder(path: Path) -> Path:
    """Return `path` when it contains a manifest, else its highest `round-<n>` folder with one."""
    if (path / _MANIFEST).is_file():
        return path
    rounds = [
        (int(child.name.removeprefix("round-")), child)
        for child in path.glob("round-*")
        if child.name.removeprefix("round-").isdigit() and (child / _MANIFEST).is_file()
    ]
    if not rounds:
        msg = (
            f"{path}: no {_MANIFEST} here and no round-<n>/{_MANIFEST} below; pass a checkpoint "
            "round folder such as runs/<run-name>/round-3."
        )
        raise AuditInputError(msg)
    return max(rounds)[1]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read a checkpoint's manifest and weights, checking the weights' SHA-256.

    Parameters
    ----------
    path
        A round folder (`runs/<run>/round-<n>`) or a run folder, whose latest round is used.

    Returns
    -------
    tuple
        The manifest, the state dict and the round folder.
    """
    folder = _round_folder(Path(path))
    manifest_path = folder / _MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"{manifest_path}: cannot be read as JSON ({err})."
        raise AuditInputError(msg) from err
    weights = manifest.get("weights") if isinstance(manifest, dict) else None
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str):
        msg = f"{manifest_path}: no 'weights' entry with a 'file'; not a fedtwin checkpoint."
        raise AuditInputError(msg)

    weights_path = folder / Path(weights["file"]).name
    try:
        data = weights_path.read_bytes()
    except OSError as err:
        msg = f"{weights_path}: cannot be read ({err.strerror})."
        raise AuditInputError(msg) from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != weights.get("sha256"):
        msg = (
            f"{weights_path}: SHA-256 {digest[:12]}… differs from the manifest's "
            f"{str(weights.get('sha256'))[:12]}…; the checkpoint was altered or damaged."
        )
        raise AuditInputError(msg)
    return manifest, load_file(str(weights_path)), folder


def per_patient_losses(
    site_task: SiteTask, model: torch.nn.Module, indices: list[int], seed: int
) -> np.ndarray:
    """Compute the task loss of each patient in `indices`, one patient per forward pass."""
    examples, _, _ = site_task.examples(seed)
    model.eval()
    losses = []
    with torch.no_grad():
        for index in indices:
            batch = tuple(tensor[index : index + 1] for tensor in examples.tensors)
            losses.append(float(site_task.task.loss(model, batch)))
    return np.asarray(losses, dtype=float)


def _ledger_epsilon(state_dir: Path, task: str) -> dict[str, Any] | None:
    """Return the latest trained-round entry of `task` in the site's ledger, if any."""
    try:
        entries = read_entries(state_dir / LEDGER_FILE)
    except LedgerError:
        return None
    trained = [
        entry for entry in entries if entry.get("task") == task and entry.get("kind") == "round"
    ]
    return trained[-1] if trained else None


def _audit(args: argparse.Namespace) -> tuple[MembershipAudit, dict[str, Any]]:
    config = load_site_config(args.site_config)
    manifest, state_dict, folder = read_checkpoint(args.checkpoint)
    task_name = str(manifest.get("task", ""))
    seed = args.seed
    if seed is None:
        seed = int((manifest.get("run-config") or {}).get("seed", 0))

    site_task = SiteTask(config, task_name)
    if site_task.spec.sha256 != manifest.get("feature-spec-sha256"):
        msg = (
            f"{config.path}: the site's feature spec {site_task.spec.sha256[:12]} differs from the "
            f"checkpoint's {str(manifest.get('feature-spec-sha256'))[:12]}; audit a checkpoint of "
            "a run this site took part in."
        )
        raise AuditInputError(msg)
    model = site_task.task.build_model(site_task.spec)
    model.load_state_dict(state_dict)

    _, train_idx, holdout_idx = site_task.examples(seed)
    members = per_patient_losses(site_task, model, train_idx, seed)
    non_members = per_patient_losses(site_task, model, holdout_idx, seed)
    audit = loss_threshold_audit(members, non_members, confidence=args.confidence)

    context = {
        "site": config.name,
        "checkpoint": str(folder),
        "run": manifest.get("run-name"),
        "round": manifest.get("round"),
        "task": task_name,
        "seed": seed,
        "ledger_entry": _ledger_epsilon(config.state_dir, task_name),
    }
    return audit, context


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="DIR",
        help="checkpoint round folder (runs/<run>/round-<n>) or run folder (latest round)",
    )
    parser.add_argument(
        "--site-config", type=Path, required=True, metavar="FILE", help="the site's site.toml"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the train/held-out split (default: the run's seed from the manifest)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="level of the AUC's interval (default 0.95)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _describe_epsilon(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "no trained round of this task in the site's ledger"
    epsilon = entry.get("epsilon_total")
    shown = "infinite" if epsilon is None or not math.isfinite(epsilon) else f"{epsilon:.3f}"
    return (
        f"ε {shown} at δ={entry.get('delta'):.2e} ({str(entry.get('accountant', '')).upper()}, "
        f"unit: {entry.get('privacy_unit')}), ledger entry {entry.get('seq')} (run "
        f"{entry.get('run_id')}, round {entry.get('round')})"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        audit, context = _audit(args)
    except (AuditInputError, SiteConfigError, SpecError, OSError) as err:
        print(f"fedtwin-steward audit-mia: {err}", file=sys.stderr)
        return EXIT_INPUT
    except ValueError as err:
        print(f"fedtwin-steward audit-mia: {err}", file=sys.stderr)
        return EXIT_FAILED

    if args.json:
        content = {**context, **audit.__dict__}
        print(json.dumps(content, indent=2, allow_nan=False))
        return EXIT_OK

    print(
        f"Membership inference (loss threshold) on site {context['site']}, task "
        f"{context['task']}, checkpoint {context['checkpoint']}"
    )
    print(
        f"  {audit.members} training patients vs {audit.non_members} held-out patients "
        f"(split seed {context['seed']})"
    )
    print(
        f"  AUC {audit.auc:.3f} ({audit.confidence:.0%} CI {audit.ci_low:.3f}-{audit.ci_high:.3f}, "
        f"DeLong); best advantage TPR-FPR {audit.advantage:.3f}"
    )
    print(f"  accounted: {_describe_epsilon(context['ledger_entry'])}")
    print(
        "  An AUC near 0.5 means this attack found no leakage; it is one attack and does not "
        "bound what a stronger attacker learns."
    )
    return EXIT_OK


def register() -> StewardCommand:
    """Return the `audit-mia` steward command (entry point `fedtwin.steward_commands`)."""
    return StewardCommand(
        name="audit-mia",
        help="measure membership-inference leakage of a checkpoint on this site's patients",
        add_arguments=_add_arguments,
        run=_run,
    )
