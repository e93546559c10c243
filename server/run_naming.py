"""How a new run directory is named (the one rule): ``[prefix-]<time>[-dataset]``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


def new_run_dir(parent: Path, *, dataset: str = "", prefix: str = "", now: datetime | None = None) -> Path:
    """``parent/[prefix-]YYYYmmdd-HHMMSS[-dataset]`` (``now``: the current time).

    A federation's runs are ``<time>``, a simulation's ``<time>-<dataset>``, a sweep's ``sweep-<time>``.
    """
    name = f"{now or datetime.now():%Y%m%d-%H%M%S}"
    return parent / "-".join(part for part in (prefix, name, dataset) if part)
