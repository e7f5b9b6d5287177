"""One site's work for one task: local DP training and evaluation, without Flower messages."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from client.dataset import SiteDataset, load_site_dataset
from client.resend import Release, ReleaseStore, weights_sha256
from client.site_config import SiteConfig
from client.training import train_dp
from models.examples import TaskExamples
from models.spec import FeatureSpec, load_spec
from models.tasks import get_task, split_patients
from models.wire import Metric, Reply, Status
from privacy.accountant import SECURE_RNG, AccountantStore, epsilon_of_history, site_histories
from privacy.budget import BudgetDecision, check_policy, noise_for_target, policy_delta
from privacy.ledger import LedgerRecord, SiteLedger, canonical_json
from privacy.policy import round_patients

__all__ = ["RoundSettings", "SiteOutcome", "SiteTask"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSettings:
    """The training settings the coordinator sends for one round."""

    run_name: str
    server_round: int
    local_epochs: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    target_epsilon_per_round: float
    proximal_mu: float
    seed: int


@dataclass
class SiteOutcome:
    """A site's reply: a status, a one-line message, metrics and, after training, weights."""

    status: str
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None
    accountant: str = ""
    ledger_entry: dict[str, Any] | None = None

    def reply_fields(self, site: str, spec_sha256: str) -> dict[str, Any]:
        """Return the reply's status and privacy fields, keyed by `models.wire.Reply` names."""
        fields: dict[str, Any] = {
            Reply.STATUS: self.status,
            Reply.SITE: site,
            Reply.MESSAGE: self.message,
            Reply.SPEC_SHA256: spec_sha256,
            Reply.ACCOUNTANT: self.accountant,
            Reply.SECURE_RNG: SECURE_RNG,
            Reply.PRIVACY_UNIT: "patient",
        }
        if self.ledger_entry is not None:
            # The signed entry goes as canonical JSON text, so the coordinator stores exactly
            # the content whose Ed25519 signature the steward verifies.
            fields[Reply.LEDGER_ENTRY] = canonical_json(self.ledger_entry).decode("ascii")
        return fields


class SiteTask:
    """A site's dataset and privacy state for one task, built once and reused across rounds."""

    def __init__(self, config: SiteConfig, task_name: str) -> None:
        self.config = config
        self.task = get_task(task_name)
        # One thread per site process: simulated sites share the CPU cores.
        torch.set_num_threads(1)
        self.spec: FeatureSpec = load_spec(config.spec)
        self._dataset: SiteDataset | None = None
        self._examples: TaskExamples | None = None
        self._split: tuple[list[int], list[int]] | None = None

    @property
    def site(self) -> str:
        """The site's name."""
        return self.config.name

    def dataset(self) -> SiteDataset:
        """Load (once) the validated site dataset."""
        if self._dataset is None:
            self._dataset = load_site_dataset(self.config, self.spec)
        return self._dataset

    def examples(self, seed: int) -> tuple[TaskExamples, list[int], list[int]]:
        """Build (once) the per-patient examples and the deterministic train/held-out split."""
        if self._examples is None or self._split is None:
            data = self.dataset()
            self._examples = self.task.build_examples(
                self.spec, data.patients, data.timeline, data.events, data.cells, seed=seed
            )
            self._split = split_patients(self._examples.patient_ids, seed=seed)
        return self._examples, self._split[0], self._split[1]

    def _model(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = self.task.build_model(self.spec)
        model.load_state_dict(state_dict)
        return model

    def train(self, state_dict: dict[str, torch.Tensor], settings: RoundSettings) -> SiteOutcome:
        """Train the global model on the site's training patients with DP-SGD, budget permitting.

        A request for a (run, round) that the site already trained from the same global weights
        gets the stored reply again, without training, accounting or a ledger entry. With other
        global weights the site trains anew and accounts for a new release.
        """
        releases = ReleaseStore(self.config.state_dir, self.task.name)
        global_sha256 = weights_sha256(state_dict)
        stored = releases.load(settings.run_name, settings.server_round)
        if stored is not None and stored.global_sha256 == global_sha256:
            logger.info(
                "Site %s resends its update for run %s round %d (same global weights); "
                "no new privacy spend.",
                self.site,
                settings.run_name,
                settings.server_round,
            )
            return _outcome_of(stored)
        if stored is not None:
            logger.warning(
                "Site %s: run %s round %d was requested again with other global weights "
                "(SHA-256 %s, first %s); training anew, which spends privacy budget again.",
                self.site,
                settings.run_name,
                settings.server_round,
                global_sha256[:12],
                stored.global_sha256[:12],
            )

        outcome = self._train(state_dict, settings)
        if outcome.status == Status.OK and outcome.state_dict is not None:
            self._store_release(releases, settings, global_sha256, outcome)
        return outcome

    def _store_release(
        self,
        releases: ReleaseStore,
        settings: RoundSettings,
        global_sha256: str,
        outcome: SiteOutcome,
    ) -> None:
        """Keep a trained round's reply for a repeated request; a failure only costs that."""
        assert outcome.state_dict is not None
        release = Release(
            run_name=settings.run_name,
            server_round=settings.server_round,
            task=self.task.name,
            global_sha256=global_sha256,
            status=outcome.status,
            message=outcome.message,
            metrics=dict(outcome.metrics),
            accountant=outcome.accountant,
            ledger_entry=outcome.ledger_entry,
            state_dict=outcome.state_dict,
        )
        try:
            releases.save(release)
        except OSError as err:
            # The update is trained and accounted, so it is still sent. A repeat of this round
            # would then be trained and accounted again.
            logger.warning(
                "Site %s could not store its update for run %s round %d (%s); a repeated "
                "request for this round will be trained anew.",
                self.site,
                settings.run_name,
                settings.server_round,
                err,
            )

    def _train(self, state_dict: dict[str, torch.Tensor], settings: RoundSettings) -> SiteOutcome:
        examples, train_idx, _ = self.examples(settings.seed)
        if not train_idx:
            return SiteOutcome(
                Status.NO_DATA,
                f"site {self.site} has no usable patients for task {self.task.name}; "
                "run `fedtwin-site check` on its data",
            )

        policy = self.config.privacy
        delta = policy_delta(policy, len(train_idx))
        steps = settings.local_epochs * max(1, round(1 / settings.sample_rate))
        store = AccountantStore(self.config.state_dir, self.task.name)
        ledger = SiteLedger(self.config.state_dir)
        # A damaged ledger stops the round before training, so no ε is spent without an entry.
        ledger.prepare()
        model = self._model(state_dict)

        # Noise: fixed by the run config, or chosen to reach a target epsilon for this round.
        noise = settings.noise_multiplier
        if settings.target_epsilon_per_round > 0:
            noise = noise_for_target(
                target_epsilon=settings.target_epsilon_per_round,
                delta=delta,
                sample_rate=settings.sample_rate,
                steps=steps,
                accountant=store.accountant,
            )

        # Policy and budget check before any data is touched by training.
        decision = check_policy(
            policy=policy,
            store=store,
            model=type(model).__name__,
            n_patients=len(train_idx),
            noise_multiplier=noise,
            sample_rate=settings.sample_rate,
            steps=steps,
        )
        if not decision.allowed:
            return self._refuse(ledger, store, model, settings, decision, noise, steps, train_idx)

        result = train_dp(
            model,
            examples.subset(train_idx).dataset(),
            self.task.loss,
            store=store,
            delta=delta,
            noise_multiplier=noise,
            max_grad_norm=settings.max_grad_norm,
            sample_rate=settings.sample_rate,
            epochs=settings.local_epochs,
            learning_rate=settings.learning_rate,
            proximal_mu=settings.proximal_mu,
            seed=settings.seed + settings.server_round,
            run_name=settings.run_name,
            server_round=settings.server_round,
        )
        entry = ledger.append(
            self._ledger_record(
                kind="round",
                model=model,
                settings=settings,
                patients=len(train_idx),
                sample_rate=result.sample_rate,
                steps=result.steps,
                noise_multiplier=result.noise_multiplier,
                accountant=result.accountant,
                delta=result.delta,
                epsilon_round=result.epsilon_round,
                epsilon_total=result.epsilon_total,
            )
        )
        metrics = {
            Metric.NUM_EXAMPLES: float(result.num_examples),
            Metric.EPSILON_ROUND: result.epsilon_round,
            Metric.EPSILON_TOTAL: result.epsilon_total,
            Metric.DELTA: result.delta,
            Metric.NOISE_MULTIPLIER: result.noise_multiplier,
            Metric.MAX_GRAD_NORM: result.max_grad_norm,
            Metric.SAMPLE_RATE: result.sample_rate,
            Metric.STEPS: float(result.steps),
        }
        # NOTE: the training loss is an average over the site's patients without noise, so
        # it is outside the DP guarantee. Like every metric, it is sent only from a cohort of
        # at least the policy's minimum size.
        if result.num_examples >= policy.min_cohort and math.isfinite(result.loss):
            metrics[Metric.TRAIN_LOSS] = result.loss
        return SiteOutcome(
            Status.OK, "", metrics, model.state_dict(), result.accountant, ledger_entry=entry
        )

    def _refuse(
        self,
        ledger: SiteLedger,
        store: AccountantStore,
        model: torch.nn.Module,
        settings: RoundSettings,
        decision: BudgetDecision,
        noise: float,
        steps: int,
        train_idx: list[int],
    ) -> SiteOutcome:
        """Record a rejected round in the ledger and build the reply that gives the reason."""
        logger.warning(
            "Site %s rejected round %d: %s", self.site, settings.server_round, decision.reason
        )
        projected: float | None = None
        if decision.rule == "epsilon-cap":
            projected = decision.projected_epsilon
        elif decision.rule == "epsilon-cap-total":
            projected = decision.projected_epsilon_all_tasks
        entry = ledger.append(
            self._ledger_record(
                kind="refusal",
                model=model,
                settings=settings,
                patients=len(train_idx),
                sample_rate=settings.sample_rate,
                steps=steps,
                noise_multiplier=noise,
                accountant=store.accountant,
                delta=decision.delta,
                epsilon_round=0.0,
                epsilon_total=decision.epsilon_before,
                epsilon_projected=projected,
                reason=decision.reason,
                rule=decision.rule,
            )
        )
        budget_rules = ("epsilon-cap", "epsilon-cap-total")
        return SiteOutcome(
            Status.REFUSED_BUDGET if decision.rule in budget_rules else Status.REFUSED_POLICY,
            decision.reason,
            metrics={Metric.EPSILON_TOTAL: decision.epsilon_before, Metric.DELTA: decision.delta},
            accountant=store.accountant,
            ledger_entry=entry,
        )

    def _ledger_record(
        self,
        *,
        kind: str,
        model: torch.nn.Module,
        settings: RoundSettings,
        patients: int,
        sample_rate: float,
        steps: int,
        noise_multiplier: float,
        accountant: str,
        delta: float,
        epsilon_round: float,
        epsilon_total: float,
        epsilon_projected: float | None = None,
        reason: str = "",
        rule: str = "",
    ) -> LedgerRecord:
        policy = self.config.privacy
        histories = site_histories(self.config.state_dir)
        combined = [entry for task in sorted(histories) for entry in histories[task]]
        return LedgerRecord(
            kind=kind,
            site=self.site,
            run_id=settings.run_name,
            round=settings.server_round,
            task=self.task.name,
            model_version=model_version(model),
            feature_spec_sha256=self.spec.sha256,
            privacy_unit=policy.privacy_unit,
            patients=round_patients(patients, policy.patients_rounding),
            patients_rounding=policy.patients_rounding,
            sample_rate=sample_rate,
            steps=steps,
            noise_multiplier=noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            accountant=accountant,
            delta=delta,
            epsilon_round=epsilon_round,
            epsilon_total=epsilon_total,
            epsilon_all_tasks=epsilon_of_history(accountant, combined, delta),
            epsilon_projected=epsilon_projected,
            secure_rng=SECURE_RNG,
            reason=reason,
            rule=rule,
            policy=policy.to_json(),
        )

    def evaluate(self, state_dict: dict[str, torch.Tensor], seed: int) -> SiteOutcome:
        """Evaluate the global model on this site's held-out patients."""
        examples, _, holdout_idx = self.examples(seed)
        min_cohort = self.config.privacy.min_cohort
        if len(holdout_idx) < min_cohort:
            return SiteOutcome(
                Status.BELOW_MIN_COHORT,
                f"site {self.site} has {len(holdout_idx)} held-out patients, below the policy's "
                f"minimum cohort of {min_cohort}; metrics withheld",
            )

        model = self._model(state_dict)
        model.eval()
        with torch.no_grad():
            scores = self.task.evaluate(model, examples.subset(holdout_idx))
        metrics: dict[str, float] = {Metric.NUM_EXAMPLES: float(len(holdout_idx))}
        for name, value in scores.items():
            if isinstance(value, int | float) and math.isfinite(float(value)):
                metrics[name] = float(value)
        return SiteOutcome(Status.OK, "", metrics)


def _outcome_of(release: Release) -> SiteOutcome:
    """Return the reply a stored release was first sent as."""
    return SiteOutcome(
        release.status,
        release.message,
        dict(release.metrics),
        dict(release.state_dict),
        release.accountant,
        ledger_entry=release.ledger_entry,
    )


def model_version(model: torch.nn.Module) -> str:
    """Return the model class and a hash of its parameter names and shapes, such as `X@1a2b…`."""
    layout = ";".join(
        f"{name}:{'x'.join(str(size) for size in tensor.shape)}"
        for name, tensor in sorted(model.state_dict().items())
    )
    return f"{type(model).__name__}@{hashlib.sha256(layout.encode()).hexdigest()[:12]}"


def privacy_facts(outcome: SiteOutcome) -> dict[str, Any]:
    """Return the privacy facts a reply states beside ε: accountant, unit and RNG."""
    return {"accountant": outcome.accountant, "privacy-unit": "patient", "secure-rng": SECURE_RNG}
