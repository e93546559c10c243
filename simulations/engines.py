"""The two simulation engines behind one call: Flower's runtime, or the in-process fast path."""

from __future__ import annotations

import logging
from typing import Any

from common.errors import ConfigError
from common.settings import RunSettings
from server.strategy import RoundCallback

ENGINES = ("flower", "inprocess")


def check_engine(name: str) -> None:
    """Refuse an unknown engine name, naming the known ones."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; use {' or '.join(ENGINES)}")


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

    ``ray_address``: Flower's engine runs on that existing Ray cluster (``simulations.runner``).
    """
    check_engine(engine)
    if ray_address and engine != "flower":
        raise ConfigError(
            f"a Ray address runs Flower's simulation engine on a cluster; the {engine} engine runs in this "
            "process. Use --engine flower, or leave out --ray-address"
        )
    if engine == "flower":
        from simulations.runner import run_federation

        return run_federation(
            settings, institutions=institutions, on_round=on_round, verbose=verbose, ray_address=ray_address
        )
    from simulations.inprocess import run_inprocess

    logger = logging.getLogger("flwr")
    saved = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        return run_inprocess(settings, institutions=institutions, on_round=on_round)
    finally:
        logger.setLevel(saved)
