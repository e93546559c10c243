"""The in-process engine: a whole federation in one process, no messaging, no Ray.

A fast path for one machine, not a second framework. Each round calls the code
the Flower engine runs, in the order Flower runs it:

- every institution is built as ``InstitutionData.from_node_config`` builds it
  from its simulation ``partition-id`` (``fedsilo.simulations.baselines.federation_members``,
  which loads the data once), and trains and evaluates through
  ``fedsilo.client.institution.fit_round`` / ``evaluate_round`` (what the ClientApp calls),
  so splits, policies, refusals, ledgers and epsilon are the same;
- each reply goes to the run's ``fedsilo.server.coordinator.Coordinator``, built by
  ``fedsilo.server.server_app.open_run`` as the Flower engine builds it: the same
  bookkeeping, aggregation (``fedsilo.common.aggregation``) and run directory
  (metrics.csv, checkpoints, model.pt, report.json); the round's config and
  sample sizes are the strategy's (FedAvg's);
- with secure aggregation, each update goes through SecAgg+'s weighting, clipping
  and seeded stochastic quantization, and the sum through its dequantization
  (``fedsilo.server.aggregation``, Flower's own functions, the masks left out because
  they cancel), after the same halt guard (``fedsilo.common.aggregation.may_unmask``) and
  with the same clipping warning as ``GuardedSecAggPlusWorkflow``.

The one difference: with ``fraction-fit`` or ``fraction-evaluate`` below 1,
institutions are sampled by a generator seeded from the run seed over their
names, whereas Flower samples its random node ids; the sample differs, its size
does not.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from logging import WARNING
from typing import Any, TypeVar

import torch
from flwr.common import log

from fedsilo.client.institution import evaluate_round, fit_round
from fedsilo.client.mods import quantization_seed, seeded_global_numpy
from fedsilo.common.aggregation import Contribution, Weights, may_unmask
from fedsilo.common.distributed_dp import secagg_round_parameters
from fedsilo.common.settings import RunSettings, SecAggSettings
from fedsilo.server.aggregation import clipping_warning, secaggplus_client_vector, secaggplus_unmasked_aggregate
from fedsilo.server.coordinator import Coordinator, EvaluateReply, FitReply, RoundCallback
from fedsilo.server.server_app import open_run
from fedsilo.simulations.baselines import federation_members
from fedsilo.simulations.runner import simulated

T = TypeVar("T")


def sample_institutions(members: Sequence[T], size: int, sampler: random.Random) -> list[T]:
    """The round's sample: every member when ``size`` covers them, else ``size`` drawn by ``sampler``."""
    return list(members) if size >= len(members) else sampler.sample(list(members), size)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as every ClientApp runs (client_fn), so sums are the same."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def secure_sum(
    contributions: Sequence[Contribution], secagg: SecAggSettings, *, seeds: Sequence[int], warn: bool = True
) -> Weights:
    """What SecAgg+ recovers from the contributions, each quantized from its seed as ``secure_aggregation_mod`` does."""
    vectors = []
    for contribution, seed in zip(contributions, seeds, strict=True):
        with seeded_global_numpy(seed):
            vectors.append(secaggplus_client_vector(contribution.vector, contribution.weight, secagg))
    recovered = secaggplus_unmasked_aggregate(vectors, secagg)
    warning = clipping_warning(
        recovered,
        (c.weight for c in contributions),
        max_weight=secagg.max_weight,
        clipping_range=secagg.clipping_range,
    )
    if warn and warning is not None:  # as GuardedSecAggPlusWorkflow warns
        log(WARNING, "%s", warning)
    return recovered


def secure_setup(sample: int, secagg: SecAggSettings) -> tuple[int, int]:
    """The SecAgg+ setup (sampled institutions, threshold) of a round of ``sample``, as the guarded workflow's."""
    shares = secagg.num_shares
    if shares > 1 and float(shares).is_integer() and shares >= sample:
        shares = 1.0  # every sampled institution a neighbour, as the guarded workflow does
    _, threshold = secagg_round_parameters(
        sample, num_shares=shares, reconstruction_threshold=secagg.reconstruction_threshold
    )
    return sample, threshold


def conclude_fit(
    coordinator: Coordinator,
    replies: Sequence[FitReply],
    settings: RunSettings,
    *,
    server_round: int,
    who: Sequence[str],
) -> None:
    """Hand one round's fit replies to the coordinator, through SecAgg+'s arithmetic when the run uses it.

    ``who`` holds each replying institution's simulation ``partition-id`` (as
    text), which seeds its quantization as in the Flower engine. When the halt
    guard keeps the secure sum masked, the coordinator only books the replies.
    """
    if not settings.secagg.enabled:
        coordinator.aggregate_fit(server_round, replies, [])
    elif may_unmask(r.contribution.weight for r in replies):
        seeds = [quantization_seed(settings.seed, server_round, name) for name in who]
        recovered = secure_sum(
            [r.contribution for r in replies], settings.secagg, seeds=seeds, warn=not settings.distributed
        )
        coordinator.aggregate_fit(server_round, replies, [], secure_sum=recovered)
    else:  # GuardedSecAggPlusWorkflow halts: book the replies, keep the model
        coordinator.book_fit(server_round, replies, [])


def run_inprocess(
    settings: RunSettings,
    *,
    institutions: int,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """Simulate ``institutions`` institutions in this process; return the run's ``report.json`` content.

    ``settings.out_dir`` must be set: the run directory is written there, as the
    Flower engine (``fedsilo.simulations.runner.run_federation``) writes it.
    """
    settings = simulated(settings, institutions)
    sampler = random.Random(settings.seed)
    with _one_torch_thread():
        settings, coordinator, strategy = open_run(settings, on_round)
        client_settings = RunSettings.from_config(strategy.round_config(1))  # what every FitIns carries
        members = federation_members(client_settings, institutions)
        who = {data.name: str(i) for i, data in enumerate(members)}  # a simulated node's partition-id
        started = time.monotonic()
        for server_round in range(1, settings.rounds + 1):
            config = strategy.round_config(server_round)
            round_settings, run_id = RunSettings.from_config(config), str(config["run-name"])
            weights = coordinator.current
            chosen = sample_institutions(members, strategy.num_fit_clients(len(members))[0], sampler)
            setup = secure_setup(len(chosen), settings.secagg) if settings.secagg.enabled else None
            replies = []
            for data in chosen:
                outcome = fit_round(
                    data, weights, round_settings, server_round=server_round, run_id=run_id, secure_round=setup
                )
                replies.append(
                    FitReply(data.name, Contribution(outcome.weights, outcome.num_examples), outcome.metrics)
                )
            conclude_fit(coordinator, replies, settings, server_round=server_round, who=[who[d.name] for d in chosen])
            evaluations = []
            if settings.evaluates(server_round):  # eval-every; a skipped round still gets its row
                evaluated = sample_institutions(members, strategy.num_evaluation_clients(len(members))[0], sampler)
                evaluations = [
                    EvaluateReply(data.name, *evaluate_round(data, coordinator.current, client_settings))
                    for data in evaluated
                ]
            coordinator.aggregate_evaluate(server_round, evaluations)
        return coordinator.finish(time.monotonic() - started)
