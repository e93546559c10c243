"""Settings: one set of defaults, validated on construction."""

import math
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import LOCAL_KEYS, SIMULATED_KEYS, Proposal, RunSettings, coerce

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_defaults_are_the_settings_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunSettings().to_config()


def test_round_trip_through_flat_config() -> None:
    settings = RunSettings().with_overrides(
        {"num-server-rounds": 7, "target-epsilon": 3.5, "secure-aggregation": False}
    )
    again = RunSettings.from_config({**settings.to_config(), "server-round": 3})
    assert again == settings
    assert again.rounds == 7 and again.privacy.target_epsilon == 3.5 and not again.secagg.enabled


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("delta", 1.5, "'delta' must be in (0, 1). Found 1.5"),
        ("batch-size", -1, "'batch-size' must be an integer >= 1"),
        ("num-server-rounds", 2.5, "'num-server-rounds' must be an integer"),
        ("secure-aggregation", "maybe", "'secure-aggregation' must be true or false"),
        ("secagg-modulus-range", 3 * 2**22, "power of two"),
        ("hidden-layers", "64,x", "'hidden-layers' must be comma-separated positive widths"),
        ("model", "resnet", "'model' must be one of 'linear', 'mlp', 'cnn'. Found 'resnet'."),
        ("activation", "sigmoid", "'activation' must be one of 'relu', 'tanh'. Found 'sigmoid'."),
        ("learning-rate", "fast", "'learning-rate' must be a number"),
        ("accountant", "prv", "'accountant' must be one of 'pld', 'rdp'. Found 'prv'."),
    ],
)
def test_invalid_values_name_the_key_and_the_value(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config({key: value})
    assert words in str(err.value)


def test_privacy_modes_and_budget() -> None:
    private = RunSettings().privacy
    assert private.enabled and private.budget == private.target_epsilon
    nodp = RunSettings.from_config({"target-epsilon": math.inf}).privacy
    assert not nodp.enabled and nodp.budget == math.inf
    fixed = RunSettings.from_config({"target-epsilon": math.inf, "noise-multiplier": 1.1, "max-epsilon": 5}).privacy
    assert fixed.enabled and fixed.budget == 5


def test_secagg_counts_and_fractions_reach_flower_as_flower_reads_them() -> None:
    kwargs = RunSettings.from_config({"secagg-num-shares": 5, "secagg-timeout": 0}).secagg.workflow_kwargs()
    assert kwargs["num_shares"] == 5 and isinstance(kwargs["num_shares"], int)
    assert isinstance(kwargs["reconstruction_threshold"], float)
    assert kwargs["timeout"] is None


def test_the_proposal_holds_no_path_of_the_coordinator() -> None:
    settings = RunSettings(rounds=3, out_dir="/runs/a", resume_from="/runs/b", schema_path="/fed/schema.toml")
    proposal = settings.proposal
    assert type(proposal) is Proposal and proposal.rounds == 3
    assert not set(proposal.to_config()) & set(LOCAL_KEYS)
    assert set(LOCAL_KEYS) == {"out-dir", "resume-from", "schema-path", "state-root", "simulation-policy"}
    # Deployed, a message carries the proposal alone; simulated, also where the simulated institutions live.
    assert settings.institution_config() == proposal.to_config()
    simulated = replace(settings, state_root="/runs/a/state", simulation_policy="/p.toml")
    assert set(simulated.institution_config()) - set(proposal.to_config()) == set(SIMULATED_KEYS)
    assert RunSettings.of(proposal, state_root="/s").state_root == "/s"


def test_unknown_and_local_keys_are_refused_where_people_write_settings() -> None:
    with pytest.raises(ConfigError, match=r"--config: unknown run setting\(s\) \['target-epsilion'\]"):
        Proposal.from_config({"target-epsilion": 3}, source="--config")
    with pytest.raises(ConfigError, match=r"--config may not set \['out-dir'\]"):
        Proposal.from_config({"out-dir": "/x"}, source="--config")
    with pytest.raises(ConfigError, match="unknown run setting"):
        RunSettings().with_overrides({"num-server-round": 3})  # a misspelling is never silently ignored
    # A message may carry other entries (the server round): they are not settings, and not an error.
    assert Proposal.from_config({"server-round": 2, "num-server-rounds": 4}).rounds == 4


def test_one_coercion_for_settings_and_policies() -> None:
    assert coerce("k", "true", bool) is True and coerce("k", 3.0, "int | None") == 3
    with pytest.raises(ConfigError, match=r"policy\.toml: 'k' must be an integer\. Found 2\.5\."):
        coerce("k", 2.5, int, source="policy.toml")
