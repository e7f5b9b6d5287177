"""Tests of the twin submodels, their per-patient tensors, baselines and metrics."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from scipy import sparse

from models import metrics
from models.cell_state import predict_sample_states, state_composition
from models.examples import TaskExamples
from models.lab_forecast import LabScaling, predict_interval, predict_next
from models.spec import FeatureSpec, load_spec
from models.tasks import TASKS, UnknownTaskError, get_task, split_patients

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

TASK_NAMES = ("lab-forecast", "crs-risk", "cell-state")
INFUSION = pd.Timestamp("2024-03-01T10:00:00Z")


# ---------------------------------------------------------------------------
# Synthetic site tables
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    patient_id: str
    counts: sparse.csr_matrix
    gene_mask: np.ndarray
    labels: np.ndarray
    total_counts: np.ndarray


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    """The default spec with a smaller cell budget, so tests stay fast."""
    base = load_spec()
    tasks = copy.deepcopy(base.tasks)
    tasks["cell-state"]["max-cells-per-patient"] = 24
    tasks["lab-forecast"]["max-bins"] = 16
    return dataclasses.replace(base, tasks=tasks)


def make_patients(n: int, rng: np.random.Generator) -> pd.DataFrame:
    ids = [f"p{i:02d}" for i in range(n)]
    grades = rng.integers(0, 4, size=n).astype(float)
    grades[::5] = np.nan  # no CRS record
    infusion = pd.Series([INFUSION] * n, dtype="datetime64[ns, UTC]")
    infusion.iloc[-1] = pd.NaT  # one patient without a known infusion
    return pd.DataFrame(
        {
            "sex": ["female", "male"] * (n // 2) + ["female"] * (n % 2),
            "birth_date": pd.NaT,
            "age_at_infusion": rng.uniform(20, 80, size=n),
            "infusion_time": infusion.to_numpy(),
            "product": "test-car",
            "crs_grade": grades,
            "icans_grade": np.nan,
        },
        index=pd.Index(ids, name="patient_id"),
    )


def make_timeline(
    spec: FeatureSpec, patients: pd.DataFrame, rng: np.random.Generator
) -> pd.DataFrame:
    """Daily labs per patient: a smooth trend plus noise, some days missing."""
    records: list[dict[str, Any]] = []
    codes = ["crp", "hemoglobin", "platelets", "ldh", "creatinine", "ferritin", "il6"]
    for k, (pid, row) in enumerate(patients.iterrows()):
        known = pd.notna(row["infusion_time"])
        severe = (row["crs_grade"] if pd.notna(row["crs_grade"]) else 0.0) >= 2
        for code in codes:
            lab = spec.lab(code)
            level = {
                "crp": 20.0,
                "hemoglobin": 10.0,
                "platelets": 150.0,
                "ldh": 250.0,
                "creatinine": 0.9,
                "ferritin": 600.0,
                "il6": 15.0,
            }[code]
            for day in range(-5, 14):
                if rng.random() < 0.2:
                    continue
                peak = 8.0 if severe and code in ("crp", "il6", "ferritin") else 1.5
                factor = 1.0 + (peak - 1.0) * math.exp(-((day - 2.0) ** 2) / 6.0)
                value = level * factor * math.exp(rng.normal(0, 0.1)) + 0.01 * k
                if code == "hemoglobin":
                    value = level - 0.1 * day + rng.normal(0, 0.3)
                time = INFUSION + pd.Timedelta(days=day, hours=int(rng.integers(0, 20)))
                records.append(
                    {
                        "patient_id": pid,
                        "time": time,
                        "precision": "second",
                        "day": (time - INFUSION).total_seconds() / 86400.0 if known else np.nan,
                        "code": code,
                        "value": value,
                        "unit": lab.unit,
                        "censored": "",
                        "out_of_range": False,
                        "source": "synthetic",
                    }
                )
    timeline = pd.DataFrame.from_records(records)
    timeline["time"] = pd.to_datetime(timeline["time"], utc=True)
    return timeline


def make_events(patients: pd.DataFrame) -> pd.DataFrame:
    rows = [
        {
            "patient_id": pid,
            "time": INFUSION,
            "day": 0.0,
            "kind": "infusion",
            "code": "car-t",
            "grade": np.nan,
            "grading": "",
            "source": "synthetic",
        }
        for pid in patients.index
    ]
    return pd.DataFrame(rows)


def make_cells(
    spec: FeatureSpec, patients: pd.DataFrame, rng: np.random.Generator
) -> dict[str, Sample]:
    """Two samples per patient; each state raises its own block of genes."""
    states = spec.task("cell-state")["states"][:4]
    n_genes = len(spec.genes)
    cells: dict[str, Sample] = {}
    for pid in patients.index:
        for s in range(2):
            n_obs = int(rng.integers(10, 20))
            state = rng.integers(0, len(states), size=n_obs)
            rate = np.full((n_obs, n_genes), 0.5)
            for i, st in enumerate(state):
                rate[i, st * 5 : st * 5 + 5] = 8.0
            counts = rng.poisson(rate)
            labels = np.array([states[st] for st in state], dtype=object)
            labels[:2] = ""  # unlabelled
            labels[2] = "not a state"
            gene_mask = np.ones(n_genes, dtype=bool)
            gene_mask[-3:] = s == 0
            cells[f"{pid}-s{s}"] = Sample(
                patient_id=str(pid),
                counts=sparse.csr_matrix(counts),
                gene_mask=gene_mask,
                labels=labels,
                total_counts=(counts.sum(axis=1) + 100).astype(np.float32),
            )
    return cells


@pytest.fixture(scope="module")
def tables(spec: FeatureSpec) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    patients = make_patients(16, rng)
    return {
        "patients": patients,
        "timeline": make_timeline(spec, patients, rng),
        "events": make_events(patients),
        "cells": make_cells(spec, patients, rng),
    }


def build(spec: FeatureSpec, tables: dict[str, Any], name: str, seed: int = 0) -> TaskExamples:
    return get_task(name).build_examples(
        spec, tables["patients"], tables["timeline"], tables["events"], tables["cells"], seed=seed
    )


# ---------------------------------------------------------------------------
# Registry, split, container
# ---------------------------------------------------------------------------


def test_get_task_unknown() -> None:
    with pytest.raises(UnknownTaskError, match="known tasks: cell-state, crs-risk, lab-forecast"):
        get_task("nope")


def test_registry_names() -> None:
    assert set(TASKS) == set(TASK_NAMES)
    for name, task in TASKS.items():
        assert task.name == name


def test_split_deterministic() -> None:
    ids = [f"patient-{i}" for i in range(200)]
    first = split_patients(ids, 0.25, seed=3)
    assert first == split_patients(ids, 0.25, seed=3)
    assert first != split_patients(ids, 0.25, seed=4)
    train, test = first
    assert sorted(train + test) == list(range(200))
    assert 0.15 < len(test) / 200 < 0.35


def test_split_stable_across_cohorts() -> None:
    ids = [f"patient-{i}" for i in range(100)]
    _, test = split_patients(ids, 0.3, seed=0)
    held_out = {ids[i] for i in test}
    shuffled = [*reversed(ids[:60]), "new-1", "new-2"]
    _, test_2 = split_patients(shuffled, 0.3, seed=0)
    assert {shuffled[i] for i in test_2} - {"new-1", "new-2"} == held_out & set(ids[:60])


def test_split_small_cohort_both_sides() -> None:
    train, test = split_patients(["a", "b"], 0.25, seed=0)
    assert len(train) == 1
    assert len(test) == 1


def test_split_invalid_fraction() -> None:
    with pytest.raises(ValueError, match=r"holdout_fraction is 1.5"):
        split_patients(["a"], 1.5)


def test_examples_subset_and_dataset() -> None:
    examples = TaskExamples(
        task="t",
        patient_ids=["a", "b", "c"],
        tensors=(torch.arange(3.0), torch.arange(6.0).reshape(3, 2)),
        names=("u", "v"),
    )
    part = examples.subset([2, 0])
    assert part.patient_ids == ["c", "a"]
    assert part["v"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert len(part.dataset()) == 2
    with pytest.raises(ValueError, match="one row per patient"):
        TaskExamples(task="t", patient_ids=["a"], tensors=(torch.zeros(2),), names=("u",))


# ---------------------------------------------------------------------------
# Every task: Opacus compatibility, empty batch, training, baselines
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_model_opacus_valid(spec: FeatureSpec, name: str) -> None:
    model = get_task(name).build_model(spec)
    ModuleValidator.validate(model, strict=True)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_empty_batch(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    task = get_task(name)
    examples = build(spec, tables, name)
    model = task.build_model(spec)
    empty = examples.subset([])
    loss = task.loss(model, empty.tensors)
    assert loss.item() == 0.0
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.all(g == 0) for g in grads if g is not None)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_empty_batch_opacus(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    task = get_task(name)
    examples = build(spec, tables, name)
    model = GradSampleModule(task.build_model(spec), loss_reduction="mean")
    loss = task.loss(model, examples.subset([]).tensors)
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad_sample is not None
        assert p.grad_sample.shape[0] == 0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_per_sample_grad_is_patient(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    """Opacus' per-sample gradient of a patient equals the gradient of that patient alone."""
    task = get_task(name)
    examples = build(spec, tables, name)
    torch.manual_seed(0)
    model = task.build_model(spec)
    for p in model.parameters():  # move off the zero-initialised head
        p.data.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    wrapped = GradSampleModule(model, loss_reduction="mean")

    rows = [0, 1, 2, 3]
    task.loss(wrapped, examples.subset(rows).tensors).backward()
    for k, row in enumerate(rows):
        reference.zero_grad()
        task.loss(reference, examples.subset([row]).tensors).backward()
        for (param_name, p), (_, q) in zip(
            wrapped._module.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert q.grad is not None
            torch.testing.assert_close(
                p.grad_sample[k], q.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {param_name} row {row}"
            )


@pytest.mark.parametrize("name", TASK_NAMES)
def test_loss_decreases(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    task = get_task(name)
    examples = build(spec, tables, name)
    torch.manual_seed(0)
    model = task.build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = task.loss(model, examples.tensors).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = task.loss(model, examples.tensors)
        loss.backward()
        optimizer.step()
    assert task.loss(model, examples.tensors).item() < first


@pytest.mark.parametrize("name", TASK_NAMES)
def test_baseline_metric_names(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    task = get_task(name)
    examples = build(spec, tables, name)
    train, test = split_patients(examples.patient_ids, 0.4, seed=1)
    model = task.build_model(spec)
    evaluated = task.evaluate(model, examples.subset(test))
    base = task.baseline(examples.subset(train), examples.subset(test))
    assert set(evaluated) <= set(base)
    assert evaluated["n-patients"] == len(test)
    assert base["n-patients"] == len(test)


# ---------------------------------------------------------------------------
# lab-forecast
# ---------------------------------------------------------------------------


def test_lab_shapes(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    examples = build(spec, tables, "lab-forecast")
    settings = spec.task("lab-forecast")
    n_codes = len(settings["codes"])
    assert len(examples) == 16  # the patient without infusion keeps its row
    assert examples["values"].shape == (16, 16, n_codes)
    assert examples["time"].shape == (16, 16, 3)
    # Codes the timeline never has are never observed.
    wbc = list(settings["codes"]).index("wbc")
    assert examples["mask"][:, :, wbc].sum() == 0
    # The patient without infusion is on a since-first-observation axis.
    last_row = examples.patient_ids.index("p15")
    assert examples["time"][last_row, :, 1].sum() == 0
    assert examples["time"][0, -1, 1] == 1


def test_lab_out_of_range_dropped(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    timeline = tables["timeline"].copy()
    crp = timeline["code"] == "crp"
    timeline.loc[crp, "out_of_range"] = True
    examples = get_task("lab-forecast").build_examples(
        spec, tables["patients"], timeline, tables["events"], {}
    )
    column = list(spec.task("lab-forecast")["codes"]).index("crp")
    assert examples["mask"][:, :, column].sum() == 0


def test_lab_untrained_predicts_last_value(spec: FeatureSpec) -> None:
    """The zero-initialised head forecasts the last observed value (LOCF), in original units."""
    times = [INFUSION + pd.Timedelta(days=d) for d in (1, 2, 3)]
    timeline = pd.DataFrame(
        {
            "patient_id": "solo",
            "time": pd.to_datetime(times * 2, utc=True),
            "precision": "second",
            "day": [1.0, 2.0, 3.0] * 2,
            "code": ["hemoglobin"] * 3 + ["crp"] * 3,
            "value": [9.0, 9.5, 8.7, 40.0, 120.0, 75.0],
            "unit": ["g/dL"] * 3 + ["mg/L"] * 3,
            "censored": "",
            "out_of_range": False,
            "source": "test",
        }
    )
    task = get_task("lab-forecast")
    examples = task.build_examples(spec, pd.DataFrame(), timeline, pd.DataFrame(), {})
    model = task.build_model(spec)
    codes = list(examples.meta["codes"])
    mean, std = predict_next(model, examples)
    median, low, high = predict_interval(model, examples)
    hb, crp = codes.index("hemoglobin"), codes.index("crp")
    assert mean[0, hb] == pytest.approx(8.7, rel=1e-5)
    assert median[0, crp] == pytest.approx(75.0, rel=1e-4)
    assert low[0, crp] < 75.0 < high[0, crp]
    assert mean[0, crp] > median[0, crp]  # log-normal mean lies above the median
    assert np.all(std > 0)


def test_lab_buffers_in_state_dict(spec: FeatureSpec) -> None:
    model = get_task("lab-forecast").build_model(spec)
    state = model.state_dict()
    codes = spec.task("lab-forecast")["codes"]
    scaling = LabScaling.from_spec(spec, codes)
    assert {"center", "scale", "log1p"} <= set(state)
    np.testing.assert_allclose(state["center"].numpy(), scaling.center, rtol=1e-6)


def test_lab_model_beats_locf_on_trend(spec: FeatureSpec) -> None:
    """On a steady linear decline the trained model beats carrying the last value forward."""
    rng = np.random.default_rng(0)
    records = []
    for p in range(24):
        start = rng.uniform(9, 14)
        for day in range(0, 16):
            records.append(
                {
                    "patient_id": f"t{p:02d}",
                    "time": INFUSION + pd.Timedelta(days=day),
                    "precision": "day",
                    "day": float(day),
                    "code": "hemoglobin",
                    "value": start - 0.4 * day + rng.normal(0, 0.05),
                    "unit": "g/dL",
                    "censored": "",
                    "out_of_range": False,
                    "source": "test",
                }
            )
    timeline = pd.DataFrame.from_records(records)

    task = get_task("lab-forecast")
    examples = task.build_examples(spec, pd.DataFrame(), timeline, pd.DataFrame(), {})
    train, test = split_patients(examples.patient_ids, 0.25, seed=0)

    torch.manual_seed(0)
    model = task.build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        task.loss(model, examples.subset(train).tensors).backward()
        optimizer.step()

    ours = task.evaluate(model, examples.subset(test))
    base = task.baseline(examples.subset(train), examples.subset(test))
    assert ours["mae"] < base["mae"]
    assert 0.0 <= ours["coverage-90"] <= 1.0


# ---------------------------------------------------------------------------
# crs-risk
# ---------------------------------------------------------------------------


def test_crs_labels_and_exclusion(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    examples = build(spec, tables, "crs-risk")
    patients = tables["patients"]
    assert "p15" not in examples.patient_ids  # no infusion time
    assert len(examples) == 15
    expected = (patients["crs_grade"].fillna(0) >= 2).astype(float)
    for i, pid in enumerate(examples.patient_ids):
        assert examples["label"][i].item() == expected[pid]
    n_features = 2 * len(spec.task("crs-risk")["codes"]) + 1
    assert examples["features"].shape == (15, n_features)


def test_crs_grade_from_events(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    patients = tables["patients"].copy()
    patients.loc["p00", "crs_grade"] = np.nan
    events = pd.concat(
        [
            tables["events"],
            pd.DataFrame(
                [
                    {
                        "patient_id": "p00",
                        "time": INFUSION,
                        "day": 2.0,
                        "kind": "crs",
                        "code": "crs",
                        "grade": 3.0,
                        "grading": "ASTCT",
                        "source": "test",
                    }
                ]
            ),
        ],
        ignore_index=True,
    )
    examples = get_task("crs-risk").build_examples(spec, patients, tables["timeline"], events, {})
    assert examples["label"][examples.patient_ids.index("p00")].item() == 1.0


def test_crs_window_features(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    """Early-window max CRP matches an independent pandas computation."""
    examples = build(spec, tables, "crs-risk")
    j = examples.meta["features"].index("crp:early-max")
    timeline = tables["timeline"]
    crp = timeline[(timeline["code"] == "crp") & timeline["day"].between(0.0, 3.0)]
    expected = crp.groupby("patient_id")["value"].max()
    for i, pid in enumerate(examples.patient_ids):
        assert examples["mask"][i, j].item() == 1.0
        assert examples["original"][i, j].item() == pytest.approx(expected[pid], rel=1e-5)


def test_crs_baseline_reports_easix(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    examples = build(spec, tables, "crs-risk")
    train, test = split_patients(examples.patient_ids, 0.4, seed=2)
    base = get_task("crs-risk").baseline(examples.subset(train), examples.subset(test))
    for key in ("log-loss", "brier", "auroc", "ece", "easix-log-loss", "easix-brier"):
        assert key in base
    assert 0.0 <= base["brier"] <= 1.0
    assert 0.0 <= base["easix-brier"] <= 1.0


# ---------------------------------------------------------------------------
# cell-state
# ---------------------------------------------------------------------------


def test_cell_shapes_and_labels(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    examples = build(spec, tables, "cell-state")
    n_genes = len(spec.genes)
    assert examples["x"].shape == (16, 24, n_genes)
    assert examples["labels"].shape == (16, 24)
    assert examples["labels"].dtype == torch.long
    labels = examples["labels"]
    assert labels.min() == -1
    assert labels.max() < len(spec.task("cell-state")["states"])
    # Padding slots have no label and no expression.
    padding = examples["cell_mask"] == 0
    assert torch.all(labels[padding] == -1)
    assert torch.all(examples["x"][padding] == 0)
    # Genes that the second sample did not measure are zero there.
    second = examples["sample"] % 2 == 1
    assert torch.all(examples["x"][second][:, -3:] == 0)


def test_cell_sampling_seeded(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    first = build(spec, tables, "cell-state", seed=5)
    again = build(spec, tables, "cell-state", seed=5)
    other = build(spec, tables, "cell-state", seed=6)
    assert torch.equal(first["x"], again["x"])
    assert not torch.equal(first["x"], other["x"])


def test_cell_expression_normalised(spec: FeatureSpec) -> None:
    counts = np.zeros((1, len(spec.genes)))
    counts[0, 0] = 5
    sample = Sample(
        patient_id="q",
        counts=sparse.csr_matrix(counts),
        gene_mask=np.ones(len(spec.genes), dtype=bool),
        labels=np.array([spec.task("cell-state")["states"][0]], dtype=object),
        total_counts=np.array([50.0], dtype=np.float32),
    )
    examples = get_task("cell-state").build_examples(
        spec, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {"q-1": sample}
    )
    assert examples["x"][0, 0, 0].item() == pytest.approx(math.log1p(5 / 50 * 1e4), rel=1e-6)
    assert examples["cell_mask"].sum().item() == 1.0


def test_cell_wrong_gene_count(spec: FeatureSpec) -> None:
    sample = Sample(
        patient_id="q",
        counts=sparse.csr_matrix(np.ones((2, 3))),
        gene_mask=np.ones(3, dtype=bool),
        labels=np.array(["", ""], dtype=object),
        total_counts=np.ones(2, dtype=np.float32),
    )
    with pytest.raises(ValueError, match="align the sample"):
        get_task("cell-state").build_examples(
            spec, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {"bad": sample}
        )


def test_cell_composition(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    task = get_task("cell-state")
    examples = build(spec, tables, "cell-state")
    model = task.build_model(spec)
    composition = state_composition(model, examples)
    assert set(composition.index) <= set(tables["cells"])
    np.testing.assert_allclose(composition.sum(axis=1).to_numpy(), 1.0)
    sample = tables["cells"]["p00-s0"]
    probabilities = predict_sample_states(model, sample, chunk_size=4)
    assert probabilities.shape == (sample.counts.shape[0], len(spec.task("cell-state")["states"]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def test_auroc_matches_pair_count() -> None:
    rng = np.random.default_rng(1)
    label = rng.integers(0, 2, 40)
    score = np.round(rng.random(40), 1)  # ties on purpose
    pos, neg = score[label == 1], score[label == 0]
    wins = 0.0
    for p in pos:
        wins += float(np.sum(p > neg)) + 0.5 * float(np.sum(p == neg))
    assert metrics.auroc(label, score) == pytest.approx(wins / (pos.size * neg.size))


def test_auroc_one_class_nan() -> None:
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.9]))


def test_ece_and_log_loss() -> None:
    label = np.array([0, 1, 0, 1])
    assert metrics.expected_calibration_error(label, np.full(4, 0.5)) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(label, np.array([1.0, 0.0, 1.0, 0.0])) == 1.0
    assert metrics.log_loss(label, np.full(4, 0.5)) == pytest.approx(math.log(2))


def test_macro_f1_values() -> None:
    assert metrics.macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3
    assert metrics.macro_f1([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx((0.8 + 2 / 3) / 2)


def test_coverage_of_gaussian() -> None:
    rng = np.random.default_rng(3)
    target = rng.normal(size=20000)
    coverage = metrics.interval_coverage(target, np.zeros_like(target), np.ones_like(target))
    assert coverage == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_dp_sgd_poisson_steps(spec: FeatureSpec, tables: dict[str, Any], name: str) -> None:
    """DP-SGD with Poisson sampling runs through empty and non-empty batches of patients."""
    from opacus import PrivacyEngine

    task = get_task(name)
    examples = build(spec, tables, name)
    torch.manual_seed(0)
    model = task.build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(examples.dataset(), batch_size=2)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    sizes = []
    for _ in range(4):
        for batch in loader:
            optimizer.zero_grad()
            loss = task.loss(model, tuple(batch))
            loss.backward()
            optimizer.step()
            sizes.append(batch[0].shape[0])
            assert torch.isfinite(loss)
    assert 0 in sizes
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.get_epsilon(delta=1e-5) > 0


def test_missing_column_error(spec: FeatureSpec, tables: dict[str, Any]) -> None:
    timeline = tables["timeline"].drop(columns=["day"])
    with pytest.raises(ValueError, match="timeline table lacks the column 'day'"):
        get_task("lab-forecast").build_examples(
            spec, tables["patients"], timeline, tables["events"], {}
        )
    with pytest.raises(ValueError, match="patients table lacks the column 'infusion_time'"):
        get_task("crs-risk").build_examples(
            spec, pd.DataFrame(), tables["timeline"], tables["events"], {}
        )
