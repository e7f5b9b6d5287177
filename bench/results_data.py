"""Site folders and per-patient examples of the real cohorts, for bench/results.py.

The consortia are built with the same code as `fedtwin-coordinator partition` and
`fedtwin-coordinator consortium`, into a fresh work folder, so every site starts with an
empty accountant state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from client.dataset import load_site_dataset
from client.site_config import load_site_config
from client.site_lookup import consortium_sites
from models.examples import TaskExamples
from models.spec import FeatureSpec
from models.tasks import TwinTask, split_patients
from privacy.budget import default_delta
from server.consortium import write_consortium
from server.partition import partition_dataset

MIMIC = "mimic-iv-demo-fhir"
CAR22 = "car22-cart-fhir"
BCMA = "bcma-cart-fhir"
CARPALL = "carpall-cart-scrna"
CARPALL_SHEET = "CARPALL_scRNAseq_CART_metadata.txt"
CARPALL_LABELS = "CARTcell_barcodes.txt"

# The hold-out fraction of `SiteTask.examples`, which calls split_patients with its default.
HOLDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class CohortSource:
    """Source data and command of one task's consortium."""

    task: str
    description: str
    command: str


COHORTS = (
    CohortSource(
        "lab-forecast",
        f"`{MIMIC}` (MIMIC-IV demo labs), 3 sites partitioned by patient, seed 0",
        f"fedtwin-coordinator partition --fhir $D/{MIMIC} --sites 3 --seed 0 --out W/lab-forecast",
    ),
    CohortSource(
        "crs-risk",
        f"`{CAR22}` (CD22 CAR T, NCI) and `{BCMA}` (BCMA CAR T, Leipzig) as two sites",
        f"fedtwin-coordinator consortium --site car22=$D/{CAR22} --site bcma=$D/{BCMA} "
        "--out W/crs-risk",
    ),
    CohortSource(
        "cell-state",
        f"`{CARPALL}` (CARPALL CAR T scRNA-seq), 3 sites partitioned by patient, seed 0",
        f"fedtwin-coordinator partition --cells $D/{CARPALL}/gex --sample-sheet "
        f"$D/{CARPALL}/{CARPALL_SHEET} --labels $D/{CARPALL}/{CARPALL_LABELS} --sites 3 "
        "--seed 0 --out W/cell-state",
    ),
)


@dataclass
class SiteExamples:
    """One site's examples of a task, split into training and held-out patients as the site does."""

    name: str
    examples: TaskExamples
    train: list[int]
    test: list[int]
    delta: float
    min_cohort: int
    epsilon_cap: float

    def train_examples(self) -> TaskExamples:
        """Return the examples of the site's training patients."""
        return self.examples.subset(self.train)

    def test_examples(self) -> TaskExamples:
        """Return the examples of the site's held-out patients."""
        return self.examples.subset(self.test)


def check_data_folder(data: Path) -> None:
    """Raise FileNotFoundError naming the first real-data folder that is missing."""
    for folder in (MIMIC, CAR22, BCMA, CARPALL):
        if not (data / folder).is_dir():
            msg = (
                f"Real data folder {data / folder} not found; set FEDTWIN_SHARED_DATA or --data "
                "to the folder that contains it."
            )
            raise FileNotFoundError(msg)


def build_consortium(task: str, data: Path, out: Path) -> Path:
    """Write the site folders of `task`'s real cohort under `out` and return `out`."""
    if task == "lab-forecast":
        partition_dataset(fhir=[data / MIMIC], cells=[], num_sites=3, out=out, seed=0)
    elif task == "crs-risk":
        sites: dict[str, tuple[list[Path], list[Path]]] = {
            "car22": ([data / CAR22], []),
            "bcma": ([data / BCMA], []),
        }
        write_consortium(sites, out)
    elif task == "cell-state":
        carpall = data / CARPALL
        partition_dataset(
            fhir=[],
            cells=[carpall / "gex"],
            num_sites=3,
            out=out,
            seed=0,
            sample_sheet=carpall / CARPALL_SHEET,
            labels=carpall / CARPALL_LABELS,
        )
    else:
        msg = f"No real cohort is set up for task {task!r}."
        raise ValueError(msg)
    return out


def load_sites(
    consortium: Path, task: TwinTask, spec: FeatureSpec, *, seed: int
) -> list[SiteExamples]:
    """Read every site of a consortium and split its patients with the run's seed.

    The sites are in the order of the simulation's partition ids (sorted by folder name),
    and the split and δ are those `client.site_task.SiteTask` uses.
    """
    sites = []
    for folder in consortium_sites(consortium):
        config = load_site_config(folder)
        data = load_site_dataset(config, spec)
        examples = task.build_examples(
            spec, data.patients, data.timeline, data.events, data.cells, seed=seed
        )
        train, test = split_patients(
            examples.patient_ids, holdout_fraction=HOLDOUT_FRACTION, seed=seed
        )
        delta = config.privacy.delta or default_delta(max(len(train), 1))
        sites.append(
            SiteExamples(
                name=config.name,
                examples=examples,
                train=train,
                test=test,
                delta=delta,
                min_cohort=config.privacy.min_cohort,
                epsilon_cap=config.privacy.epsilon_cap,
            )
        )
    return sites


def pool_examples(parts: list[TaskExamples]) -> TaskExamples:
    """Concatenate the examples of several sites into one set, one row per patient.

    A `sample` tensor (cell-state) indexes `meta["sample_ids"]`, so its indices are shifted
    by the samples of the sites before it.
    """
    first = parts[0]
    tensors: list[list[torch.Tensor]] = [[] for _ in first.names]
    patient_ids: list[str] = []
    sample_ids: list[str] = []
    for part in parts:
        patient_ids.extend(part.patient_ids)
        offset = len(sample_ids)
        sample_ids.extend(part.meta.get("sample_ids", ()))
        for k, (name, tensor) in enumerate(zip(part.names, part.tensors, strict=True)):
            if name == "sample":
                tensor = torch.where(tensor >= 0, tensor + offset, tensor)
            tensors[k].append(tensor)

    meta = dict(first.meta)
    if "sample_ids" in meta:
        meta["sample_ids"] = tuple(sample_ids)
    return TaskExamples(
        task=first.task,
        patient_ids=patient_ids,
        tensors=tuple(torch.cat(group) for group in tensors),
        names=first.names,
        meta=meta,
    )
