"""Names of the records, config keys and metrics that travel between coordinator and sites.

Both the ServerApp and the ClientApp import these names, so a key is spelled once.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "REPLY",
    "Config",
    "Metric",
    "Reply",
    "Status",
]

# RecordDict keys of a Message's content.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
REPLY = "reply"


class Config:
    """ConfigRecord keys the coordinator sends with every train and evaluate message."""

    SERVER_ROUND = "server-round"
    RUN_NAME = "run-name"
    TASK = "task"
    SPEC_SHA256 = "spec-sha256"
    CONSORTIUM = "consortium"
    LOCAL_EPOCHS = "local-epochs"
    LEARNING_RATE = "learning-rate"
    NOISE_MULTIPLIER = "noise-multiplier"
    MAX_GRAD_NORM = "max-grad-norm"
    SAMPLE_RATE = "sample-rate"
    TARGET_EPSILON_PER_ROUND = "target-epsilon-per-round"
    PROXIMAL_MU = "proximal-mu"
    SEED = "seed"


class Metric:
    """MetricRecord keys a site sends back."""

    NUM_EXAMPLES = "num-examples"  # patients; the weight of FedAvg
    TRAIN_LOSS = "train-loss"
    EVAL_LOSS = "eval-loss"
    EPSILON_ROUND = "epsilon-round"
    EPSILON_TOTAL = "epsilon-total"
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise-multiplier"
    MAX_GRAD_NORM = "max-grad-norm"
    SAMPLE_RATE = "sample-rate"
    STEPS = "steps"


class Reply:
    """ConfigRecord keys a site sends back beside its arrays and metrics."""

    STATUS = "status"
    SITE = "site"
    MESSAGE = "message"
    SPEC_SHA256 = "spec-sha256"
    ACCOUNTANT = "accountant"
    SECURE_RNG = "secure-rng"
    PRIVACY_UNIT = "privacy-unit"
    # The site's signed privacy-ledger entry for the round, as canonical JSON text; the steward
    # verifies its Ed25519 signature with the site's site-key.pub.
    LEDGER_ENTRY = "ledger-entry"


class Status:
    """Values of `Reply.STATUS`."""

    OK = "ok"
    REFUSED_BUDGET = "refused-budget"  # the round would pass the site's epsilon cap
    REFUSED_POLICY = "refused-policy"  # the site's policy forbids the task, model, delta or noise
    NO_DATA = "no-data"  # no usable patients for this task
    SPEC_MISMATCH = "spec-mismatch"
    BELOW_MIN_COHORT = "below-min-cohort"  # metrics withheld: too few patients
    ERROR = "error"
