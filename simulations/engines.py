"""The simulation engines behind one call, registered by name: Flower's runtime, or the in-process fast path.

An engine is a function of the ``Engine`` shape registered in ``ENGINES``
(``@ENGINES.register("name")``); ``run_engine`` and the sweep files name it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fedsilo.common.errors import ConfigError
from fedsilo.common.registry import Registry
from fedsilo.common.settings import RunSettings
from fedsilo.server.coordinator import RoundCallback


class Engine(Protocol):
    """Run one federation of ``institutions``; return its ``report.json`` content."""

    def __call__(
        self,
        settings: RunSettings,
        *,
        institutions: int,
        on_round: RoundCallback | None,
        verbose: bool,
        ray_address: str,
    ) -> dict[str, Any]: ...


ENGINES: Registry[Engine] = Registry("engine")


def check_engine(name: str) -> None:
    """Refuse an unknown engine name, naming the known ones."""
    if name not in ENGINES:
        raise ENGINES.unknown(name)


def run_engine(
    engine: str,
    settings: RunSettings,
    *,
    institutions: int,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    ray_address: str = "",
) -> dict[str, Any]:
    """Run one federation on ``engine``; return its ``report.json`` content.

    ``ray_address``: Flower's engine runs on that existing Ray cluster (``fedsilo.simulations.runner``).
    """
    return ENGINES.get(engine)(
        settings, institutions=institutions, on_round=on_round, verbose=verbose, ray_address=ray_address
    )


@ENGINES.register("flower")
def flower_engine(
    settings: RunSettings, *, institutions: int, on_round: RoundCallback | None, verbose: bool, ray_address: str
) -> dict[str, Any]:
    """Flower's simulation engine (Ray), on this machine or on the cluster at ``ray_address``."""
    from fedsilo.simulations.runner import run_federation

    return run_federation(
        settings, institutions=institutions, on_round=on_round, verbose=verbose, ray_address=ray_address
    )


@ENGINES.register("inprocess")
def inprocess_engine(
    settings: RunSettings, *, institutions: int, on_round: RoundCallback | None, verbose: bool, ray_address: str
) -> dict[str, Any]:
    """The in-process engine (``fedsilo.simulations.inprocess``): the same federation, no Ray, in this process."""
    if ray_address:
        raise ConfigError(
            "a Ray address runs Flower's simulation engine on a cluster; the inprocess engine runs in this "
            "process. Use --engine flower, or leave out --ray-address"
        )
    from fedsilo.simulations.inprocess import run_inprocess

    logger = logging.getLogger("flwr")
    saved = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        return run_inprocess(settings, institutions=institutions, on_round=on_round)
    finally:
        logger.setLevel(saved)
