"""Simulated institutions' records: a dataset encoded once per process and split by the run seed.

Light to import (the ClientApp builds its ``SimulatedTables`` before any message
arrives, and deployed messages that never train must not pay for pandas or torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedsilo.common.schema import Schema
    from fedsilo.common.settings import RunSettings


def simulated_partition(settings: RunSettings, frame: Any, labels: np.ndarray, count: int) -> list[np.ndarray]:
    """The rows of every simulated institution: a pure function of the seed."""
    from fedsilo.common.partition import partition

    rng = np.random.default_rng([settings.seed, 1])
    return partition(settings.data.partition, frame, labels, count, rng)


@dataclass(frozen=True)
class SimulatedTable:
    """A built-in (or researcher's) dataset, encoded by its schema, and its split into institutions."""

    schema: Schema
    institution_noun: str
    inputs: np.ndarray
    labels: np.ndarray
    rows: list[np.ndarray]

    def name(self, partition_id: int) -> str:
        """A simulated institution's name: ``hospital-1``, ``bank-3``, ... (partition ids count from 0)."""
        return simulated_name(self.institution_noun, partition_id)


def simulated_name(noun: str, partition_id: int) -> str:
    """The name of the simulated institution of ``partition_id`` (the one rule: ``NOUN-<id + 1>``)."""
    return f"{noun}-{partition_id + 1}"


class SimulatedTables:
    """The datasets one simulation process has encoded and split, each once.

    Flower's simulation runs every message of every institution in a few worker
    processes; loading and encoding the dataset again for each message costs more
    than the round's training (about 17 s per message for Fashion-MNIST). Keyed by
    everything the split depends on, so a changed setting is a new entry. The
    ClientApp uses ``PROCESS_TABLES``; the in-process engine and the baselines
    build their own.
    """

    def __init__(self, *, keep: int = 2) -> None:
        self.keep = keep  # datasets held at once (oldest dropped first), and 4x as many splits
        self._encoded: dict[tuple[str, str], tuple[Any, Schema, str, np.ndarray, np.ndarray]] = {}
        self._splits: dict[tuple[str, str, str, int, int], SimulatedTable] = {}

    def partition(self, settings: RunSettings, count: int) -> SimulatedTable:
        """The encoded dataset of ``settings`` split into ``count`` institutions."""
        data = settings.data
        split_key = (data.dataset, settings.schema_path, data.partition, settings.seed, count)
        if split_key not in self._splits:
            source = (data.dataset, settings.schema_path)
            if source not in self._encoded:
                from fedsilo.common.datasets import load_dataset

                dataset = load_dataset(data.dataset, settings.schema_path)
                inputs, labels = dataset.schema.transform(dataset.frame, source=dataset.name)
                self._encoded[source] = (dataset.frame, dataset.schema, dataset.institution_noun, inputs, labels)
                _drop_oldest(self._encoded, self.keep)
            frame, schema, noun, inputs, labels = self._encoded[source]
            rows = simulated_partition(settings, frame, labels, count)
            self._splits[split_key] = SimulatedTable(schema, noun, inputs, labels, rows)
            _drop_oldest(self._splits, 4 * self.keep)
        return self._splits[split_key]


def _drop_oldest(entries: dict[Any, Any], keep: int) -> None:
    while len(entries) > keep:
        del entries[next(iter(entries))]


# One per process, on purpose: Flower's Ray backend pickles the ClientApp and sends it
# with every message, so an object the app holds is a fresh copy each time; only a
# module's own object lives as long as the worker process.
PROCESS_TABLES = SimulatedTables()
