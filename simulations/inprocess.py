"""The in-process engine: a whole federation in one process, no messaging, no Ray.

A fast path for one machine, not a second framework. Each round calls the code
the Flower engine runs, in the order Flower runs it:

- every institution is built as ``InstitutionData.from_node_config`` builds it
  from its simulation ``partition-id`` (``simulations.baselines.federation_members``,
  which loads the data once), and trains and evaluates through
  ``client.institution.fit_round`` / ``evaluate_round`` (what the ClientApp calls),
  so splits, policies, refusals, ledgers and epsilon are the same;
- with secure aggregation, each update goes through SecAgg+'s weighting, clipping
  and seeded stochastic quantization, and the sum through its dequantization
  (``server.aggregation``, Flower's own functions, the masks left out because
  they cancel); a round with fewer than two trainers halts unaggregated, and an
  aggregate near the clipping range is warned about, as
  ``GuardedSecAggPlusWorkflow`` does;
- the strategy is ``FedsiloStrategy``, built by ``server.server_app.open_run``:
  the same FedAvg, bookkeeping and run directory (metrics.csv, checkpoints,
  model.pt, report.json).

The one difference: with ``fraction-fit`` or ``fraction-evaluate`` below 1,
institutions are sampled by a generator seeded from the run seed over their
names, whereas Flower samples its random node ids; the sample differs, its size
does not.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from client.institution import evaluate_round, fit_round
from client.mods import quantization_seed, seeded_global_numpy
from common.settings import RunSettings
from server.aggregation import (
    clipping_warning,
    may_unmask,
    secaggplus_client_vector,
    secaggplus_unmasked_aggregate,
)
from server.server_app import open_run
from server.strategy import EvalResults, FedsiloStrategy, FitResults, RoundCallback
from simulations.baselines import federation_members

OK = Status(code=Code.OK, message="")


class LocalInstitution(ClientProxy):
    """Stands for a simulated institution where the strategy expects a Flower client proxy.

    The strategy reads only its id; nothing is ever sent through it.
    """

    def _unused(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("the in-process engine calls client.institution directly")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as every ClientApp runs (client_fn), so sums are the same."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_inprocess(
    settings: RunSettings,
    *,
    institutions: int,
    on_round: RoundCallback | None = None,
    strategy_cls: type[FedsiloStrategy] = FedsiloStrategy,
) -> dict[str, Any]:
    """Simulate ``institutions`` institutions in this process; return the run's ``report.json`` content.

    ``settings.out_dir`` must be set: the run directory is written there, as the
    Flower engine (``simulations.runner.run_federation``) writes it.
    """
    if not settings.out_dir:
        raise ValueError("settings.out_dir must name the run directory")
    settings = settings.with_overrides({"min-institutions": institutions})
    sampler = random.Random(settings.seed)
    with _one_torch_thread():
        settings, directory, strategy = open_run(settings, on_round, strategy_cls)
        assert strategy.on_fit_config_fn is not None and strategy.on_evaluate_config_fn is not None
        client_settings = RunSettings.from_config(strategy.on_fit_config_fn(1))  # what every FitIns carries
        members = federation_members(client_settings, institutions)
        who = {data.name: str(i) for i, data in enumerate(members)}  # a simulated node's partition-id
        started = time.monotonic()
        for server_round in range(1, settings.rounds + 1):
            config = strategy.on_fit_config_fn(server_round)
            size, _ = strategy.num_fit_clients(len(members))
            chosen = members if size >= len(members) else sampler.sample(members, size)
            weights = strategy.current
            outcomes = [
                fit_round(
                    data,
                    weights,
                    RunSettings.from_config(config),
                    server_round=server_round,
                    run_id=str(config["run-name"]),
                )
                for data in chosen
            ]
            results: FitResults = [
                (
                    LocalInstitution(data.name),
                    FitRes(OK, ndarrays_to_parameters(o.weights), o.num_examples, dict(o.metrics)),
                )
                for data, o in zip(chosen, outcomes, strict=True)
            ]
            if not settings.secagg.enabled:
                strategy.aggregate_fit(server_round, results, [])
            elif may_unmask(o.num_examples for o in outcomes):
                vectors = []
                for data, outcome in zip(chosen, outcomes, strict=True):
                    seed = quantization_seed(settings.seed, server_round, who[data.name])
                    with seeded_global_numpy(seed):
                        vectors.append(secaggplus_client_vector(outcome.weights, outcome.num_examples, settings.secagg))
                recovered = secaggplus_unmasked_aggregate(vectors, settings.secagg)
                warning = clipping_warning(
                    recovered,
                    (o.num_examples for o in outcomes),
                    max_weight=settings.secagg.max_weight,
                    clipping_range=settings.secagg.clipping_range,
                )
                if warning is not None:  # as GuardedSecAggPlusWorkflow warns
                    log(WARNING, "%s", warning)
                aggregate = ndarrays_to_parameters(recovered)
                for _, res in results:
                    res.parameters = aggregate  # as SecAggPlusWorkflow hands every FitRes the aggregate
                strategy.aggregate_fit(server_round, results, [])
            else:  # GuardedSecAggPlusWorkflow halts: book the replies, keep the model
                strategy.book_fit(server_round, results, [])
            evaluations: EvalResults = []
            size, _ = strategy.num_evaluation_clients(len(members))
            for data in members if size >= len(members) else sampler.sample(members, size):
                loss, count, metrics = evaluate_round(data, strategy.current, client_settings)
                evaluations.append((LocalInstitution(data.name), EvaluateRes(OK, loss, count, metrics)))
            strategy.aggregate_evaluate(server_round, evaluations, [])
        directory.finish(strategy.current, time.monotonic() - started)
    report_path = Path(settings.out_dir) / "report.json"
    return dict(json.loads(report_path.read_text(encoding="utf-8")))
