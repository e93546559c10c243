"""Typed, self-validating run settings, who owns them, and their one adapter to Flower's flat config.

Two owners:

- ``Proposal``: what the coordinator proposes to every institution (rounds, seed,
  fractions, training, privacy, SecAgg+, data). It travels in each FitIns and
  EvaluateIns; an institution parses it once (``Proposal.from_config``) and checks
  it against its own policy.
- ``RunSettings``: the coordinator's run config, the proposal plus the
  coordinator's own settings (``LOCAL_KEYS``): where its run directory is, the run
  it resumes, its schema file, and in simulation where the institutions it plays
  keep their state and policies. These never go to an institution in a message.

Every setting has exactly one key in ``[tool.flwr.app.config]`` (pyproject.toml)
and one default, written here. ``tests/common/test_settings.py`` checks that the
defaults in pyproject.toml are these. Values from people (TOML files, ``--config``,
policy files) are coerced once (``coerce``) and their keys checked once
(``check_keys``); code changes settings with ``dataclasses.replace``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, TypeVar

from fedsilo.common.accounting import ACCOUNTANT_OF_RECORD, ACCOUNTANTS, ADD_REMOVE, NEIGHBOURING
from fedsilo.common.errors import ConfigError
from fedsilo.common.registry import ACTIVATIONS, DATASETS, MODELS, PARTITIONERS, TABLE_SUFFIXES

Scalar = bool | int | float | str
_T = TypeVar("_T")
_P = TypeVar("_P", bound="Proposal")


# Opacus per-sample gradient modes that handle every batch DP-SGD draws. "ew" (expanded
# weights) is left out: in Opacus 1.6 it raises on the empty batches Poisson sampling draws.
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")
DP_MODES = ("local", "distributed")


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
    # 0: the recipe's (fedsilo.common.training.auto_batch_size / auto_learning_rate), from public facts only.
    batch_size: int = field(default=0, metadata=_key("batch-size"))
    learning_rate: float = field(default=0.0, metadata=_key("learning-rate"))
    momentum: float = field(default=0.9, metadata=_key("momentum"))
    # The model: "linear" (logistic / softmax regression, any schema), "mlp" (TabularMLP, any
    # schema) or "cnn" (SmallCNN, 28x28 images only); see fedsilo.common.models.
    model: str = field(default="linear", metadata=_key("model"))
    # Hidden activation: "relu", or "tanh" (the tempered sigmoid of Papernot et al., AAAI 2021).
    activation: str = field(default="relu", metadata=_key("activation"))
    hidden_layers: str = field(default="64", metadata=_key("hidden-layers"))  # the MLP's only
    # How Opacus computes per-sample gradient norms: the same clipping and noise, the same
    # privacy, different speed. "ghost" (ghost clipping) measured fastest on the MLP
    # (bench/dp_overhead.json) and within 4% of "hooks" on the CNN.
    grad_sample_mode: str = field(default="ghost", metadata=_key("grad-sample-mode"))
    # Distributed DP only (``dp-mode = "distributed"``: one aggregated DP-SGD step a round). Each
    # record is in a round's batch with this probability (0: ``distributed_sample_rate``, the rate
    # whose calibrated noise per expected record is least and fits SecAgg+'s range, from epsilon,
    # delta, the rounds and the model's size). The
    # coordinator steps with SGD at server-learning-rate (0: the recipe's, from public facts) and
    # server-momentum.
    sample_rate: float = field(default=0.0, metadata=_key("sample-rate"))
    server_learning_rate: float = field(default=0.0, metadata=_key("server-learning-rate"))
    server_momentum: float = field(default=0.9, metadata=_key("server-momentum"))

    def __post_init__(self) -> None:
        _check(0 <= self.sample_rate <= 1, "sample-rate", self.sample_rate, "in (0, 1] (0: the recipe's)")
        _check(self.server_learning_rate >= 0, "server-learning-rate", self.server_learning_rate, ">= 0 (0: auto)")
        _check(0 <= self.server_momentum < 1, "server-momentum", self.server_momentum, "in [0, 1)")
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


def dp_enabled(*, target_epsilon: float, noise_multiplier: float) -> bool:
    """Whether training is DP-SGD: a fixed noise multiplier, or a finite target epsilon (inf: no DP)."""
    return noise_multiplier > 0 or math.isfinite(target_epsilon)


@dataclass(frozen=True)
class PrivacySettings:
    """DP-SGD settings proposed for a run.

    ``noise_multiplier > 0`` fixes the noise; otherwise the noise is calibrated so
    that the planned rounds spend ``target_epsilon``. ``target_epsilon = inf`` with
    no noise multiplier turns DP off (a non-private baseline, epsilon = inf).
    ``max_epsilon`` is the lifetime budget of a dataset; 0 means "the target".
    ``accountant`` calibrates the noise to the target (see ``fedsilo.common.accounting``),
    for the neighbouring relation ``neighbouring``.
    """

    target_epsilon: float = field(default=2.0, metadata=_key("target-epsilon"))
    noise_multiplier: float = field(default=0.0, metadata=_key("noise-multiplier"))
    delta: float = field(default=1e-5, metadata=_key("delta"))
    max_grad_norm: float = field(default=1.0, metadata=_key("max-grad-norm"))
    max_epsilon: float = field(default=0.0, metadata=_key("max-epsilon"))
    # The accountant that calibrates the noise: "pld" (tight; the ledger's and the budgets'
    # accountant of record) or "rdp" (Opacus's Renyi DP: looser, so more noise for a target).
    accountant: str = field(default=ACCOUNTANT_OF_RECORD, metadata=_key("accountant"))
    # "local": each institution adds the full DP-SGD noise to its own update (local steps allowed).
    # "distributed": each round is one DP-SGD step over the union, each institution adding only its
    # share of the noise inside the SecAgg+ sum (Skellam; see fedsilo.common.distributed_dp).
    mode: str = field(default="local", metadata=_key("dp-mode"))
    # The neighbouring relation the noise is calibrated for: "add-remove" (one record added or
    # removed; the figure Opacus reports) or "replace-one" (one record replaced: what holds with
    # the record count public). `fedsilo-server init` writes "replace-one" (DEPLOYED_RUN_DEFAULTS).
    # An institution accounts by its own policy's relation where it has one.
    neighbouring: str = field(default=ADD_REMOVE, metadata=_key("neighbouring"))

    def __post_init__(self) -> None:
        _check(self.mode in DP_MODES, "dp-mode", self.mode, _one_of(DP_MODES))
        _check(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "> 0 (inf: no DP)")
        _check(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, ">= 0")
        _check(0 < self.delta < 1, "delta", self.delta, "in (0, 1)")
        _check(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "> 0")
        _check(self.max_epsilon >= 0, "max-epsilon", self.max_epsilon, ">= 0 (0: the target)")
        _check(self.accountant in ACCOUNTANTS, "accountant", self.accountant, _one_of(tuple(ACCOUNTANTS)))
        _check(self.neighbouring in NEIGHBOURING, "neighbouring", self.neighbouring, _one_of(NEIGHBOURING))

    @property
    def enabled(self) -> bool:
        """Whether local training uses DP-SGD at all."""
        return dp_enabled(target_epsilon=self.target_epsilon, noise_multiplier=self.noise_multiplier)

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
    that range while it trains (``fedsilo.client.institution.fit_round``), and the coordinator
    warns when the bound binds (``fedsilo.server.aggregation.clipping_warning``).
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
    # Seconds a SecAgg+ stage, a plain FedAvg fit or an evaluation waits for replies (0: for ever).
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
    """Which data a simulated federation uses and how each institution splits its records."""

    dataset: str = field(default="breast-cancer", metadata=_key("dataset"))
    partition: str = field(default="iid", metadata=_key("partition"))
    test_fraction: float = field(default=0.2, metadata=_key("test-fraction"))
    # The federation schema's fingerprint (``fedsilo.common.schema.Schema.fingerprint``), filled in
    # by the coordinator from its schema file when it opens a run (empty: unknown). An institution
    # whose own schema file has another fingerprint refuses to train or evaluate, and says why.
    schema_fingerprint: str = field(default="", metadata=_key("schema-fingerprint"))

    def __post_init__(self) -> None:
        _check(0 < self.test_fraction < 1, "test-fraction", self.test_fraction, "in (0, 1)")
        _check(
            self.schema_fingerprint == ""
            or (len(self.schema_fingerprint) == 16 and all(c in "0123456789abcdef" for c in self.schema_fingerprint)),
            "schema-fingerprint",
            self.schema_fingerprint,
            "empty (unknown) or 16 lowercase hex digits (fedsilo.common.schema.Schema.fingerprint)",
        )
        if self.dataset not in DATASETS and not self.dataset.lower().endswith(TABLE_SUFFIXES):
            raise DATASETS.unknown(self.dataset, alternative="a CSV/Parquet file")
        if self.partition.partition(":")[0] not in PARTITIONERS:
            raise PARTITIONERS.unknown(self.partition)


@dataclass(frozen=True)
class Proposal:
    """What the coordinator proposes to every institution each round; the institution checks it."""

    rounds: int = field(default=8, metadata=_key("num-server-rounds"))
    seed: int = field(default=42, metadata=_key("seed"))
    fraction_fit: float = field(default=1.0, metadata=_key("fraction-fit"))
    # Institutions evaluating the global model each round; below 1, a fresh sample every round.
    fraction_evaluate: float = field(default=1.0, metadata=_key("fraction-evaluate"))
    min_institutions: int = field(default=2, metadata=_key("min-institutions"))
    # The global model is evaluated every this many rounds (and after the last).
    eval_every: int = field(default=1, metadata=_key("eval-every"))
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    data: DataSettings = field(default_factory=DataSettings)
    # Private federation-wide evaluation (fedsilo.common.secure_evaluation): held-out counts summed
    # under SecAgg+ with Skellam noise, at a tenth of target-epsilon. Off by default here (simulations
    # keep their numbers); `fedsilo-server init` writes it on into a deployed federation's [run].
    secure_evaluation: bool = field(default=False, metadata=_key("secure-evaluation"))

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "num-server-rounds", self.rounds, "an integer >= 1")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(0 < self.fraction_fit <= 1, "fraction-fit", self.fraction_fit, "in (0, 1]")
        _check(0 < self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "in (0, 1]")
        _check(self.min_institutions >= 1, "min-institutions", self.min_institutions, "an integer >= 1")
        _check(self.eval_every >= 1, "eval-every", self.eval_every, "an integer >= 1")
        if self.distributed and not self.secagg.enabled:
            raise ConfigError(
                "'dp-mode' = \"distributed\" needs 'secure-aggregation' = true: each institution adds only a share "
                "of the noise, which protects its records only inside the secure sum"
            )
        if self.secure_evaluation and not self.secagg.enabled:
            raise ConfigError(
                "'secure-evaluation' = true needs 'secure-aggregation' = true: the institutions' counts are "
                "protected only inside the secure sum"
            )
        if self.secure_evaluation and self.privacy.noise_multiplier > 0:
            raise ConfigError(
                "'secure-evaluation' = true takes a tenth of 'target-epsilon' for its noise, and a fixed "
                f"'noise-multiplier' ({self.privacy.noise_multiplier:g}) leaves the target unused: set "
                "noise-multiplier = 0 and target-epsilon, or turn secure-evaluation off"
            )
        if self.secure_evaluation:
            from fedsilo.common.distributed_dp import _secagg_problems

            if problems := _secagg_problems(self.secagg.clipping_range, self.secagg.quantization_range):
                raise ConfigError(
                    "'secure-evaluation' = true needs integer counts to pass through SecAgg+ exactly: "
                    + "; ".join(problems)
                )

    @property
    def distributed(self) -> bool:
        """Whether rounds are distributed DP's aggregated DP-SGD steps (``dp-mode = "distributed"``)."""
        return self.privacy.mode == "distributed"

    @property
    def sample_rate(self) -> float:
        """Distributed DP's sample rate for a model of one coordinate, no range limit (``sample_rate_for``)."""
        return self.sample_rate_for(dim_padded=1, bits=62)

    def sample_rate_for(self, *, dim_padded: int, bits: int) -> float:
        """Distributed DP's per-round sample rate: the setting, else ``distributed_sample_rate``'s.

        ``dim_padded`` (the rotated model's length) and ``bits`` (SecAgg+'s integer width) bound
        how much noise an institution's share can carry (``fedsilo.common.aggregation.plan_distributed``
        passes them). Outside distributed mode (where no round reads it): local-epochs /
        num-server-rounds, at most 1.
        """
        if self.train.sample_rate:
            return self.train.sample_rate
        if not self.distributed:
            return min(1.0, self.train.local_epochs / self.rounds)
        privacy = self.privacy
        if privacy.noise_multiplier > 0 or not math.isfinite(privacy.target_epsilon):
            return 1.0  # nothing to calibrate: every record every round, the least noise per record
        from fedsilo.common.secure_evaluation import evaluation_events

        return distributed_sample_rate(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            rounds=self.rounds,
            dim_padded=dim_padded,
            bits=bits,
            neighbouring=privacy.neighbouring,
            alongside=evaluation_events(self),
        )

    def evaluates(self, server_round: int) -> bool:
        """Whether the global model is evaluated after ``server_round`` (every eval-every rounds, and the last)."""
        return server_round % self.eval_every == 0 or server_round >= self.rounds

    @classmethod
    def from_config(cls: type[_P], config: Mapping[str, Any], *, source: str | None = None) -> _P:
        """Parse Flower's run config, a FitIns config or a person's settings.

        Keys that are absent take their default. Without ``source`` other keys are
        ignored (a FitIns also carries the server round); with it, each key must be
        one of this class's (``check_keys``), and errors name ``source``.
        """
        if source is not None:
            check_keys(config, cls, source=source)
        try:
            return _from_config(cls, config)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}" if source else str(err)) from None

    def to_config(self) -> dict[str, Scalar]:
        """Flatten to Flower's config keys (the inverse of ``from_config``)."""
        return _to_config(self)

    @property
    def proposal(self) -> Proposal:
        """Only what an institution receives (a ``RunSettings`` without the coordinator's own settings)."""
        return Proposal(**{f.name: getattr(self, f.name) for f in fields(Proposal)})

    def with_overrides(self: _P, overrides: Mapping[str, Any]) -> _P:
        """A copy with some config keys replaced; an unknown key is an error.

        For values people give by key (``--config``, a sweep's ``[settings]``, tests);
        code uses ``dataclasses.replace``.
        """
        check_keys(overrides, type(self), source="overrides")
        return type(self).from_config({**self.to_config(), **overrides})


@dataclass(frozen=True)
class RunSettings(Proposal):
    """The coordinator's run config: the proposal, then its own settings, which stay with it."""

    # The run directory (empty: runs/<time>-<dataset> in the working directory).
    out_dir: str = field(default="", metadata=_key("out-dir"))
    # A run directory to continue from its last completed round (same run, same name).
    resume_from: str = field(default="", metadata=_key("resume-from"))
    # The federation schema file (empty: the built-in dataset's). In simulation, also the
    # schema of a CSV/Parquet dataset that the simulated institutions read.
    schema_path: str = field(default="", metadata=_key("schema-path"))
    # Simulation only (the researcher plays every institution): where the institutions keep their
    # state (ledgers) and their privacy policy file. A deployed institution takes neither from
    # the coordinator: its node config names its state directory and policy.
    state_root: str = field(default="", metadata=_key("state-root"))
    simulation_policy: str = field(default="", metadata=_key("simulation-policy"))

    @classmethod
    def of(cls, proposal: Proposal, **local: str) -> RunSettings:
        """A proposal with the coordinator's (or, simulated, the researcher's) own settings."""
        values: dict[str, Any] = {f.name: getattr(proposal, f.name) for f in fields(Proposal)}
        return cls(**values | local)

    @property
    def simulated(self) -> bool:
        """Whether the coordinator plays the institutions too (the simulation engines set ``state_root``)."""
        return bool(self.state_root)

    def institution_config(self) -> dict[str, Scalar]:
        """What each FitIns and EvaluateIns carries: the proposal, flattened once.

        In a simulation the researcher plays every institution, and Flower's simulation
        engine gives them nothing but the message: it also carries where they keep their
        state and find their policy and schema (``SIMULATED_KEYS``). A deployment's
        messages carry the proposal alone.
        """
        config = self.proposal.to_config()
        if self.simulated:
            config.update({k: v for k, v in self.to_config().items() if k in SIMULATED_KEYS})
        return config


# The sample rates distributed DP's default chooses among: 1, 1/2, ..., 1/1024.
DISTRIBUTED_SAMPLE_RATES = tuple(2.0**-k for k in range(11))


@lru_cache(maxsize=64)
def distributed_sample_rate(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    dim_padded: int = 1,
    bits: int = 62,
    neighbouring: str = "add-remove",
    alongside: tuple[Any, ...] = (),
) -> float:
    """Distributed DP's default sample rate: the candidate whose step carries the least noise per record.

    A round's averaged gradient carries noise ``sigma(q) * C / (q * N)`` over a union of
    ``N`` records, where ``sigma(q)`` is the noise multiplier the Skellam accountant
    (``fedsilo.common.accounting.calibrate_skellam_noise``: Agarwal et al. Cor. 3.6 under
    the binomial Poisson-subsampling bound of ``subsampled_rdp``) needs for ``rounds`` rounds at rate ``q`` to
    spend ``target_epsilon``. ``N`` is the same for every ``q``, so the rate of
    ``DISTRIBUTED_SAMPLE_RATES`` with the least ``sigma(q) / q`` gives the least noise in
    every step whatever the table's size (the "total amount of noise" of Sander, Stock and
    Sablayrolles, ICML 2023, at fixed steps). Public facts only: epsilon, delta and the
    rounds; never the records. The model's size moves the Skellam bound by under 0.1%
    (``s * C`` grows with it), so the candidates are ranked at one coordinate; but it
    bounds the noise: a candidate is taken only if an institution adding the whole noise
    itself (min-honest 1, the largest share) stays in SecAgg+'s ``bits``-bit range for a
    model of ``dim_padded`` rotated coordinates (``out_of_range_probability`` at most
    ``MAX_OUT_OF_RANGE``, where an institution would refuse the round); if none does, the
    candidate with the least noise (and the refusals say why). ``neighbouring`` and
    ``alongside`` (the planned secure evaluations' events) are the calibration's, so the
    range check sees the noise the run will carry (replace-one doubles it at ``q = 1``).

    For the Gaussian, ``sigma(q) / q`` falls as ``q`` grows (subsampling amplifies
    privacy at best linearly in ``q``), and the Skellam accounting keeps that order (it
    costs 1.08-1.11x the Gaussian's PLD noise at every rate): for epsilon 0.5-8 and
    8-2,048 rounds the choice is 1 (every record every round, so a round costs an epoch
    of gradients) where the range allows it (at epsilon 2, up to 4,096 rotated
    coordinates over 256 rounds), else the largest rate that fits (``sigma(q) / q`` is
    within a few percent of q = 1's down to 1/8). Pure, memoized.
    """
    from fedsilo.common import distributed_dp as ddp
    from fedsilo.common.accounting import calibrate_skellam_noise

    scale = ddp.scale_for(dim_padded=1, max_grad_norm=1.0)
    sigmas: dict[float, float] = {}  # the calibrated candidates: a rate no noise brings to the target is left out
    for q in DISTRIBUTED_SAMPLE_RATES:
        with contextlib.suppress(ConfigError):  # if none calibrates, the plan says so
            sigmas[q] = calibrate_skellam_noise(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=q,
                steps=rounds,
                scale=scale,
                max_grad_norm=1.0,
                dim_padded=1,
                neighbouring=neighbouring,
                alongside=alongside,
            )
    if not sigmas:
        return DISTRIBUTED_SAMPLE_RATES[0]

    def fits(q: float) -> bool:
        own = (ddp.scale_for(dim_padded=dim_padded, max_grad_norm=1.0) * sigmas[q]) ** 2  # (s sigma C)^2
        return ddp.out_of_range_probability(variance=own, bits=bits, dim_padded=dim_padded) <= ddp.MAX_OUT_OF_RANGE

    ranked = sorted(sigmas, key=lambda q: (sigmas[q] / q, -q))  # least noise per expected record first
    return next((q for q in ranked if fits(q)), min(ranked, key=sigmas.__getitem__))


def config_keys(cls: type[Proposal]) -> tuple[str, ...]:
    """Every config key of a settings class."""
    return tuple(cls().to_config())


def check_keys(
    config: Iterable[str],
    cls: type[Proposal],
    *,
    source: str,
    fixed: Iterable[str] = (),
    fixed_by: str = "the coordinator chooses these paths",
) -> None:
    """The one unknown-key check: every key is a setting of ``cls``, and none is one the caller chooses.

    ``fixed`` are keys the caller sets itself (``fixed_by`` says who); a ``Proposal``
    never takes the coordinator's own settings (``LOCAL_KEYS``).
    """
    known = set(config_keys(cls))
    chosen = set(fixed) | (set(LOCAL_KEYS) - known)
    keys = set(config)
    if managed := sorted(keys & chosen):
        raise ConfigError(f"{source} may not set {managed}: {fixed_by}")
    if unknown := sorted(keys - known):
        listed = ", ".join(sorted(known - chosen))
        raise ConfigError(f"{source}: unknown run setting(s) {unknown}; check the spelling (known: {listed})")


def _from_config(cls: type[_T], config: Mapping[str, Any]) -> _T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if "key" not in f.metadata:
            kwargs[f.name] = _from_config(f.default_factory, config)  # type: ignore[arg-type]
            continue
        key = f.metadata["key"]
        if key not in config:
            continue
        kwargs[f.name] = coerce(key, config[key], f.type)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - a programming error, not user input
        raise ConfigError(str(err)) from err


def coerce(key: str, value: Any, kind: Any, *, source: str = "") -> Scalar:
    """Convert a config value to its declared type (``bool``, ``int``, ``float``, ``str``, or ``X | None``).

    The one coercion of values people write (settings and policies): it refuses
    silent changes (2.5 to an integer, "maybe" to a boolean) and names ``key``,
    the value and, when given, ``source``.
    """
    name = (kind if isinstance(kind, str) else kind.__name__).removesuffix(" | None")
    where = f"{source}: " if source else ""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}'{key}' must be {expected}. Found {value!r}.")

    if name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise bad("true or false")
    if name == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
            raise bad("an integer")
        return int(value)
    if name == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if math.isnan(number):
            raise bad("a number")
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


# The coordinator's own settings' keys: never in a message to an institution, never in federation.toml.
LOCAL_KEYS = tuple(k for k in RunSettings().to_config() if k not in Proposal().to_config())
# Of those, what simulated institutions read (``RunSettings.institution_config``).
SIMULATED_KEYS = ("schema-path", "state-root", "simulation-policy")

__all__ = [
    "DISTRIBUTED_SAMPLE_RATES",
    "DP_MODES",
    "LOCAL_KEYS",
    "SIMULATED_KEYS",
    "DataSettings",
    "PrivacySettings",
    "Proposal",
    "RunSettings",
    "SecAggSettings",
    "TrainSettings",
    "check_keys",
    "coerce",
    "distributed_sample_rate",
    "dp_enabled",
]
