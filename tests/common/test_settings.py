"""Settings: one set of defaults, validated on construction."""

import math
import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import RunSettings

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
