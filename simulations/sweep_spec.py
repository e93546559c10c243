"""What a sweep runs: axes given on the command line or in a TOML file, checked strictly, expanded to runs.

A sweep file::

    dataset = "breast-cancer"
    rounds = 20
    epsilons = [0.5, 1, 2, 4, 8, "inf"]   # "inf": no DP
    noise-multipliers = []                 # fixed noise levels, swept besides the epsilons
    institutions = [4]
    partitions = ["iid", "dirichlet:0.5"]
    secure-aggregation = [true]
    local-epochs = [2]
    dp-modes = ["local", "distributed"]    # distributed DP needs secure-aggregation (plain setups skip it)
    seeds = [0, 1, 2]
    engine = "inprocess"                   # or "flower"
    ray-address = "10.0.0.5:6379"          # run the federations as Ray tasks on this cluster ("": locally)
    schema = "credit.schema.toml"          # the schema of a CSV/Parquet dataset (relative: to this file)

    [settings]                             # any other run-config key, fixed for every run
    learning-rate = 0.2

Every axis is a list (one value may be written bare); unknown keys, wrong types
and impossible values are errors that name the source, the key, the value and
the fix.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedsilo.common.errors import ConfigError
from fedsilo.common.registry import DATASETS, PARTITIONERS, TABLE_SUFFIXES
from fedsilo.common.settings import DP_MODES, PrivacySettings, RunSettings, check_keys, dp_enabled
from fedsilo.common.tomlfile import read_toml
from fedsilo.simulations.engines import ENGINES

AXES = (
    *("epsilons", "noise-multipliers", "institutions", "partitions", "secure-aggregation", "local-epochs"),
    *("dp-modes", "seeds"),
)
SCALARS = ("dataset", "schema", "rounds", "delta", "engine", "ray-address")
KEYS = (*SCALARS, *AXES, "settings")
# Run settings the sweep sets itself (a [settings] table may not); of the coordinator's own
# settings a [settings] table may set the simulated institutions' policy file only.
SWEPT_KEYS = (
    *("partition", "secure-aggregation", "local-epochs", "seed", "target-epsilon", "noise-multiplier", "dp-mode"),
    *("dataset", "num-server-rounds", "delta", "min-institutions"),
    *("schema-path", "out-dir", "state-root", "resume-from"),
)


@dataclass(frozen=True)
class PrivacyLevel:
    """One point of the privacy axis: a target epsilon (inf: no DP) or a fixed noise multiplier."""

    target_epsilon: float = math.inf
    noise_multiplier: float = 0.0

    @property
    def private(self) -> bool:
        return dp_enabled(target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier)

    @property
    def label(self) -> str:
        if self.noise_multiplier > 0:
            return f"sigma={self.noise_multiplier:g}"
        return "inf" if not self.private else f"eps={self.target_epsilon:g}"

    def privacy(self, base: PrivacySettings, *, delta: float) -> PrivacySettings:
        """``base`` at this level (and ``delta``)."""
        return replace(base, target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier, delta=delta)


NO_DP = PrivacyLevel()


@dataclass(frozen=True)
class Setup:
    """Everything of one configuration but its privacy level and seed."""

    institutions: int
    partition: str
    secure_aggregation: bool
    local_epochs: int
    dp_mode: str = "local"

    @property
    def label(self) -> str:
        secagg = "secagg" if self.secure_aggregation else "plain"
        mode = "" if self.dp_mode == "local" else f" {self.dp_mode}"
        return f"n={self.institutions} {self.partition} {secagg} E={self.local_epochs}{mode}"


@dataclass(frozen=True)
class Task:
    """One unit of work: a setup at one privacy level with one seed (every method)."""

    setup: Setup
    level: PrivacyLevel
    seed: int

    @property
    def run_id(self) -> str:
        text = f"{self.setup.label} {self.level.label} seed={self.seed}"
        return "".join(c if c.isalnum() or c in "=.-" else "_" for c in text)


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep: the axes, and the settings every run shares."""

    dataset: str = "breast-cancer"
    schema: str = ""  # a CSV/Parquet dataset's schema file, absolute ("": a built-in dataset's own)
    rounds: int = 20
    delta: float = 1e-5
    engine: str = "inprocess"
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    noise_multipliers: tuple[float, ...] = ()
    institutions: tuple[int, ...] = (4,)
    partitions: tuple[str, ...] = ("iid",)
    secure_aggregation: tuple[bool, ...] = (True,)
    local_epochs: tuple[int, ...] = (2,)
    dp_modes: tuple[str, ...] = ("local",)
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: Mapping[str, Any] = field(default_factory=dict)
    ray_address: str = ""  # a Ray cluster's address: each task runs there as a Ray task ("": locally)

    def identity(self) -> dict[str, Any]:
        """What decides the sweep's numbers: every field but where it runs (a resumed sweep must match)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ray_address"}
        values["settings"] = dict(sorted(values["settings"].items()))
        return values

    @property
    def levels(self) -> tuple[PrivacyLevel, ...]:
        """Every privacy level, no-DP always among them (the non-private baselines)."""
        levels = [PrivacyLevel(target_epsilon=e) for e in self.epsilons if math.isfinite(e)]
        levels += [PrivacyLevel(noise_multiplier=s) for s in self.noise_multipliers]
        return (*levels, NO_DP)

    @property
    def setups(self) -> tuple[Setup, ...]:
        product = itertools.product(
            self.institutions, self.partitions, self.secure_aggregation, self.local_epochs, self.dp_modes
        )
        # Distributed DP's noise shares protect nothing outside a secure sum: no plain setup has it.
        return tuple(Setup(*v) for v in product if v[2] or v[4] == "local")

    def tasks(self) -> list[Task]:
        return [Task(s, lv, seed) for s in self.setups for lv in self.levels for seed in self.seeds]

    def run_settings(self, task: Task) -> RunSettings:
        """The run settings of one task's federated run (and of its baselines)."""
        base = RunSettings.from_config(self.settings)  # checked by parse_sweep
        return replace(
            base,
            rounds=self.rounds,
            seed=task.seed,
            train=replace(base.train, local_epochs=task.setup.local_epochs),
            privacy=replace(task.level.privacy(base.privacy, delta=self.delta), mode=task.setup.dp_mode),
            secagg=replace(base.secagg, enabled=task.setup.secure_aggregation),
            data=replace(base.data, dataset=self.dataset, partition=task.setup.partition),
            schema_path=self.schema,
        )


def load_sweep_file(path: Path | str) -> dict[str, Any]:
    """Read a sweep file's raw values (checked by ``parse_sweep``)."""
    return read_toml(path, "sweep file")


def parse_sweep(values: Mapping[str, Any], source: str, *, folder: Path | str | None = None) -> SweepSpec:
    """Check raw sweep values (from a file or the command line) and build the spec.

    ``source`` names where they came from, for the error messages; a relative
    ``schema`` path is read from ``folder`` (the sweep file's; None: the working
    directory).
    """
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys are {', '.join(KEYS)}")
    out: dict[str, Any] = {}

    def fail(key: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"{source}: '{key}' {fix}. Found {value!r}.")

    if "dataset" in values:
        name = str(values["dataset"])
        if name not in DATASETS and not name.lower().endswith(TABLE_SUFFIXES):
            raise fail(
                "dataset", values["dataset"], f"must be one of {', '.join(sorted(DATASETS))} or a CSV/Parquet file"
            )
        out["dataset"] = name
    if "schema" in values:
        out["schema"] = _schema_path(values["schema"], Path(folder) if folder is not None else Path.cwd(), fail)
    if "engine" in values:
        if values["engine"] not in ENGINES:
            raise fail("engine", values["engine"], f"must be {' or '.join(ENGINES)}")
        out["engine"] = values["engine"]
    if "ray-address" in values:
        address = values["ray-address"]
        if not isinstance(address, str):
            raise fail("ray-address", address, 'must be a Ray cluster\'s address, e.g. "10.0.0.5:6379" ("": locally)')
        out["ray_address"] = address.strip()
    if "rounds" in values:
        out["rounds"] = _integer("rounds", values["rounds"], fail, minimum=1)
    if "delta" in values:
        delta = _number("delta", values["delta"], fail)
        if not 0 < delta < 1:
            raise fail("delta", values["delta"], "must be in (0, 1), e.g. 1e-5")
        out["delta"] = delta
    for key in AXES:
        if key not in values:
            continue
        raw = values[key] if isinstance(values[key], list) else [values[key]]
        if not raw and key != "noise-multipliers":
            raise fail(key, values[key], "needs at least one value")
        items = tuple(_axis_item(key, item, fail) for item in raw)
        if len(set(items)) != len(items):
            raise fail(key, values[key], "lists a value twice; list each value once")
        out[key.replace("-", "_")] = items
    if "settings" in values:
        out["settings"] = _fixed_settings(values["settings"], source)
    spec = SweepSpec(**out)
    if spec.ray_address and spec.engine == "flower":
        raise ConfigError(
            f"{source}: 'ray-address' runs each federation as one Ray task of the in-process engine; Flower's "
            "engine would start its own actors inside each task. Leave 'engine' at inprocess, or run one "
            "federation on the cluster with fedsilo-simulate run --engine flower --ray-address"
        )
    if not spec.setups:
        raise ConfigError(
            f"{source}: every setup is plain (secure-aggregation false) with dp-modes distributed, which needs "
            "SecAgg+; add secure-aggregation = true or dp-modes local"
        )
    if not spec.epsilons and not spec.noise_multipliers:
        raise ConfigError(f"{source}: give at least one of 'epsilons' or 'noise-multipliers'")
    return spec


def _schema_path(value: Any, folder: Path, fail: Any) -> str:
    """The schema file, made absolute (Flower's workers run elsewhere); it must exist."""
    if not isinstance(value, str) or not value.strip():
        raise fail("schema", value, 'must be the path of a schema file (TOML), e.g. schema = "credit.schema.toml"')
    path = (folder / value).resolve()
    if not path.is_file():
        raise fail("schema", value, f"names no file ({path}; a relative path is read from {folder}); check the path")
    return str(path)


def _axis_item(key: str, item: Any, fail: Any) -> Any:
    if key == "epsilons":
        value = _number(key, item, fail)
        if not value > 0:
            raise fail(key, item, 'must hold numbers > 0 ("inf" for no DP)')
        return value
    if key == "noise-multipliers":
        value = _number(key, item, fail)
        if not (math.isfinite(value) and value > 0):
            raise fail(key, item, 'must hold finite numbers > 0 (use epsilons = ["inf"] for no DP)')
        return value
    if key == "institutions":
        return _integer(key, item, fail, minimum=2)
    if key == "seeds":
        return _integer(key, item, fail, minimum=0)
    if key == "local-epochs":
        return _integer(key, item, fail, minimum=1)
    if key == "dp-modes":
        if item not in DP_MODES:
            raise fail(key, item, f"must hold {' or '.join(map(repr, DP_MODES))}")
        return item
    if key == "secure-aggregation":
        if isinstance(item, bool):
            return item
        if isinstance(item, str) and item.lower() in {"true", "false", "on", "off"}:
            return item.lower() in {"true", "on"}
        raise fail(key, item, "must hold true or false (on/off)")
    # partitions: checked against a real split before the sweep starts; the shape is checked here
    if not isinstance(item, str) or item.split(":")[0] not in PARTITIONERS:
        raise fail(key, item, f"must hold {PARTITIONERS.usage()}")
    return item


def _number(key: str, item: Any, fail: Any) -> float:
    if isinstance(item, bool):
        raise fail(key, item, "must hold numbers")
    try:
        value = float(item)
    except (TypeError, ValueError):
        raise fail(key, item, 'must hold numbers (or "inf")') from None
    if math.isnan(value):
        raise fail(key, item, "must hold numbers")
    return value


def _integer(key: str, item: Any, fail: Any, *, minimum: int) -> int:
    if isinstance(item, bool):
        raise fail(key, item, f"must hold integers >= {minimum}")
    try:
        value = int(item) if isinstance(item, int) else int(str(item).strip())
    except ValueError:
        raise fail(key, item, f"must hold integers >= {minimum}") from None
    if value < minimum:
        raise fail(key, item, f"must hold integers >= {minimum}")
    return value


def _fixed_settings(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [settings] must be a table of run-config keys, e.g. learning-rate = 0.1")
    where = f"{source}: [settings]"
    check_keys(table, RunSettings, source=where, fixed=SWEPT_KEYS, fixed_by="the sweep sets it; use its sweep key")
    RunSettings.from_config(table, source=where)  # every value checked
    return dict(table)
