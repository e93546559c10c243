"""What a simulated federation is checked for before it starts, for ``fedsilo-simulate run`` and sweeps.

Every check here fails fast with a message a person can act on, before Flower or
Ray starts: the data, the model and the partition fit together; the simulated
institutions' policies load; SecAgg+ has enough institutions; the engine can run
where it is asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.client.policy import PrivacyPolicy
from fedsilo.client.simulated_data import simulated_name, simulated_partition
from fedsilo.common.datasets import load_dataset
from fedsilo.common.errors import ConfigError
from fedsilo.common.metrics import lead_metric
from fedsilo.common.models import check_model_fits
from fedsilo.common.registry import DATASETS, TABLE_SUFFIXES
from fedsilo.common.settings import RunSettings
from fedsilo.simulations.engines import check_engine

# Institutions a simulation has when not told: 4 hospitals, 3 banks, ...
DEFAULT_INSTITUTIONS = {"breast-cancer": 4, "german-credit": 3, "digits": 4}
SECAGG_MIN_INSTITUTIONS = 3


def default_institutions(dataset: str) -> int:
    """How many institutions a simulation of ``dataset`` has by default."""
    return DEFAULT_INSTITUTIONS.get(dataset, 3)


def dataset_value(name: str) -> str:
    """A built-in dataset's name, or a table's absolute path (Flower's workers run elsewhere)."""
    return name if name in DATASETS or not name.lower().endswith(TABLE_SUFFIXES) else str(Path(name).resolve())


def check_secagg_quorum(institutions: int, secure_aggregation: bool, *, fix: str) -> None:
    """SecAgg+ needs at least three institutions (two would learn each other's update from the sum)."""
    if secure_aggregation and institutions < SECAGG_MIN_INSTITUTIONS:
        raise ConfigError(
            f"SecAgg+ needs at least {SECAGG_MIN_INSTITUTIONS} institutions. Found institutions {institutions} "
            f"with secure aggregation on; {fix}"
        )


def check_where(engine: str, ray_address: str) -> None:
    """The engine exists, and a Ray cluster is asked only of Flower's engine."""
    check_engine(engine)
    if ray_address and engine != "flower":
        raise ConfigError(
            "--ray-address runs Flower's simulation engine on a cluster; add --engine flower "
            f"(the {engine} engine runs in this process)"
        )


@dataclass(frozen=True)
class Checked:
    """What the checks learnt about the data: the metric to lead with, and the majority-class rate."""

    lead: str
    majority: float


def check_simulation(settings: RunSettings, institutions: int) -> Checked:
    """Fail before Flower starts if the dataset, the model, the partition or the policies cannot work.

    Returns the metric to lead with (``fedsilo.common.metrics.lead_metric``) and the dataset's
    majority-class rate (the accuracy of always guessing the commonest class).
    """
    if settings.out_dir and (Path(settings.out_dir) / "report.json").exists():
        raise ConfigError(f"{settings.out_dir} already holds a finished run; choose another --out or remove it")
    dataset = load_dataset(settings.data.dataset, settings.schema_path)
    check_model_fits(settings.train, dataset.schema)
    _, labels = dataset.schema.transform(dataset.frame, source=dataset.name)
    simulated_partition(settings, dataset.frame, labels, institutions)
    if settings.simulation_policy:
        names = [simulated_name(dataset.institution_noun, i) for i in range(institutions)]
        PrivacyPolicy.load_simulated(settings.simulation_policy, names)
    check_secagg_quorum(institutions, settings.secagg.enabled, fix="add some or pass --no-secure-aggregation")
    majority = float(np.bincount(labels).max() / len(labels))
    return Checked(lead_metric(dataset.schema.num_classes, majority), majority)
