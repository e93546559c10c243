"""Typed, self-validating run settings and their one adapter to Flower's flat config.

Every setting has exactly one key in ``[tool.flwr.app.config]`` (pyproject.toml),
the same key in the FitIns/EvaluateIns config the coordinator sends each round,
and one default, written here. ``tests/common/test_settings.py`` checks that the
defaults in pyproject.toml are these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from common.accounting import ACCOUNTANT_OF_RECORD, ACCOUNTANTS
from common.errors import ConfigError
from common.registry import ACTIVATIONS, DATASETS, MODELS, PARTITIONERS, TABLE_SUFFIXES

Scalar = bool | int | float | str
_T = TypeVar("_T")


# Opacus per-sample gradient modes that handle every batch DP-SGD draws. "ew" (expanded
# weights) is left out: in Opacus 1.6 it raises on the empty batches Poisson sampling draws.
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(f"{c!r}" for c in choices)


def _key(name: str) -> Any:
    """Field metadata naming the run-config key of a setting."""
    return {"key": name}


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' must be {expected}. Found {value!r}.")


@dataclass(frozen=True)
class TrainSettings:
    """Local training that each institution runs in one round."""

    local_epochs: int = field(default=2, metadata=_key("local-epochs"))
    # 0: the recipe's (common.training.auto_batch_size / auto_learning_rate), from public facts only.
    batch_size: int = field(default=0, metadata=_key("batch-size"))
    learning_rate: float = field(default=0.0, metadata=_key("learning-rate"))
    momentum: float = field(default=0.9, metadata=_key("momentum"))
    # The model: "linear" (logistic / softmax regression, any schema), "mlp" (TabularMLP, any
    # schema) or "cnn" (SmallCNN, 28x28 images only); see common.models.
    model: str = field(default="linear", metadata=_key("model"))
    # Hidden activation: "relu", or "tanh" (the tempered sigmoid of Papernot et al., AAAI 2021).
    activation: str = field(default="relu", metadata=_key("activation"))
    hidden_layers: str = field(default="64", metadata=_key("hidden-layers"))  # the MLP's only
    # How Opacus computes per-sample gradient norms: the same clipping and noise, the same
    # privacy, different speed. "ghost" (ghost clipping) measured fastest on the MLP
    # (bench/dp_overhead.json) and within 4% of "hooks" on the CNN.
    grad_sample_mode: str = field(default="ghost", metadata=_key("grad-sample-mode"))

    def __post_init__(self) -> None:
        _check(self.local_epochs >= 1, "local-epochs", self.local_epochs, "an integer >= 1")
        _check(self.batch_size >= 0, "batch-size", self.batch_size, "an integer >= 1 (0: the recipe's)")
        _check(self.learning_rate >= 0, "learning-rate", self.learning_rate, "> 0 (0: the recipe's)")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(self.model in MODELS, "model", self.model, _one_of(MODELS.names()))
        _check(self.activation in ACTIVATIONS, "activation", self.activation, _one_of(ACTIVATIONS.names()))
        _check(
            self.grad_sample_mode in GRAD_SAMPLE_MODES,
            "grad-sample-mode",
            self.grad_sample_mode,
            _one_of(GRAD_SAMPLE_MODES),
        )
        try:
            units = self.hidden_units
        except ValueError:
            units = (0,)
        _check(
            all(u > 0 for u in units),
            "hidden-layers",
            self.hidden_layers,
            'comma-separated positive widths, e.g. "64" or "64,32" ("" for none)',
        )

    @property
    def hidden_units(self) -> tuple[int, ...]:
        """Widths of the MLP's hidden layers."""
        return tuple(int(p) for p in self.hidden_layers.split(",") if p.strip())


@dataclass(frozen=True)
class PrivacySettings:
    """DP-SGD settings proposed for a run.

    ``noise_multiplier > 0`` fixes the noise; otherwise the noise is calibrated so
    that the planned rounds spend ``target_epsilon``. ``target_epsilon = inf`` with
    no noise multiplier turns DP off (a non-private baseline, epsilon = inf).
    ``max_epsilon`` is the lifetime budget of a dataset; 0 means "the target".
    ``accountant`` calibrates the noise to the target (see ``common.accounting``).
    """

    target_epsilon: float = field(default=2.0, metadata=_key("target-epsilon"))
    noise_multiplier: float = field(default=0.0, metadata=_key("noise-multiplier"))
    delta: float = field(default=1e-5, metadata=_key("delta"))
    max_grad_norm: float = field(default=1.0, metadata=_key("max-grad-norm"))
    max_epsilon: float = field(default=0.0, metadata=_key("max-epsilon"))
    # The accountant that calibrates the noise: "pld" (tight; the ledger's and the budgets'
    # accountant of record) or "rdp" (Opacus's Renyi DP: looser, so more noise for a target).
    accountant: str = field(default=ACCOUNTANT_OF_RECORD, metadata=_key("accountant"))

    def __post_init__(self) -> None:
        _check(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "> 0 (inf: no DP)")
        _check(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, ">= 0")
        _check(0 < self.delta < 1, "delta", self.delta, "in (0, 1)")
        _check(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "> 0")
        _check(self.max_epsilon >= 0, "max-epsilon", self.max_epsilon, ">= 0 (0: the target)")
        _check(self.accountant in ACCOUNTANTS, "accountant", self.accountant, _one_of(tuple(ACCOUNTANTS)))

    @property
    def enabled(self) -> bool:
        """Whether local training uses DP-SGD at all."""
        return self.noise_multiplier > 0 or math.isfinite(self.target_epsilon)

    @property
    def budget(self) -> float:
        """Lifetime epsilon budget of a dataset under these settings."""
        if self.max_epsilon > 0:
            return self.max_epsilon
        return self.target_epsilon if self.enabled else math.inf


@dataclass(frozen=True)
class SecAggSettings:
    """Flower SecAgg+ settings (Bell et al., CCS 2020); see ``SecAggPlusWorkflow``.

    ``max_weight`` is the largest aggregation weight, with or without SecAgg+: an
    institution weighs ``min(its training records, max_weight)`` in the aggregate
    (``aggregation_weight``), so one of any size takes part, and one above the
    maximum has the maximum's influence. SecAgg+ multiplies each update by
    ``weight / max_weight`` (at most 1) and clips the product to
    ``[-clipping_range, clipping_range]``, so an institution keeps its weights inside
    that range while it trains (``client.institution.fit_round``), and the coordinator
    warns when the bound binds (``server.aggregation.clipping_warning``).
    """

    enabled: bool = field(default=True, metadata=_key("secure-aggregation"))
    num_shares: float = field(default=1.0, metadata=_key("secagg-num-shares"))
    reconstruction_threshold: float = field(default=0.67, metadata=_key("secagg-reconstruction-threshold"))
    clipping_range: float = field(default=8.0, metadata=_key("secagg-clipping-range"))
    quantization_range: int = field(default=4194304, metadata=_key("secagg-quantization-range"))
    modulus_range: int = field(default=4294967296, metadata=_key("secagg-modulus-range"))
    # The largest aggregation weight: an institution with more training records weighs this much.
    # Below it, weights are record counts quantized to quantization_range * records / max_weight
    # levels, so a larger maximum costs the small institutions precision.
    max_weight: float = field(default=1000.0, metadata=_key("secagg-max-weight"))
    timeout: float = field(default=0.0, metadata=_key("secagg-timeout"))

    def __post_init__(self) -> None:
        _check(self.num_shares > 0, "secagg-num-shares", self.num_shares, "> 0")
        _check(
            self.reconstruction_threshold > 0,
            "secagg-reconstruction-threshold",
            self.reconstruction_threshold,
            "> 0",
        )
        _check(self.clipping_range > 0, "secagg-clipping-range", self.clipping_range, "> 0")
        _check(
            0 < self.quantization_range < self.modulus_range,
            "secagg-quantization-range",
            self.quantization_range,
            "> 0 and below secagg-modulus-range",
        )
        _check(
            self.modulus_range & (self.modulus_range - 1) == 0 and self.modulus_range <= 2**32,
            "secagg-modulus-range",
            self.modulus_range,
            "a power of two <= 2**32",
        )
        _check(
            1 <= self.max_weight <= self.quantization_range,
            "secagg-max-weight",
            self.max_weight,
            ">= 1 (the largest aggregation weight) and at most secagg-quantization-range (so that an "
            "institution of one record still gets a quantized weight above 0)",
        )
        _check(self.timeout >= 0, "secagg-timeout", self.timeout, ">= 0 (0: wait forever)")

    def aggregation_weight(self, records: int) -> int:
        """An institution's weight in the aggregate: its training records, at most ``max_weight``.

        Its ratio ``weight / max_weight`` never exceeds 1, so SecAgg+'s weighted sum
        cannot overflow whatever the institution's size, and an institution at or
        below the maximum is weighted (and quantized) exactly by its record count.
        """
        return min(records, math.floor(self.max_weight))

    @staticmethod
    def _count_or_fraction(value: float) -> int | float:
        """Flower reads an int as a count and a float as a fraction of the clients."""
        return int(value) if value > 1 and float(value).is_integer() else float(value)

    def workflow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``flwr.server.workflow.SecAggPlusWorkflow``."""
        return {
            "num_shares": self._count_or_fraction(self.num_shares),
            "reconstruction_threshold": self._count_or_fraction(self.reconstruction_threshold),
            "max_weight": self.max_weight,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "timeout": self.timeout or None,
        }


@dataclass(frozen=True)
class DataSettings:
    """Which data a simulated federation uses and how it is split."""

    dataset: str = field(default="breast-cancer", metadata=_key("dataset"))
    partition: str = field(default="iid", metadata=_key("partition"))
    test_fraction: float = field(default=0.2, metadata=_key("test-fraction"))
    # A deployed federation's schema file (on the coordinator); empty: the built-in dataset's.
    schema_path: str = field(default="", metadata=_key("schema-path"))

    def __post_init__(self) -> None:
        _check(0 < self.test_fraction < 1, "test-fraction", self.test_fraction, "in (0, 1)")
        if self.dataset not in DATASETS and not self.dataset.lower().endswith(TABLE_SUFFIXES):
            raise DATASETS.unknown(self.dataset, alternative="a CSV/Parquet file")
        if self.partition.partition(":")[0] not in PARTITIONERS:
            raise PARTITIONERS.unknown(self.partition)


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, grouped; the single source of defaults."""

    rounds: int = field(default=8, metadata=_key("num-server-rounds"))
    seed: int = field(default=42, metadata=_key("seed"))
    fraction_fit: float = field(default=1.0, metadata=_key("fraction-fit"))
    # Institutions evaluating the global model each round; below 1, a fresh sample every round.
    fraction_evaluate: float = field(default=1.0, metadata=_key("fraction-evaluate"))
    min_institutions: int = field(default=2, metadata=_key("min-institutions"))
    out_dir: str = field(default="", metadata=_key("out-dir"))
    state_root: str = field(default="", metadata=_key("state-root"))
    simulation_policy: str = field(default="", metadata=_key("simulation-policy"))
    # A run directory to continue from its last completed round (same run, same name).
    resume_from: str = field(default="", metadata=_key("resume-from"))
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "num-server-rounds", self.rounds, "an integer >= 1")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(0 < self.fraction_fit <= 1, "fraction-fit", self.fraction_fit, "in (0, 1]")
        _check(0 < self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "in (0, 1]")
        _check(self.min_institutions >= 1, "min-institutions", self.min_institutions, "an integer >= 1")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Build settings from Flower's run config or a FitIns config.

        Keys that are absent take their default; unknown keys are ignored, so a
        config may carry other entries (the server round, say).
        """
        return _from_config(cls, config)

    def to_config(self) -> dict[str, Scalar]:
        """Flatten to Flower's run-config keys (the inverse of ``from_config``)."""
        return _to_config(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunSettings:
        """A copy with some run-config keys replaced."""
        return RunSettings.from_config({**self.to_config(), **overrides})


def _from_config(cls: type[_T], config: Mapping[str, Any]) -> _T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if "key" not in f.metadata:
            kwargs[f.name] = _from_config(f.default_factory, config)  # type: ignore[arg-type]
            continue
        key = f.metadata["key"]
        if key not in config:
            continue
        kwargs[f.name] = _coerce(key, config[key], f.type)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - a programming error, not user input
        raise ConfigError(str(err)) from err


def _coerce(key: str, value: Any, type_name: Any) -> Scalar:
    """Convert a config value to the declared type, refusing silent changes."""
    name = type_name if isinstance(type_name, str) else type_name.__name__
    if name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ConfigError(f"'{key}' must be true or false. Found {value!r}.")
    if name == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"'{key}' must be an integer. Found {value!r}.")
        if not float(value).is_integer():
            raise ConfigError(f"'{key}' must be an integer. Found {value!r}.")
        return int(value)
    if name == "float":
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number. Found {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number. Found {value!r}.") from None
        if math.isnan(number):
            raise ConfigError(f"'{key}' must be a number. Found {value!r}.")
        return number
    return str(value)


def _to_config(obj: object) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if "key" in f.metadata:
            out[f.metadata["key"]] = value
        else:
            out.update(_to_config(value))
    return out


__all__ = [
    "DataSettings",
    "PrivacySettings",
    "RunSettings",
    "SecAggSettings",
    "TrainSettings",
]
