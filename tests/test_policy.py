"""Site privacy policy: parsing, site.toml wiring, `policy check`, and the rules before a round."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_config import SiteConfigError, load_site_config
from privacy.accountant import AccountantStore
from privacy.budget import BudgetDecision, check_policy
from privacy.cli import EXIT_FAILED, EXIT_INPUT, EXIT_OK, main
from privacy.policy import PolicyError, SitePolicy, load_policy, parse_policy, round_patients

_VALID = """
epsilon-cap = 4.0
epsilon-cap-total = 6.0
delta = 1e-4
min-noise-multiplier = 0.8
privacy-unit = "patient"
allowed-tasks = ["crs-risk", "lab-forecast"]
allowed-models = ["CrsRiskNet"]
min-cohort = 7
patients-rounding = 5
"""


def _policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_policy_file_fields(tmp_path: Path) -> None:
    policy = load_policy(_policy_file(tmp_path, _VALID))
    assert policy.epsilon_cap == 4.0
    assert policy.epsilon_cap_total == 6.0
    assert policy.delta == 1e-4
    assert policy.min_noise_multiplier == 0.8
    assert policy.allowed_tasks == ("crs-risk", "lab-forecast")
    assert policy.allowed_models == ("CrsRiskNet",)
    assert policy.min_cohort == 7
    assert policy.patients_rounding == 5
    assert policy.allows_task("crs-risk")
    assert not policy.allows_task("cell-state")


def test_policy_defaults() -> None:
    policy = parse_policy({}, "site.toml [privacy]")
    assert policy.privacy_unit == "patient"
    assert policy.epsilon_cap_total is None
    assert policy.delta == 0.0
    assert policy.allows_task("cell-state")
    assert policy.allows_model("CellStateNet")


def test_policy_record_unit_allowed() -> None:
    assert parse_policy({"privacy-unit": "record"}, "p.toml").privacy_unit == "record"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("epsilon-cap = 0", "epsilon-cap must be positive"),
        ("epsilon-cap = -1.5", "epsilon-cap must be positive"),
        ("epsilon-cap-total = 0", "epsilon-cap-total must be positive"),
        ("delta = 1.0", "delta must be in (0, 1)"),
        ("delta = 2", "delta must be in (0, 1)"),
        ('allowed-tasks = ["crs-risk", "heart-rate"]', "allowed-tasks names unknown 'heart-rate'"),
        ('allowed-models = ["ResNet"]', "allowed-models names unknown 'ResNet'"),
        ('privacy-unit = "cell"', "privacy-unit must be one of patient, record"),
        ("min-cohort = 0", "min-cohort must be at least 1"),
        ('epsilon-cap = "ten"', "epsilon-cap must be a finite number"),
        ("epsilon-kap = 3", "unknown key(s) epsilon-kap"),
        ("patients-rounding = 0", "patients-rounding must be at least 1"),
    ],
)
def test_policy_bad_field(tmp_path: Path, line: str, field: str) -> None:
    path = _policy_file(tmp_path, line + "\n")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert field in message


def test_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "absent.toml")


def test_round_patients() -> None:
    assert round_patients(23, 5) == 20
    assert round_patients(23, 1) == 23
    assert round_patients(4, 5) == 0


# ---------------------------------------------------------------------------- site.toml


def _site(tmp_path: Path, extra: str) -> Path:
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    (folder / "site.toml").write_text(f'[site]\nname = "s"\n{extra}')
    return folder


def test_site_policy_file(tmp_path: Path) -> None:
    _policy_file(tmp_path, _VALID)
    config = load_site_config(_site(tmp_path, 'policy = "../policy.toml"\n'))
    assert config.policy_file == (tmp_path / "policy.toml").resolve()
    assert config.privacy.epsilon_cap == 4.0
    assert config.privacy.min_cohort == 7


def test_site_inline_privacy_table(tmp_path: Path) -> None:
    config = load_site_config(_site(tmp_path, "[privacy]\nepsilon-cap = 3.0\nmin-cohort = 4\n"))
    assert config.privacy.epsilon_cap == 3.0
    assert config.privacy.min_cohort == 4
    assert config.policy_file is None


def test_site_inline_bad_field(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=r"site\.toml \[privacy\]: delta must be"):
        load_site_config(_site(tmp_path, "[privacy]\ndelta = 1.5\n"))


def test_site_policy_and_table(tmp_path: Path) -> None:
    _policy_file(tmp_path, _VALID)
    site = _site(tmp_path, 'policy = "../policy.toml"\n[privacy]\nepsilon-cap = 3.0\n')
    with pytest.raises(SiteConfigError, match="keep one"):
        load_site_config(site)


def test_site_policy_missing(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=r"absent\.toml: policy file not found"):
        load_site_config(_site(tmp_path, 'policy = "absent.toml"\n'))


# ---------------------------------------------------------------------------- policy check


def test_policy_check_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(_policy_file(tmp_path, _VALID))]) == EXIT_OK
    output = capsys.readouterr().out
    assert "valid policy" in output
    assert "epsilon-cap-total" in output


def test_policy_check_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _policy_file(tmp_path, "epsilon-cap = 0\n")
    assert main(["policy", "check", str(path)]) == EXIT_FAILED
    error = capsys.readouterr().err
    assert str(path) in error
    assert "epsilon-cap" in error
    assert "Traceback" not in error


def test_policy_check_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "none.toml")]) == EXIT_INPUT
    assert "none.toml: policy file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- rules


def _decide(tmp_path: Path, policy: SitePolicy, **overrides: object) -> BudgetDecision:
    arguments: dict[str, object] = {
        "model": "CrsRiskNet",
        "n_patients": 40,
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 2,
    }
    arguments.update(overrides)
    store = AccountantStore(tmp_path, str(arguments.pop("task", "crs-risk")))
    return check_policy(policy=policy, store=store, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "overrides", "rule"),
    [
        (SitePolicy(allowed_tasks=("lab-forecast",)), {}, "task"),
        (SitePolicy(allowed_models=("LabForecastNet",)), {}, "model"),
        (SitePolicy(delta=0.05), {}, "delta"),
        (SitePolicy(min_noise_multiplier=2.0), {}, "noise"),
        (SitePolicy(epsilon_cap=0.5), {}, "epsilon-cap"),
        (SitePolicy(epsilon_cap=50.0, epsilon_cap_total=0.5), {}, "epsilon-cap-total"),
    ],
    ids=["task", "model", "delta", "noise", "cap", "total-cap"],
)
def test_check_policy_rejects(
    tmp_path: Path, policy: SitePolicy, overrides: dict[str, object], rule: str
) -> None:
    decision = _decide(tmp_path, policy, **overrides)
    assert decision.allowed is False
    assert decision.rule == rule
    assert decision.reason


def test_check_policy_allows(tmp_path: Path) -> None:
    decision = _decide(tmp_path, SitePolicy(epsilon_cap=50.0, epsilon_cap_total=60.0))
    assert decision.allowed is True
    assert decision.delta == pytest.approx(1 / 400)
    assert 0 < decision.projected_epsilon_all_tasks < 60.0
