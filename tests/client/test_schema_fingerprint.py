"""An institution whose schema is not the federation's refuses, with a reason both sides see, before anything trains.

Each institution here reads the real German-credit table with its own copy of the schema,
as a deployed institution does (``data-path``, ``schema-path``); the coordinator's proposal
carries the fingerprint of the federation's schema (``schema-fingerprint``), as
``fedsilo.server.server_app.open_run`` fills it in. Without the check, a dropped column or an
added category makes the institution's model another size, and ``set_weights`` raises
``size mismatch`` in the institution's own log while the coordinator sees nothing; a changed
bound trains silently on differently scaled inputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsilo.client.institution import InstitutionData, evaluate_round, fit_round
from fedsilo.common.aggregation import DistributedSkellamSum
from fedsilo.common.datasets import DATA_DIR
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings

FEDERATION_SCHEMA = DATA_DIR / "german_credit.schema.toml"
FOREIGN_WORKER = '[features.foreign_worker]\ntype = "categorical"\ncategories = ["no", "yes"]\nunknown = "error"\n'

# Each a schema an institution might hold by mistake: (what differs, the schema text).
DIFFERENT = {
    "a column dropped": lambda text: text.replace(FOREIGN_WORKER, ""),
    "a category added": lambda text: text.replace('categories = ["no", "yes"]', 'categories = ["no", "yes", "n/a"]'),
    "a bound changed (same width)": lambda text: text.replace("max = 20000", "max = 10000"),
}


def settings(**overrides: Any) -> RunSettings:
    """The coordinator's proposal, with its schema's fingerprint as open_run fills it in."""
    base = {"dataset": "german-credit", "num-server-rounds": 3, "target-epsilon": 2.0}
    run = RunSettings.from_config({**base, **overrides})
    return replace(run, data=replace(run.data, schema_fingerprint=Schema.load(FEDERATION_SCHEMA).fingerprint()))


def bank(tmp_path: Path, schema_text: str, run: RunSettings) -> InstitutionData:
    """A deployed bank reading the German-credit table with its own schema file."""
    schema = tmp_path / "bank-schema.toml"
    schema.write_text(schema_text, encoding="utf-8")
    node = {
        "name": "bank",
        "data-path": str(DATA_DIR / "german_credit.csv"),
        "schema-path": str(schema),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 10.0,
        "share-eval-metrics": True,  # so that evaluation would build the model and crash
    }
    return InstitutionData.from_node_config(node, run)


def federation_weights(run: RunSettings) -> list[np.ndarray]:
    return get_weights(build_model(run.train, Schema.load(FEDERATION_SCHEMA), seed=run.seed))


def assert_names_both_fingerprints_and_the_fix(reason: str, data: InstitutionData) -> None:
    assert data.schema.fingerprint() in reason
    assert Schema.load(FEDERATION_SCHEMA).fingerprint() in reason
    assert "schema file differs from the federation's" in reason
    assert "get the federation's schema.toml from the coordinator" in reason


@pytest.mark.parametrize("difference", sorted(DIFFERENT))
def test_a_bank_with_another_schema_refuses_to_train_before_anything_is_built_or_spent(
    tmp_path: Path, difference: str
) -> None:
    # Prepare: the federation's model and proposal; a bank whose schema file differs
    run = settings()
    data = bank(tmp_path, DIFFERENT[difference](FEDERATION_SCHEMA.read_text()), run)
    weights = federation_weights(run)

    # Execute
    out = fit_round(data, weights, run, server_round=1, run_id="r", secure_aggregation=True)

    # Assert: refused in the clear, zero weight, nothing received sent back, the ledger never touched
    assert out.num_examples == 0 and "bank refused round 1" in str(out.metrics["refused"])
    assert_names_both_fingerprints_and_the_fix(str(out.metrics["refused"]), data)
    assert out.metrics["epsilon"] == 0.0
    assert [w.shape for w in out.weights] == [w.shape for w in weights]
    assert all(not np.any(w) for w in out.weights)
    assert not (tmp_path / "state" / "ledgers").exists()


@pytest.mark.parametrize("difference", sorted(DIFFERENT))
def test_a_bank_with_another_schema_refuses_to_evaluate(tmp_path: Path, difference: str) -> None:
    run = settings()
    data = bank(tmp_path, DIFFERENT[difference](FEDERATION_SCHEMA.read_text()), run)

    loss, count, metrics = evaluate_round(data, federation_weights(run), run)

    assert (loss, count) == (0.0, 0) and set(metrics) == {"institution", "refused"}
    assert "bank refused to evaluate" in metrics["refused"]
    assert_names_both_fingerprints_and_the_fix(metrics["refused"], data)


def test_a_distributed_round_refused_for_its_schema_still_sends_its_noise_share(tmp_path: Path) -> None:
    # Prepare: distributed DP, where every sampled institution's noise share is counted on
    run = settings(**{"dp-mode": "distributed", "sample-rate": 0.5})
    data = bank(tmp_path, DIFFERENT["a column dropped"](FEDERATION_SCHEMA.read_text()), run)
    weights = federation_weights(run)

    # Execute
    out = fit_round(data, weights, run, server_round=1, run_id="r", secure_aggregation=True, secure_round=(3, 2))

    # Assert: refused, nothing locked or recorded, weighed as every share, and its vector is noise
    assert_names_both_fingerprints_and_the_fix(str(out.metrics["refused"]), data)
    assert not (tmp_path / "state" / "ledgers").exists()
    assert out.num_examples == int(run.secagg.max_weight)
    plan = DistributedSkellamSum(run).plan(sum(w.size for w in weights))
    c, q = run.secagg.clipping_range, run.secagg.quantization_range
    z = np.rint((out.weights[0] + c) * q / (2 * c)).astype(np.int64)
    centred = z - 2 ** (plan.bits - 1)  # the offset every contribution carries
    assert np.var(centred) > 0 and abs(centred.mean()) < 4 * np.sqrt(np.var(centred) / centred.size) + 1


def test_the_federations_own_schema_trains_and_an_unknown_fingerprint_is_not_checked(tmp_path: Path) -> None:
    run = settings()
    # A copy with a comment and an ignored column encodes alike: the same fingerprint, so it trains.
    copy = "# the bank's copy\n" + FEDERATION_SCHEMA.read_text() + '\n[ignore]\ncolumns = ["internal_id"]\n'
    data = bank(tmp_path, copy, run)
    out = fit_round(data, federation_weights(run), run, server_round=1, run_id="r", secure_aggregation=True)
    assert "refused" not in out.metrics and out.num_examples > 0
    unknown = replace(run, data=replace(run.data, schema_fingerprint=""))  # a coordinator that does not say
    evaluated = evaluate_round(
        data, federation_weights(run), unknown, server_round=1, run_id="r"
    )  # the round it trained
    assert "refused" not in evaluated[2]
