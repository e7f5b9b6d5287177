"""Benchmark one DP-SGD optimizer step (Opacus) against one plain SGD step, per twin model.

Run from the repository root:

    .venv/bin/python bench/bench_dp_step.py [--cohort DIR] [--batch-sizes 8,64] [--trials 7]

DIR is a folder written by `fedtwin-coordinator demo-cohort --out DIR` (or `demo`); without it
the script generates a one-site synthetic cohort in a temporary folder. The examples of each task
are built from the first site's dataset, and its rows are repeated to fill larger batches.

A step is forward, backward and `optimizer.step()` on a fixed batch. The DP step runs through
`PrivacyEngine.make_private` with the given `grad_sample_mode`, so it includes per-sample
gradients, per-sample clipping and Gaussian noise. Each trial times `--repeats` plain steps and
`--repeats` DP steps back to back, and the ratio of the two sums is the trial's ratio; the JSON
and the table report the median and the range over trials.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.dataset import load_site_dataset
from client.site_config import load_site_config
from models.examples import TaskExamples
from models.spec import FeatureSpec, load_spec
from models.tasks import TwinTask, get_task

TASK_NAMES = ("lab-forecast", "crs-risk", "cell-state")
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch")
# Not an Opacus mode: a DP-SGD step written here with torch.func, to show what a fused step costs.
FUSED_MODE = "fused-vmap"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "dp_step.json"

# torch warns on every backward pass through Opacus' hooks when the inputs need no gradient.
_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


def machine_info() -> dict[str, Any]:
    """Return the cores, CPU model, memory and library versions of this machine."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import flwr
    import opacus

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "flwr": flwr.__version__,
        "load_average": list(os.getloadavg()),
    }


def load_examples(cohort: Path) -> tuple[FeatureSpec, dict[str, TaskExamples]]:
    """Build every task's examples from the first site folder of a demo cohort."""
    sites = sorted(p for p in (cohort / "consortium").iterdir() if (p / "site.toml").is_file())
    if not sites:
        msg = f"{cohort / 'consortium'} has no site folders; write one with `demo-cohort --out`."
        raise SystemExit(msg)
    config = load_site_config(sites[0])
    spec = load_spec(config.spec)
    data = load_site_dataset(config, spec)

    examples = {}
    for name in TASK_NAMES:
        examples[name] = get_task(name).build_examples(
            spec, data.patients, data.timeline, data.events, data.cells
        )
    return spec, examples


def fixed_batch(examples: TaskExamples, batch_size: int) -> tuple[Tensor, ...]:
    """Return a batch of `batch_size` rows, repeating the site's patients in order."""
    index = torch.arange(batch_size) % len(examples)
    return tuple(tensor.index_select(0, index) for tensor in examples.tensors)


def seeded_model(task: TwinTask, spec: FeatureSpec) -> nn.Module:
    """Build the task's model with a fixed seed, so plain and DP start from the same weights."""
    torch.manual_seed(0)
    return task.build_model(spec)


def step_function(
    model: nn.Module, optimizer: torch.optim.Optimizer, task: TwinTask, batch: tuple[Tensor, ...]
) -> Callable[[], tuple[float, float]]:
    """Return a function that runs one optimizer step and returns (backward s, step s)."""

    def step() -> tuple[float, float]:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        return middle - started, time.perf_counter() - middle

    return step


def make_dp_step(
    task: TwinTask,
    spec: FeatureSpec,
    batch: tuple[Tensor, ...],
    mode: str,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float = 0.05,
    model: nn.Module | None = None,
) -> Callable[[], tuple[float, float]]:
    """Wrap a model (by default a fresh one) with Opacus in `mode`; return its step function."""
    if model is None:
        model = seeded_model(task, spec)
    batch_size = int(batch[0].shape[0])
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    module, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=learning_rate),
        data_loader=DataLoader(TensorDataset(*batch), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction="mean",
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    # The task loss calls the model it is given, so pass the wrapper: the "ew" mode computes
    # per-sample gradients only inside the wrapper's forward.
    return step_function(module, optimizer, task, batch)


def make_fused_step(
    task: TwinTask,
    spec: FeatureSpec,
    batch: tuple[Tensor, ...],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float = 0.05,
    model: nn.Module | None = None,
) -> Callable[[], tuple[float, float]]:
    """Return a DP-SGD step that computes all per-sample gradients in one `vmap` call.

    The per-sample gradients of every parameter come from `torch.func.vmap(grad(loss))` over
    the batch. They are flattened into one (batch, parameters) matrix, so clipping, summing and
    the Gaussian noise are a few tensor operations instead of a loop over parameters. The
    update is (sum of clipped gradients + noise) / batch size, as Opacus' DPOptimizer computes it
    for a mean loss. It has no accountant and no Poisson sampling; it is a cost estimate.
    """
    from torch.func import functional_call, grad, vmap

    if model is None:
        model = seeded_model(task, spec)
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    batch_size = int(batch[0].shape[0])

    def sample_loss(params: dict[str, Tensor], sample: tuple[Tensor, ...]) -> Tensor:
        def call(*inputs: Tensor) -> Any:
            return functional_call(model, (params, buffers), inputs)

        # The task loss calls its model argument; a function with the same signature works.
        return task.loss(call, tuple(x.unsqueeze(0) for x in sample))  # type: ignore[arg-type]

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0))

    def step() -> tuple[float, float]:
        started = time.perf_counter()
        detached = {name: p.detach() for name, p in parameters.items()}
        grads = per_sample_grads(detached, batch)
        flat = torch.cat([grads[name].reshape(batch_size, -1) for name in parameters], dim=1)
        middle = time.perf_counter()

        # Clip each row to max_grad_norm, sum, add noise, average, step
        factor = (max_grad_norm / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
        summed = factor @ flat
        noise = torch.randn_like(summed) * (noise_multiplier * max_grad_norm)
        update = (summed + noise) / batch_size
        with torch.no_grad():
            offset = 0
            for p in parameters.values():
                size = p.numel()
                p.add_(update[offset : offset + size].view_as(p), alpha=-learning_rate)
                offset += size
        return middle - started, time.perf_counter() - middle

    return step


def make_private_step(
    task: TwinTask,
    spec: FeatureSpec,
    batch: tuple[Tensor, ...],
    mode: str,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float = 0.05,
    model: nn.Module | None = None,
) -> Callable[[], tuple[float, float]]:
    """Return the DP step of `mode`: an Opacus grad_sample_mode or the fused prototype."""
    if mode == FUSED_MODE:
        return make_fused_step(
            task,
            spec,
            batch,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            learning_rate=learning_rate,
            model=model,
        )
    return make_dp_step(
        task,
        spec,
        batch,
        mode,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        model=model,
    )


def gradient_gap(task: TwinTask, spec: FeatureSpec, batch: tuple[Tensor, ...], mode: str) -> float:
    """Return how far one noiseless, unclipped DP step lands from the plain step, relatively.

    With noise_multiplier 0 and a clipping bound far above every per-sample norm, the DP
    update is the mean of the per-sample gradients, which equals the plain gradient when
    the mode computes per-sample gradients correctly. The result is
    ||update_dp - update_plain|| / ||update_plain||.
    """
    plain_model = seeded_model(task, spec)
    start = [p.detach().clone() for p in plain_model.parameters()]
    step_function(plain_model, torch.optim.SGD(plain_model.parameters(), lr=1.0), task, batch)()
    plain_update = torch.cat(
        [(p.detach() - s).flatten() for p, s in zip(plain_model.parameters(), start, strict=True)]
    )

    dp_model = seeded_model(task, spec)
    make_private_step(
        task,
        spec,
        batch,
        mode,
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        learning_rate=1.0,
        model=dp_model,
    )()
    dp_update = torch.cat(
        [(p.detach() - s).flatten() for p, s in zip(dp_model.parameters(), start, strict=True)]
    )
    return float((dp_update - plain_update).norm() / plain_update.norm().clamp(min=1e-12))


def time_steps(step: Callable[[], tuple[float, float]], repeats: int) -> tuple[float, float, float]:
    """Run `repeats` steps; return the total, backward and optimizer-step seconds."""
    backward = 0.0
    update = 0.0
    started = time.perf_counter()
    for _ in range(repeats):
        b, u = step()
        backward += b
        update += u
    return time.perf_counter() - started, backward, update


def compare(
    plain: Callable[[], tuple[float, float]],
    private: Callable[[], tuple[float, float]],
    *,
    trials: int,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Time plain and DP steps in alternating order, `trials` times; return the figures."""
    for _ in range(warmup):
        plain()
        private()

    ratios = []
    plain_ms = []
    dp_ms = []
    dp_backward_ms = []
    dp_update_ms = []
    plain_backward_ms = []
    for trial in range(trials):
        order = [("plain", plain), ("dp", private)]
        if trial % 2:
            order.reverse()
        totals: dict[str, tuple[float, float, float]] = {}
        for name, step in order:
            totals[name] = time_steps(step, repeats)
        ratios.append(totals["dp"][0] / totals["plain"][0])
        plain_ms.append(1e3 * totals["plain"][0] / repeats)
        plain_backward_ms.append(1e3 * totals["plain"][1] / repeats)
        dp_ms.append(1e3 * totals["dp"][0] / repeats)
        dp_backward_ms.append(1e3 * totals["dp"][1] / repeats)
        dp_update_ms.append(1e3 * totals["dp"][2] / repeats)

    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "plain_ms_median": statistics.median(plain_ms),
        "plain_forward_backward_ms_median": statistics.median(plain_backward_ms),
        "dp_ms_median": statistics.median(dp_ms),
        "dp_forward_backward_ms_median": statistics.median(dp_backward_ms),
        "dp_optimizer_step_ms_median": statistics.median(dp_update_ms),
    }


def run(args: argparse.Namespace, cohort: Path) -> dict[str, Any]:
    """Run every (task, batch size, mode) comparison; return the JSON document."""
    torch.set_num_threads(args.threads)
    spec, examples = load_examples(cohort)
    results = []
    for name in args.tasks:
        task = get_task(name)
        for batch_size in args.batch_sizes:
            batch = fixed_batch(examples[name], batch_size)
            plain_model = seeded_model(task, spec)
            plain = step_function(
                plain_model,
                torch.optim.SGD(plain_model.parameters(), lr=0.05),
                task,
                batch,
            )
            for mode in args.modes:
                entry: dict[str, Any] = {"task": name, "batch_size": batch_size, "mode": mode}
                entry["parameters"] = sum(p.numel() for p in plain_model.parameters())
                entry["input_shapes"] = [list(t.shape) for t in batch]
                try:
                    private = make_private_step(
                        task,
                        spec,
                        batch,
                        mode,
                        noise_multiplier=args.noise_multiplier,
                        max_grad_norm=args.max_grad_norm,
                    )
                    entry["gradient_gap"] = gradient_gap(task, spec, batch, mode)
                    entry.update(
                        compare(
                            plain,
                            private,
                            trials=args.trials,
                            repeats=args.repeats,
                            warmup=args.warmup,
                        )
                    )
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                results.append(entry)
                print_entry(entry)

    return {
        "benchmark": "dp_step",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "threads": args.threads,
            "trials": args.trials,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "noise_multiplier": args.noise_multiplier,
            "max_grad_norm": args.max_grad_norm,
            "goal": "DP step <= 1.5x plain step",
        },
        "results": results,
    }


def print_entry(entry: dict[str, Any]) -> None:
    """Print one result as a Markdown table row."""
    head = f"| {entry['task']} | {entry['batch_size']} | {entry['mode']} |"
    if "error" in entry:
        print(f"{head} failed: {entry['error']} ||||||", flush=True)
        return
    print(
        f"{head} {entry['plain_ms_median']:.2f} | {entry['dp_ms_median']:.2f} "
        f"| {entry['dp_optimizer_step_ms_median']:.2f} "
        f"| {entry['ratio_median']:.2f} | {entry['ratio_min']:.2f}-{entry['ratio_max']:.2f} "
        f"| {entry['gradient_gap']:.1e} |",
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cohort", type=Path, help="demo cohort folder (default: generate one)")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated tasks")
    parser.add_argument(
        "--batch-sizes", default="8,64", help="comma-separated batch sizes, in patients"
    )
    parser.add_argument(
        "--modes",
        default=",".join([*GRAD_SAMPLE_MODES, FUSED_MODE]),
        help=f"Opacus grad_sample_mode values, and {FUSED_MODE} for the torch.func prototype",
    )
    parser.add_argument("--trials", type=int, default=7, help="timed trials per comparison")
    parser.add_argument("--repeats", type=int, default=20, help="steps per trial and variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sites use 1)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="DP-SGD noise")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-patient clip")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    print(
        "| task | batch | grad_sample_mode | plain ms | DP ms | DP optimizer.step ms "
        "| DP / plain median | range | gradient gap |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    if args.cohort is not None:
        document = run(args, args.cohort)
    else:
        from server.demo_cohort import generate_demo_cohort

        with tempfile.TemporaryDirectory() as tmp:
            generate_demo_cohort(Path(tmp), num_sites=1, patients_per_site=24, seed=0)
            document = run(args, Path(tmp))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
