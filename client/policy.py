"""An institution's privacy policy: limits that no coordinator can override.

The policy lives with the institution (a TOML file, or its SuperNode's node
config). Every round the coordinator proposes training settings; they are
checked against the policy before anything trains, and a violation refuses the
round with a reason the coordinator sees. Nothing is silently clamped.

A policy file::

    max-epsilon = 3.0            # lifetime budget for this dataset
    delta = 1e-5                 # largest delta accepted; epsilon is accounted at it
    min-noise-multiplier = 0.8   # refuse rounds with less noise than this
    max-grad-norm = 1.0          # refuse larger per-record clipping norms
    max-local-epochs = 5         # refuse more local epochs per round
    share-eval-metrics = true    # false: evaluation rounds report nothing (deployed default)
    require-secure-aggregation = true  # refuse rounds whose update would leave unmasked (deployed default)
    min-secagg-threshold = 2     # refuse a SecAgg+ reconstruction threshold below this count (deployed default 2)
    min-secagg-threshold-fraction = 0.51  # ... or below this fraction of the shares (deployed default 0.51)
    min-round-size = 3           # refuse SecAgg+ rounds of fewer institutions (deployed default 3)
    min-honest = 1               # distributed DP: sampled institutions counted on to add their noise share
    test-fraction = 0.2          # the share of its records it holds out for evaluation (deployed default 0.2)
    min-eval-records = 50        # share no evaluation over fewer held-out records (deployed default 50)
    one-evaluation-per-trained-round = true  # evaluate once per round, only a round it trained in (deployed default)
    neighbouring = "replace-one" # the neighbouring relation epsilon is accounted for (deployed default replace-one)
    secure-evaluation = true     # false: add no counts to a secure evaluation (its noise share still goes)

    [institutions.hospital-2]    # simulations only: overrides for one institution
    max-epsilon = 1.0

What the SecAgg+ keys protect (``fedsilo.client.mods.check_secagg_stage`` checks every
stage): SecAgg+ (Bell et al., CCS 2020) hides an update only if the coordinator
cannot rebuild its masks. Each institution splits its mask seed and its key into
one share per neighbour, any ``threshold`` of which rebuild the secret; at
unmasking each neighbour hands over one kind of share per node. A threshold of a
strict majority of the shares (``min-secagg-threshold-fraction = 0.51``) means no
coordinator can collect enough of both kinds for one node; a threshold of at
least 2 (``min-secagg-threshold``) means the institution's own share is never
enough. Whatever the policy, the institution also refuses a neighbour list
without another institution or without itself, shares from nodes outside its
neighbours, a node listed both active and dropped, a node listed twice, and a
second unmasking for one setup.

``min-round-size`` is the smallest round the institution takes part in: the
sampled institutions at setup, its neighbours, the institutions it shares keys
with and those active at unmasking must each number at least that many. A
coordinator that admits one node of its own can otherwise make a round of that
node and one institution and subtract its own update from the sum; with 3, it
needs two nodes of its own besides the institution (Sybil nodes the coordinator
admits are counted as institutions: nothing in SecAgg+ tells them apart).

``min-honest`` matters only with ``dp-mode = "distributed"``: of a round's ``n`` sampled
institutions, SecAgg+ lets up to ``n - t`` drop out (``t``: the reconstruction
threshold), so an institution that counts on ``min-honest`` honest ones can rely on
``max(1, min-honest - (n - t))`` shares, its own included, and adds enough noise itself
that those shares alone carry the full noise (``fedsilo.common.distributed_dp.noise_share``).
With 1 it adds the full noise alone: the guarantee needs nobody else. A round that samples
fewer institutions than ``min-honest`` is refused.

The evaluation keys matter only with ``share-eval-metrics = true``: the scores an
institution shares are computed on its held-out records, which DP-SGD does not protect,
so a coordinator that crafts the model it asks to be evaluated can read facts about
those records out of the scores (a constant model's accuracy is a class's share; a
model confident everywhere but on records like a chosen one makes the loss count them).
What is held out is the institution's to decide: ``test-fraction`` (a deployed
institution's own, 0.2 unless its policy says otherwise; the coordinator's
``test-fraction`` applies to simulations only) of its records, each chosen by a keyed
hash under its secret (``fedsilo.client.institution.split_holdout``), so the coordinator
can neither shrink the held-out set to one chosen record nor pick its members.
``min-eval-records`` (deployed 50; 1 otherwise) is the smallest held-out set it shares
scores over: below it, it shares nothing, so no score is ever a fact about a handful of
records. ``one-evaluation-per-trained-round`` (deployed default) bounds how often it
answers: at most once per round of a run (``fedsilo.client.evaluations``), and only for a
round its ledger shows it trained in, so every evaluation follows a round it trained
and recorded, and a new run name or round number alone buys none (its budget bounds
those rounds only as far as each costs epsilon: very noisy rounds are cheap).

``neighbouring`` is the relation every epsilon the institution computes is accounted for:
its budget check, the epsilon in its replies and ``fedsilo-client budget``'s headline
figure. ``"replace-one"`` (one record replaced by another; the deployed default) is what
holds when the record count is public, as it is in fedsilo (the aggregation weight, the
sample rate and steps, distributed DP's ``records``); ``"add-remove"`` (one record added or
removed) is the figure Opacus reports, smaller for the same noise. Without the key (in a
simulation) the institution accounts for the proposal's ``neighbouring``; with it, the
proposal's is ignored, so a coordinator cannot make a replace-one institution account
add/remove. The coordinator's proposal only calibrates the noise (``PrivacySettings``).
``secure-evaluation`` (default true) decides whether the institution's held-out counts
enter a run's private federation-wide evaluation (``secure-evaluation`` in the proposal;
``fedsilo.common.secure_evaluation``): noisy counts summed under SecAgg+, each evaluation
booked in its ledger and checked against its budget. With false it adds zero counts, books
nothing and still sends its noise share, so the others' sum stays as noisy as planned.
``min-eval-records`` applies there too (below it: zero counts, the evaluation still booked,
so what it reports does not show its held-out set's size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.common.accounting import NEIGHBOURING, REPLACE_ONE
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import PrivacySettings, Proposal, coerce
from fedsilo.common.tomlfile import read_toml

if TYPE_CHECKING:  # the SecAgg+ mod reads policies without importing torch
    from fedsilo.common.training import RoundPlan

KEYS = {
    "max-epsilon": "max_epsilon",
    "delta": "delta",
    "min-noise-multiplier": "min_noise_multiplier",
    "max-grad-norm": "max_grad_norm",
    "max-local-epochs": "max_local_epochs",
    "share-eval-metrics": "share_eval_metrics",
    "require-secure-aggregation": "require_secure_aggregation",
    "min-secagg-threshold": "min_secagg_threshold",
    "min-secagg-threshold-fraction": "min_secagg_threshold_fraction",
    "min-round-size": "min_round_size",
    "min-honest": "min_honest",
    "test-fraction": "test_fraction",
    "min-eval-records": "min_eval_records",
    "one-evaluation-per-trained-round": "one_evaluation_per_trained_round",
    "neighbouring": "neighbouring",
    "secure-evaluation": "secure_evaluation",
}
# A deployed institution's defaults where its policy is silent (``deployed_policy``).
DEPLOYED_DEFAULTS = {
    "share-eval-metrics": False,
    "require-secure-aggregation": True,
    "min-secagg-threshold": 2,
    "min-secagg-threshold-fraction": 0.51,
    "min-round-size": 3,
    # Evaluation: its own held-out share, no scores over fewer than 50 records, one evaluation
    # per round it trained in (see the module's docstring).
    "test-fraction": 0.2,
    "min-eval-records": 50,
    "one-evaluation-per-trained-round": True,
    # The record count is public (see the module's docstring): account for replace-one neighbours.
    "neighbouring": REPLACE_ONE,
}


@dataclass(frozen=True)
class PrivacyPolicy:
    """Limits an institution sets for itself; ``None`` means "no limit of this kind"."""

    max_epsilon: float | None = None
    delta: float | None = None
    min_noise_multiplier: float = 0.0
    max_grad_norm: float | None = None
    max_local_epochs: int | None = None
    share_eval_metrics: bool = True
    require_secure_aggregation: bool = False
    min_secagg_threshold: int = 1  # deployed default 2: its own share never rebuilds its secret
    min_secagg_threshold_fraction: float = 0.0  # deployed default 0.51: a strict majority of the shares
    min_round_size: int = 2  # a secure sum needs two; deployed default 3
    # Distributed DP: how many sampled institutions (itself included) this one counts on to add their
    # noise share and not to collude with the coordinator. 1: it adds the full noise itself.
    min_honest: int = 1
    # Evaluation. The held-out share of its records (None: the run's test-fraction, simulations
    # only; deployed default 0.2), the smallest held-out set it shares scores over (deployed
    # default 50), and whether it evaluates at most once per round, and only a round it trained in.
    test_fraction: float | None = None
    min_eval_records: int = 1
    one_evaluation_per_trained_round: bool = False
    # The neighbouring relation it accounts for ("add-remove" or "replace-one"; deployed default
    # "replace-one"); None: the proposal's (simulations only).
    neighbouring: str | None = None
    # Whether its held-out counts enter a secure (noisy, summed) federation-wide evaluation.
    secure_evaluation: bool = True
    source: str = "policy"

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, expected: str) -> ConfigError:
            return ConfigError(f"{self.source}: '{key}' must be {expected}. Found {value!r}.")

        if self.max_epsilon is not None and not (self.max_epsilon > 0):
            raise bad("max-epsilon", self.max_epsilon, "a number > 0 (inf for no limit)")
        if self.delta is not None and not (0 < self.delta < 1):
            raise bad("delta", self.delta, "in (0, 1), typically below 1 / (number of records)")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise bad("min-noise-multiplier", self.min_noise_multiplier, "a finite number >= 0")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise bad("max-grad-norm", self.max_grad_norm, "a finite number > 0")
        if self.max_local_epochs is not None and self.max_local_epochs < 1:
            raise bad("max-local-epochs", self.max_local_epochs, "an integer >= 1")
        if self.min_secagg_threshold < 1:
            raise bad("min-secagg-threshold", self.min_secagg_threshold, "an integer >= 1")
        if not 0 <= self.min_secagg_threshold_fraction <= 1:
            raise bad("min-secagg-threshold-fraction", self.min_secagg_threshold_fraction, "in [0, 1]")
        if self.min_honest < 1:
            raise bad("min-honest", self.min_honest, "an integer >= 1 (1: count on nobody else; full noise)")
        if self.min_round_size < 2:
            raise bad("min-round-size", self.min_round_size, "an integer >= 2 (a secure sum needs two institutions)")
        if self.test_fraction is not None and not (0 < self.test_fraction < 1):
            raise bad("test-fraction", self.test_fraction, "in (0, 1), the share of its records held out")
        if self.neighbouring is not None and self.neighbouring not in NEIGHBOURING:
            raise bad("neighbouring", self.neighbouring, " or ".join(map(repr, NEIGHBOURING)))
        if self.min_eval_records < 1:
            raise bad("min-eval-records", self.min_eval_records, "an integer >= 1 (no scores over fewer records)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> PrivacyPolicy:
        """Build from policy keys (``max-epsilon``, ...); unknown keys are an error."""
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown policy key(s) {unknown}; known keys are {sorted(KEYS)}")
        kinds = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {"source": source}
        for key, value in values.items():
            kwargs[KEYS[key]] = coerce(key, value, kinds[KEYS[key]], source=source)
        return cls(**kwargs)

    @classmethod
    def load(
        cls, path: str | Path, institution: str | None = None, defaults: Mapping[str, Any] | None = None
    ) -> PrivacyPolicy:
        """Read a policy file; ``institution`` applies its ``[institutions.NAME]`` table, if any.

        ``defaults`` (policy keys) apply where the file is silent.
        """
        path = Path(path)
        raw = read_toml(path, "policy file")
        overrides = raw.pop("institutions", {})
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise ConfigError(f"{path}: [institutions.NAME] must be tables of policy keys")
        raw = {**(defaults or {}), **raw}
        policy = cls.from_mapping(raw, str(path))
        for name, table in overrides.items():
            cls.from_mapping(table, f"{path} [institutions.{name}]")  # every table is checked, used or not
        if institution is not None and institution in overrides:
            specific = cls.from_mapping({**raw, **overrides[institution]}, f"{path} [institutions.{institution}]")
            policy = replace(specific, source=str(path))
        return policy

    @classmethod
    def load_simulated(cls, path: str | Path, names: Sequence[str]) -> dict[str, PrivacyPolicy]:
        """Each simulated institution's policy from one file; a ``[institutions.NAME]`` table must name one of them."""
        strangers = sorted(set(read_toml(path, "policy file").get("institutions", {})) - set(names))
        policies = {name: cls.load(path, institution=name) for name in names}  # every table checked first
        if strangers:
            raise ConfigError(
                f"{path}: [institutions.{strangers[0]}] names no institution of this run "
                f"(they are {names[0]} to {names[-1]})"
            )
        return policies

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> PrivacyPolicy:
        """A deployed institution's policy: ``policy-path`` and/or inline keys (inline wins), then ``defaults``."""
        inline = {k: v for k, v in node_config.items() if k in KEYS}
        base = (
            cls.load(str(node_config["policy-path"]), defaults=defaults)
            if "policy-path" in node_config
            else cls.from_mapping(dict(defaults or {}), "node config")
        )
        if not inline:
            return base
        merged = {key: getattr(base, attr) for key, attr in KEYS.items() if getattr(base, attr) is not None}
        return cls.from_mapping({**merged, **inline}, "node config")

    def secagg_violations(self, *, sample: int, shares: int, threshold: int) -> list[str]:
        """What in a SecAgg+ setup (sampled nodes, shares per node, threshold) breaks this policy."""
        out = []
        if sample < self.min_round_size:
            out.append(f"a round of {sample} institutions is below the policy's min-round-size {self.min_round_size}")
        if threshold < self.min_secagg_threshold:
            out.append(
                f"reconstruction threshold {threshold} is below the policy's min-secagg-threshold "
                f"{self.min_secagg_threshold}"
            )
        given = min(shares, sample)
        if threshold < self.min_secagg_threshold_fraction * given:
            out.append(
                f"reconstruction threshold {threshold} of {given} shares is below the policy's "
                f"min-secagg-threshold-fraction {self.min_secagg_threshold_fraction:g}"
            )
        return out

    def to_mapping(self) -> dict[str, Any]:
        """The policy's keys (those with a limit), for reports and ``budget``."""
        return {key: getattr(self, attr) for key, attr in KEYS.items() if getattr(self, attr) is not None}

    def budget(self, settings: Proposal) -> float:
        """The lifetime epsilon budget: the policy's, else (simulations only) the run's."""
        return self.max_epsilon if self.max_epsilon is not None else settings.privacy.budget

    def holdout_fraction(self, settings: Proposal) -> float:
        """The share of its records held out: the policy's, else (simulations only) the run's ``test-fraction``."""
        return self.test_fraction if self.test_fraction is not None else settings.data.test_fraction

    def accounting_delta(self, settings: Proposal) -> float:
        """The delta epsilon is accounted at: the institution's own, else the run's."""
        return self.delta if self.delta is not None else settings.privacy.delta

    def accounting_relation(self, settings: Proposal) -> str:
        """The neighbouring relation epsilon is accounted for: the institution's own, else (simulations) the run's."""
        return self.neighbouring if self.neighbouring is not None else settings.privacy.neighbouring

    def violations(self, settings: Proposal, plan: RoundPlan, *, secure_aggregation: bool) -> list[str]:
        """What in the coordinator's proposal breaks this policy (empty: nothing).

        ``secure_aggregation`` says whether this round's update would leave masked by
        SecAgg+ (what the message is, not what the run config claims).
        """
        out = []
        if self.require_secure_aggregation and not secure_aggregation:
            out.append("the update would leave without secure aggregation, which the policy requires")
        if self.delta is not None and settings.privacy.delta > self.delta:
            out.append(f"delta {settings.privacy.delta:g} is above the policy's delta {self.delta:g}")
        if plan.noise_multiplier < self.min_noise_multiplier:
            what = "no noise (no DP)" if plan.noise_multiplier == 0 else f"noise multiplier {plan.noise_multiplier:.4g}"
            out.append(f"{what} is below the policy's min-noise-multiplier {self.min_noise_multiplier:g}")
        if self.max_grad_norm is not None and settings.privacy.max_grad_norm > self.max_grad_norm:
            out.append(
                f"max-grad-norm {settings.privacy.max_grad_norm:g} is above the policy's ceiling {self.max_grad_norm:g}"
            )
        if self.max_local_epochs is not None and settings.train.local_epochs > self.max_local_epochs:
            out.append(
                f"local-epochs {settings.train.local_epochs} is above the policy's "
                f"max-local-epochs {self.max_local_epochs}"
            )
        return out


def deployed_policy(node_config: Mapping[str, Any]) -> PrivacyPolicy:
    """A deployed institution's policy: its own lifetime budget, and its own delta.

    Without a delta of its own, the institution would account at the delta the
    coordinator proposes, and a larger delta makes the same training look cheaper:
    so a policy without ``delta`` accounts at fedsilo's default (1e-5) and refuses
    any larger proposal. Unless the policy says otherwise, a deployed institution
    also refuses rounds without SecAgg+, SecAgg+ thresholds below a strict majority
    of the shares (and below 2), and keeps its evaluation metrics (computed on
    held-out records, outside the DP guarantee) to itself (``DEPLOYED_DEFAULTS``); if
    it shares them, it holds out its own share of its records (the coordinator's
    ``test-fraction`` is ignored), over at least 50 of them, once per round it trained in.
    """
    policy = PrivacyPolicy.from_node_config(node_config, defaults=DEPLOYED_DEFAULTS)
    if policy.max_epsilon is None:
        raise ConfigError(
            f"{policy.source}: a deployed institution must set max-epsilon (its lifetime budget) "
            "in its policy; the coordinator cannot choose it"
        )
    if policy.delta is None:
        policy = replace(policy, delta=PrivacySettings().delta)
    return policy
