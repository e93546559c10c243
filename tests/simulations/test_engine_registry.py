"""Engines are registered by name: one registration adds one, and an unknown name lists the registered ones."""

from typing import Any

import pytest

from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import RunSettings
from fedsilo.simulations.engines import ENGINES, check_engine, run_engine


def test_an_unknown_engine_is_refused_listing_the_registered_ones() -> None:
    assert ENGINES.names() == ("flower", "inprocess")
    with pytest.raises(ConfigError, match=r"^unknown engine 'ray'; use flower or inprocess$"):
        check_engine("ray")
    with pytest.raises(ConfigError, match="unknown engine 'ray'"):
        run_engine("ray", RunSettings(), institutions=3)


def test_the_inprocess_engine_refuses_a_ray_address() -> None:
    with pytest.raises(ConfigError, match="Use --engine flower, or leave out --ray-address"):
        run_engine("inprocess", RunSettings(), institutions=3, ray_address="127.0.0.1:6379")


def test_one_registration_adds_an_engine() -> None:
    # Prepare
    calls: list[Any] = []

    @ENGINES.register("echo")
    def echo(settings: RunSettings, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs["institutions"])
        return {"engine": "echo"}

    try:
        # Execute / Assert
        check_engine("echo")
        assert run_engine("echo", RunSettings(), institutions=3) == {"engine": "echo"} and calls == [3]
    finally:
        ENGINES.unregister("echo")
    with pytest.raises(ConfigError, match="unknown engine 'echo'"):
        check_engine("echo")
