"""The discussion section of docs/results.md, with the figures of the run, for bench/results.py."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

from opacus.accountants import RDPAccountant
from results_eval import Metrics
from results_run import TaskResult

from client.training import steps_per_epoch
from server.run_config import RunConfig

# Headline metric per task and whether lower is better.
HEADLINE = {
    "lab-forecast": ("mae", True),
    "crs-risk": ("log-loss", True),
    "cell-state": ("accuracy", False),
}
# A second metric in the comparison, and whether lower is better, where the headline hides a
# difference.
SECONDARY = {"crs-risk": ("auroc", False)}
# Below this difference in the headline metric, two rows count as equal in the text.
SAME = 0.01
# Largest step count searched by `steps_within_cap`.
MAX_STEPS = 4096


def steps_per_round(config: RunConfig) -> int:
    """Return the DP-SGD steps one site takes per round."""
    return config.local_epochs * steps_per_epoch(config.sample_rate)


def noise_to_signal(config: RunConfig, parameters: int, patients: int) -> float:
    """Return the ratio of the noise's L2 norm to the largest possible clipped sum in one step.

    A step adds Gaussian noise with std noise_multiplier x max_grad_norm to each of the d
    coordinates, so its norm is about noise_multiplier x max_grad_norm x sqrt(d). The clipped
    gradients of the expected sample_rate x n patients sum to at most that many times
    max_grad_norm, and less when the patients' gradients point different ways.
    """
    if patients < 1:
        return math.inf
    return config.noise_multiplier * math.sqrt(parameters) / (config.sample_rate * patients)


def steps_within_cap(config: RunConfig, delta: float, cap: float) -> int:
    """Return the most DP-SGD steps whose ε (Opacus RDP, at `delta`) stays within `cap`."""

    def epsilon(steps: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(config.noise_multiplier, config.sample_rate, steps)]
        # Opacus warns when the optimal RDP order is at the end of its range; ε is still an
        # upper bound then.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(delta=delta))

    if epsilon(1) > cap:
        return 0
    low, high = 1, MAX_STEPS
    if epsilon(high) <= cap:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon(middle) <= cap:
            low = middle
        else:
            high = middle
    return low


def _span(values: Sequence[float], spec: str = "g") -> str:
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low} to {high}"


def _value(metrics: Metrics, name: str) -> float:
    return float(metrics.get(name, math.nan))


def _compare(result: TaskResult) -> str:
    name, lower_is_better = HEADLINE[result.task]
    federated = _value(result.federated.pooled, name)
    centralised = _value(result.centralised.pooled, name)
    matched = _value(result.centralised_matched.pooled, name)
    baseline = _value(result.baseline_pooled, name)
    alone = [_value(a.pooled, name) for a in result.alone.values()]
    alone = [v for v in alone if math.isfinite(v)]

    def better(a: float, b: float) -> bool:
        return a < b - SAME if lower_is_better else a > b + SAME

    text = (
        f"- **{result.task}** ({name}, pooled held-out): federated with DP {federated:.3f}, "
        f"centralised without DP {centralised:.3f}, centralised without DP on the federated "
        f"schedule {matched:.3f}, baseline {baseline:.3f}"
    )
    if alone:
        best = min(alone) if lower_is_better else max(alone)
        text += f", best single site with DP {best:.3f}"
    text += ". "

    # Against the baseline
    if better(federated, baseline):
        text += "The federated DP model beats the baseline by more than 0.01"
    else:
        text += "The federated DP model does not beat the baseline by more than 0.01"
    if better(centralised, baseline):
        text += ", while the centralised model without DP does. "
    else:
        text += ", and neither does the centralised model without DP. "

    # Schedule or noise
    if abs(federated - matched) <= SAME:
        text += (
            "Without DP, the same short schedule gives the same figure within 0.01, so in "
            "this run the few steps limit the federated model more than the noise does."
        )
    elif better(matched, federated):
        text += (
            f"Without DP, the same short schedule does better by {abs(federated - matched):.3f}: "
            "that is the cost of the DP noise and of federation."
        )
    else:
        text += "The federated DP model does better than the same schedule without DP."

    if result.task in SECONDARY:
        second, second_lower = SECONDARY[result.task]
        federated_second = _value(result.federated.pooled, second)
        matched_second = _value(result.centralised_matched.pooled, second)
        text += (
            f" On {second}: federated with DP {federated_second:.3f}, the same schedule without "
            f"DP {matched_second:.3f}, baseline {_value(result.baseline_pooled, second):.3f}."
        )
        gap = (
            federated_second - matched_second if second_lower else matched_second - federated_second
        )
        if gap > SAME:
            text += f" On this metric DP noise and federation cost {gap:.3f}."
        text += (
            f" With {_value(result.federated.pooled, 'n-positive'):.0f} positive held-out "
            "patients it moves a lot from run to run."
        )
    return text


def _ratio_table(results: list[TaskResult]) -> list[str]:
    lines = [
        "| task | parameters d | training patients per site | noise / signal per site, "
        "local DP | noise / signal, central DP over all sites | DP-SGD steps within the ε cap "
        "| largest ε reached (δ) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        config = result.run_config
        counts = [len(site.train) for site in result.sites]
        ratios = [noise_to_signal(config, result.parameters, n) for n in counts]
        central = noise_to_signal(config, result.parameters, sum(counts))
        allowed = [steps_within_cap(config, s.delta, s.epsilon_cap) for s in result.sites]
        final = result.manifests[-1]["sites"]
        spent = [e for e in final if e.get("epsilon-total") is not None]
        top = max(spent, key=lambda e: e["epsilon-total"]) if spent else None
        epsilon = f"{top['epsilon-total']:.2f} ({top['delta']:.2g})" if top else "n/a"
        lines.append(
            f"| {result.task} | {result.parameters} | {_span(counts)} | "
            f"{_span(ratios, '.1f')} | {central:.2f} | "
            f"{_span(allowed)} | {epsilon} |"
        )
    return lines


def _noisy_tasks(results: list[TaskResult], threshold: float) -> list[str]:
    noisy = []
    for result in results:
        smallest = min(
            noise_to_signal(result.run_config, result.parameters, len(site.train))
            for site in result.sites
        )
        if smallest > threshold:
            noisy.append(result.task)
    return noisy


def _schedule_limited(results: list[TaskResult]) -> list[str]:
    # Tasks where the same schedule without DP scores within SAME of the federated DP model.
    limited = []
    for result in results:
        name, _ = HEADLINE[result.task]
        federated = _value(result.federated.pooled, name)
        matched = _value(result.centralised_matched.pooled, name)
        if abs(federated - matched) <= SAME:
            limited.append(result.task)
    return limited


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _noise_for_steps(results: list[TaskResult]) -> str:
    # How many steps the cap allows at 1, 2 and 4 times the run's noise, for the smallest site.
    result = results[0]
    site = min(result.sites, key=lambda s: len(s.train))
    base = result.run_config
    parts = []
    for factor in (1, 2, 4):
        config = replace(base, noise_multiplier=factor * base.noise_multiplier)
        allowed = steps_within_cap(config, site.delta, site.epsilon_cap)
        ratio = math.sqrt(allowed) / config.noise_multiplier if allowed else 0.0
        parts.append((config.noise_multiplier, allowed, ratio))
    noises = ", ".join(f"{noise:g}" for noise, _, _ in parts)
    steps = ", ".join(str(allowed) for _, allowed, _ in parts)
    ratios = ", ".join(f"{ratio:.1f}" for _, _, ratio in parts)
    return (
        f"A larger noise_multiplier buys more steps for the same ε, but each step is noisier. "
        f"For {result.task} {site.name} ({len(site.train)} training patients, δ "
        f"{site.delta:.2g}, ε cap {site.epsilon_cap:g}), noise_multipliers of {noises} allow "
        f"{steps} steps. Over T steps a consistent gradient adds up as T and independent noise "
        f"as noise_multiplier × √T, so their ratio √T / noise_multiplier is {ratios}: trading "
        "noise for steps gains little."
    )


def _spent_range(results: list[TaskResult]) -> tuple[float, float]:
    spent = [
        float(entry["epsilon-total"])
        for result in results
        for entry in result.manifests[-1]["sites"]
        if entry.get("epsilon-total") is not None
    ]
    return (min(spent), max(spent)) if spent else (math.nan, math.nan)


def _why(results: list[TaskResult]) -> list[str]:
    config = results[0].run_config
    noisy = _noisy_tasks(results, threshold=2.0)
    limited = _schedule_limited(results)
    low, high = _spent_range(results)
    total_steps = steps_per_round(config) * config.num_server_rounds

    # Few steps
    lines = [
        "### Where DP costs too much",
        "",
        "Two limits come from the privacy budget. The ε cap bounds the number of noisy "
        "steps a site may take in all, and each of those steps carries noise that is large "
        "next to what tens of patients contribute.",
        "",
        f"**Few steps.** Each site took {total_steps} DP-SGD steps in "
        f"{config.num_server_rounds} rounds, and the cap allows only the number of steps in "
        "the table below, whatever the number of rounds.",
    ]
    if limited:
        lines[-1] += (
            f" For {_join(limited)}, the same number of steps without DP scores within "
            f"{SAME:g} of the federated DP model. There the short schedule is what holds the "
            "model back."
        )
    if "lab-forecast" in limited:
        lines[-1] += (
            " The lab-forecast network starts as last value carried forward (its head is zero "
            "at initialisation), so a model that barely moves scores like LOCF."
        )

    # Noise per step
    lines += [
        "",
        f"**Noise per step.** In each step a site adds Gaussian noise with std "
        f"noise_multiplier × max_grad_norm = {config.noise_multiplier * config.max_grad_norm:g} "
        "to each of the d model coordinates, so the noise vector's norm is about that times "
        "√d. The signal is the sum of the clipped gradients of about sample_rate × n = "
        f"{config.sample_rate:g} × n patients, at most max_grad_norm each. The table gives the "
        "ratio of the two norms, noise_multiplier × √d / (sample_rate × n). Above 1, one "
        "step's noise is larger than the largest update the patients could agree on. The "
        "central-DP column is the same ratio when the noise is added once to the sum over all "
        "sites' patients.",
        "",
        *_ratio_table(results),
        "",
    ]
    if noisy:
        lines += [
            f"For {_join(noisy)}, one step's noise is more than twice the largest possible "
            "signal at every site. FedAvg averages the sites' independent noise, which shrinks "
            "it by about √(number of sites), not enough to close that gap.",
            "",
        ]

    # Noise traded for steps, the guarantee, the tiny cohort
    lines += [
        _noise_for_steps(results),
        "",
        f"**Weak guarantee for the price.** δ is 1 / (10 × n) by default, about 0.005 for a "
        f"site of 20 patients. The ε reached after {config.num_server_rounds} rounds, "
        f"{low:.1f} to {high:.1f}, is far from the ε ≤ 1 usually called strong, so these sites "
        "pay a large accuracy price for a modest privacy bound.",
        "",
    ]
    if any(result.task == "cell-state" for result in results):
        lines += [
            "**cell-state.** The CARPALL cohort has 9 patients in all: 2 training patients and "
            "1 held-out patient per site. Its δ is then 1 / 20, and one held-out patient is "
            "below every site's min cohort. Its figures show that the pipeline runs end to end "
            "on real single-cell data, and say little about the model.",
            "",
        ]
    return lines


def _fixes(results: list[TaskResult]) -> list[str]:
    config = results[0].run_config
    lab = next((r for r in results if r.task == "lab-forecast"), None)
    more_patients = (
        "- **More patients per site.** The ratio falls as 1 / n. At a fixed sample_rate the "
        "ε per step does not grow with n, while the default δ = 1 / (10 n) tightens."
    )
    if lab is not None:
        more_patients += (
            f" For lab-forecast, 500 training patients per site would give a ratio of "
            f"{noise_to_signal(config, lab.parameters, 500):.2f}."
        )
    return [
        "### What would fix it",
        "",
        more_patients,
        "- **Secure aggregation with central DP.** If the sites' updates were summed under "
        "secure aggregation and the noise drawn once at the server, it would be divided among "
        "all the consortium's patients instead of each site's: the central-DP column. "
        "fedtwin has secure aggregation (SecAgg+, run config `secure-aggregation`), but each "
        "site still adds its own noise: central DP on the secure sum is not built.",
        "- **Fewer trainable parameters, from public pretraining.** The noise grows with √d. "
        "Pretraining on public or synthetic data (for lab-forecast, the synthetic demo cohort "
        "or a public EHR extract) and then training only a small head with DP at the sites "
        "cuts d by orders of magnitude. crs-risk's 577-parameter network shows how much "
        "smaller the ratio then is.",
        "- **Fewer rounds, larger sample_rate.** ε grows with the number of DP-SGD steps, so "
        "fewer rounds of more useful steps spend less of the cap. A larger sample_rate puts "
        "more patients behind each noisy step (a lower ratio) at the cost of weaker privacy "
        "amplification by subsampling. With n in the tens, the sample_rate of "
        f"{config.sample_rate:g} is already high, so n is the real lever.",
        "- **A larger ε cap or a smaller noise_multiplier** trades privacy for accuracy. It "
        "is a policy decision for each site, not a fix.",
        "",
    ]


def discussion(results: list[TaskResult]) -> list[str]:
    """Return the discussion section's lines."""
    return [
        "## Discussion",
        "",
        "### What the figures show",
        "",
        *(_compare(result) for result in results),
        "",
        *_why(results),
        *_fixes(results),
    ]
