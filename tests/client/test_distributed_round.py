"""Distributed DP's round at an institution and at the coordinator: sample, clip, encode with a noise share, decode.

The round runs through the real code: ``fit_round`` at each institution, SecAgg+'s own
quantization and dequantization (Flower's functions, through the in-process engine's
``secure_sum``), and the run's ``DistributedSkellamSum`` at the coordinator.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsilo.client.institution import InstitutionData, fit_round
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common import distributed_dp as ddp
from fedsilo.common.aggregation import Contribution, DistributedSkellamSum, aggregation_for
from fedsilo.common.errors import ConfigError
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights, set_weights
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import clipped_gradient_sum
from fedsilo.simulations.inprocess import secure_setup, secure_sum

BASE = {"num-server-rounds": 4, "dp-mode": "distributed", "dataset": "breast-cancer", "seed": 3}
NO_NOISE = RunSettings.from_config({**BASE, "target-epsilon": "inf", "sample-rate": 1.0})
PRIVATE = RunSettings.from_config({**BASE, "target-epsilon": 2.0, "sample-rate": 0.5})


def institutions(state: Path, settings: RunSettings, count: int = 3, **policy: float) -> list[InstitutionData]:
    out = []
    for pid in range(count):
        node = {"partition-id": pid, "num-partitions": count, "state-dir": str(state / f"i{pid}")}
        data = InstitutionData.from_node_config(node, settings)
        limits = {"max_epsilon": 50.0 if settings.privacy.enabled else float("inf"), **policy}
        out.append(replace(data, policy=PrivacyPolicy(**limits)))  # type: ignore[arg-type]
    return out


def initial(data: InstitutionData, settings: RunSettings) -> list[np.ndarray]:
    return get_weights(build_model(settings.train, data.schema, seed=settings.seed))


def manual_clipped_sum(model: nn.Module, x: np.ndarray, y: np.ndarray, clip: float) -> np.ndarray:
    """Per-record gradients one record at a time with autograd, clipped and summed (state-dict order)."""
    total = None
    for row, label in zip(x, y, strict=True):
        model.zero_grad()
        loss = nn.functional.cross_entropy(
            model(torch.as_tensor(row[None], dtype=torch.float32)), torch.as_tensor([label])
        )
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        flat = flat * min(1.0, clip / (float(flat.norm()) + 1e-12))
        total = flat if total is None else total + flat
    assert total is not None
    return total.numpy()


@pytest.mark.parametrize("model_name", ["linear", "mlp"])
def test_the_clipped_sum_is_each_records_clipped_gradient_summed(tmp_path: Path, model_name: str) -> None:
    settings = replace(NO_NOISE, train=replace(NO_NOISE.train, model=model_name))
    data = institutions(tmp_path, settings, count=2)[0]
    model = build_model(settings.train, data.schema, seed=1)
    x, y = data.train_x[:40], data.train_y[:40]
    ours, size = clipped_gradient_sum(model, x, y, sample_rate=1.0, max_grad_norm=0.05, rng=np.random.default_rng(0))
    assert size == 40
    np.testing.assert_allclose(ours, manual_clipped_sum(model, x, y, 0.05), rtol=1e-4, atol=1e-7)


def test_no_record_can_make_the_clipped_sum_non_finite(tmp_path: Path) -> None:
    data = institutions(tmp_path, NO_NOISE, count=2)[0]
    model = build_model(NO_NOISE.train, data.schema, seed=1)
    x = data.train_x[:10].copy()
    x[3, 0] = np.inf  # a record whose gradient overflows
    ours, _ = clipped_gradient_sum(
        model, x, data.train_y[:10], sample_rate=1.0, max_grad_norm=1.0, rng=np.random.default_rng(0)
    )
    assert np.isfinite(ours).all()
    assert np.linalg.norm(ours) <= 9.0 + 1e-9  # nine records at most 1.0 each; the broken one counts as zero


def test_without_noise_and_with_full_sampling_the_step_is_the_pooled_clipped_gradient_sum(tmp_path: Path) -> None:
    members = institutions(tmp_path, NO_NOISE)
    weights = initial(members[0], NO_NOISE)
    setup = secure_setup(len(members), NO_NOISE.secagg)
    outcomes = [fit_round(m, weights, NO_NOISE, server_round=1, run_id="r", secure_round=setup) for m in members]
    assert all("refused" not in o.metrics for o in outcomes)
    contributions = [Contribution(o.weights, o.num_examples) for o in outcomes]
    recovered = secure_sum(contributions, NO_NOISE.secagg, seeds=[11, 12, 13], warn=False)
    query = aggregation_for(NO_NOISE)
    assert isinstance(query, DistributedSkellamSum)
    plan = query.plan(sum(w.size for w in weights))
    integers = ddp.integer_sum_from_secagg(
        recovered[0],
        contributors=3,
        clipping_range=NO_NOISE.secagg.clipping_range,
        quantization_range=NO_NOISE.secagg.quantization_range,
        bits=plan.bits,
    )
    decoded = ddp.decode(
        ddp.remove_offsets(integers, contributors=3, bits=plan.bits),
        seed=ddp.rotation_seed(NO_NOISE.seed, 1),
        scale=plan.scale,
        dim=plan.dim,
    )
    model = build_model(NO_NOISE.train, members[0].schema, seed=NO_NOISE.seed)
    set_weights(model, weights)
    pooled = sum(manual_clipped_sum(model, m.train_x, m.train_y, NO_NOISE.privacy.max_grad_norm) for m in members)
    assert np.linalg.norm(decoded - pooled) <= 3 * np.sqrt(plan.dim_padded) / plan.scale
    # The coordinator's step: the decoded sum over the expected batch, times the server's rate.
    records = sum(len(m.train_y) for m in members)
    stepped = query.finish_secure(
        recovered, [o.num_examples for o in outcomes], server_round=1, current=weights, records=records
    )
    assert stepped is not None
    flat_before = np.concatenate([w.reshape(-1) for w in weights]).astype(np.float64)
    flat_after = np.concatenate([w.reshape(-1) for w in stepped]).astype(np.float64)
    direction = (flat_before - flat_after) / np.linalg.norm(flat_before - flat_after)
    assert float(direction @ (pooled / np.linalg.norm(pooled))) > 0.999


def test_each_institution_adds_the_share_its_policy_counts_on(tmp_path: Path) -> None:
    for honest, expected_counted in ((1, 1), (3, 3), (2, 2)):
        members = institutions(tmp_path / str(honest), PRIVATE, min_honest=honest)
        weights = initial(members[0], PRIVATE)
        out = fit_round(members[0], weights, PRIVATE, server_round=1, run_id="r", secure_round=(3, 3))
        assert "refused" not in out.metrics
        entry = PrivacyLedger.for_dataset(members[0].state_dir, members[0].fingerprint).entries[-1]
        assert (entry.mechanism, entry.sample, entry.threshold, entry.min_honest) == ("skellam", 3, 3, honest)
        assert entry.counted_honest == expected_counted
        share = entry.variance / 3
        assert entry.own_variance == pytest.approx(share * (3 - expected_counted + 1))
        assert out.metrics["epsilon-worst-case"] >= out.metrics["epsilon"]
        if honest == 1:
            assert out.metrics["epsilon-worst-case"] == pytest.approx(out.metrics["epsilon"])


def test_dropouts_the_round_allows_raise_the_share(tmp_path: Path) -> None:
    members = institutions(tmp_path, PRIVATE, min_honest=3)
    weights = initial(members[0], PRIVATE)
    fit_round(members[0], weights, PRIVATE, server_round=1, run_id="r", secure_round=(3, 2))  # one may drop
    entry = PrivacyLedger.for_dataset(members[0].state_dir, members[0].fingerprint).entries[-1]
    assert entry.counted_honest == 2 and entry.own_variance == pytest.approx(entry.variance / 3 * 2)


def test_a_round_smaller_than_min_honest_is_refused_and_still_sends_its_noise_share(tmp_path: Path) -> None:
    members = institutions(tmp_path, PRIVATE, min_honest=4)
    weights = initial(members[0], PRIVATE)
    out = fit_round(members[0], weights, PRIVATE, server_round=1, run_id="r", secure_round=(3, 3))
    assert "min-honest" in str(out.metrics["refused"]) or "honest" in str(out.metrics["refused"])
    assert out.num_examples == int(PRIVATE.secagg.max_weight)  # a share, weighed like every other
    assert PrivacyLedger.for_dataset(members[0].state_dir, members[0].fingerprint).entries == ()
    # Its vector is noise alone: zero signal, centred integers with the share's variance.
    plan = DistributedSkellamSum(PRIVATE).plan(sum(w.size for w in weights))
    c, q = PRIVATE.secagg.clipping_range, PRIVATE.secagg.quantization_range
    z = np.rint((out.weights[0] + c) * q / (2 * c)).astype(np.int64)
    centred = z - 2 ** (plan.bits - 1)  # the offset every contribution carries
    assert abs(centred.mean()) < 4 * np.sqrt(plan.total_variance / centred.size) + 1
    # The share the others count on: the round's (3 sampled, none may drop), not the refused policy's.
    share = ddp.noise_share(total_variance=plan.total_variance, sample=3, threshold=3, min_honest=4)
    assert 0.7 * share.own_variance < np.var(centred) < 1.3 * share.own_variance


def test_without_secagg_the_institution_refuses_a_distributed_round(tmp_path: Path) -> None:
    members = institutions(tmp_path, PRIVATE)
    weights = initial(members[0], PRIVATE)
    out = fit_round(members[0], weights, PRIVATE, server_round=1, run_id="r", secure_aggregation=False)
    assert "SecAgg+" in str(out.metrics["refused"])
    assert PrivacyLedger.for_dataset(members[0].state_dir, members[0].fingerprint).entries == ()


def test_distributed_mode_needs_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunSettings.from_config({"dp-mode": "distributed", "secure-aggregation": False})


def test_the_coordinator_cannot_lower_the_noise_below_the_budget(tmp_path: Path) -> None:
    lax = RunSettings.from_config({**BASE, "noise-multiplier": 0.01, "sample-rate": 1.0})
    members = institutions(tmp_path, lax)
    members = [replace(m, policy=PrivacyPolicy(max_epsilon=3.0)) for m in members]
    weights = initial(members[0], lax)
    out = fit_round(members[0], weights, lax, server_round=1, run_id="r", secure_round=(3, 3))
    assert "past its privacy budget" in str(out.metrics["refused"])


def test_noise_that_could_leave_secaggs_range_is_refused_before_anything_trains(tmp_path: Path) -> None:
    # A coordinator proposing huge noise would make values leave [0, 2^b) and be clamped, a
    # non-linear step the sum would show: the institution refuses from public numbers alone.
    loud = RunSettings.from_config({**BASE, "noise-multiplier": 5000.0, "sample-rate": 0.5})
    members = institutions(tmp_path, loud)
    weights = initial(members[0], loud)
    out = fit_round(members[0], weights, loud, server_round=1, run_id="r", secure_round=(3, 3))
    assert "could leave SecAgg+'s range" in str(out.metrics["refused"])
    assert PrivacyLedger.for_dataset(members[0].state_dir, members[0].fingerprint).entries == ()
