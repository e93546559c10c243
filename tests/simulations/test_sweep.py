"""Sweeps: the strict parser, baselines on exactly the federation's records, and the outputs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from client.institution import InstitutionData, records_fingerprint
from common.errors import ConfigError
from simulations.baselines import federation_members, records_digest
from simulations.cli import app
from simulations.sweep import run_task
from simulations.sweep_spec import NO_DP, PrivacyLevel, SweepSpec, Task, load_sweep_file, parse_sweep

RUNNER = CliRunner()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("epsilon = [1]\n", "unknown key 'epsilon'; known keys are dataset"),
        ("epsilons = [1, -2]\n", "'epsilons' must hold numbers > 0 (\"inf\" for no DP). Found -2."),
        ('epsilons = ["one"]\n', "'epsilons' must hold numbers (or \"inf\"). Found 'one'."),
        ("seeds = []\n", "'seeds' needs at least one value. Found []."),
        ("seeds = [0, 0]\n", "'seeds' lists a value twice; list each value once. Found [0, 0]."),
        ("institutions = [1]\n", "'institutions' must hold integers >= 2. Found 1."),
        ("rounds = 2.5\n", "'rounds' must hold integers >= 1. Found 2.5."),
        ('engine = "ray"\n', "'engine' must be flower or inprocess. Found 'ray'."),
        ('partitions = ["random"]\n', "'partitions' must hold iid, dirichlet:ALPHA or column:NAME. Found 'random'."),
        ('secure-aggregation = ["yes"]\n', "'secure-aggregation' must hold true or false (on/off). Found 'yes'."),
        ("delta = 2\n", "'delta' must be in (0, 1), e.g. 1e-5. Found 2."),
        (
            'dataset = "mnist"\n',
            "'dataset' must be one of breast-cancer, digits, fashion-mnist, fashion-mnist-train, german-credit or a "
            "CSV/Parquet file. "
            "Found 'mnist'.",
        ),
        ("[settings]\nlearning-rat = 0.1\n", "[settings] has unknown run-config key 'learning-rat'"),
        ("[settings]\nseed = 3\n", "[settings] sets 'seed', which the sweep itself sets; use its sweep key"),
        ("[settings]\nlearning-rate = -1\n", "[settings]: 'learning-rate' must be > 0. Found -1.0."),
        ("epsilons = [1\n", "not valid TOML"),
    ],
)
def test_sweep_file_errors_name_the_file_the_key_the_value_and_the_fix(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_sweep(load_sweep_file(path), str(path))
    assert str(err.value).startswith(str(path))
    assert words in str(err.value)


def test_a_missing_sweep_file_is_named() -> None:
    with pytest.raises(ConfigError, match=re.escape("nowhere.toml: sweep file not found; check the path")):
        load_sweep_file("nowhere.toml")


def test_a_sweep_file_expands_to_every_setup_level_and_seed(tmp_path: Path) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(
        'epsilons = [1, "inf"]\nnoise-multipliers = 1.1\ninstitutions = [3, 4]\nseeds = [0, 1]\n'
        "secure-aggregation = [true, false]\n[settings]\nlearning-rate = 0.1\n"
    )
    spec = parse_sweep(load_sweep_file(path), str(path))
    assert spec.levels == (PrivacyLevel(target_epsilon=1.0), PrivacyLevel(noise_multiplier=1.1), NO_DP)
    assert len(spec.tasks()) == 2 * 2 * 3 * 2
    settings = spec.run_settings(spec.tasks()[0])
    assert settings.train.learning_rate == 0.1 and settings.rounds == 20


def test_cli_refuses_a_bad_sweep_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    bad = tmp_path / "sweep.toml"
    bad.write_text("seeds = [-1]\n")
    result = RUNNER.invoke(app, ["sweep", "--file", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "'seeds' must hold integers >= 0. Found -1." in " ".join(result.output.split())
    result = RUNNER.invoke(app, ["sweep", "--institutions", "2", "--out", str(out)])
    assert result.exit_code == 2 and "SecAgg+ needs at least 3 institutions" in " ".join(result.output.split())
    assert not out.exists()


SPEC = SweepSpec(rounds=2, epsilons=(2.0,), institutions=(3,), seeds=(5,))


def test_baselines_use_exactly_the_records_of_the_federated_run(tmp_path: Path) -> None:
    task = Task(SPEC.setups[0], PrivacyLevel(target_epsilon=2.0), 5)
    out = run_task(SPEC, task, str(tmp_path))
    members = federation_members(SPEC.run_settings(task), 3)
    # The engine keyed every institution's ledger by the fingerprint of the records it trained on.
    state = tmp_path / "runs" / task.run_id / "state"
    for member in members:
        (ledger,) = (state / member.name / "ledgers").glob("*.json")
        full_x = pd.concat([pd.DataFrame(member.train_x), pd.DataFrame(member.test_x)]).to_numpy()
        full_y = pd.concat([pd.Series(member.train_y), pd.Series(member.test_y)]).to_numpy()
        assert ledger.stem == records_fingerprint(full_x, full_y)
    # Every method trained on the same training records and was tested on the same held-out ones.
    rows = pd.DataFrame(out.results)
    assert list(rows["method"]) == ["federated", "pooled", "alone"]
    train = records_digest(pd.concat([pd.DataFrame(m.train_x) for m in members]).to_numpy(), _labels(members, "train"))
    test = records_digest(pd.concat([pd.DataFrame(m.test_x) for m in members]).to_numpy(), _labels(members, "test"))
    assert set(rows["train_digest"]) == {train} and set(rows["test_digest"]) == {test}
    assert set(rows["train_records"]) == {sum(len(m.train_y) for m in members)}
    assert set(rows["test_records"]) == {sum(len(m.test_y) for m in members)}
    # The same epsilon target, accounted by the same accountant.
    assert rows["epsilon"].between(1.5, 2.0).all()
    assert rows["attack_auc"].min() >= 0.4 and rows["attack_auc"].max() <= 0.7
    # Same seed, same numbers.
    again = run_task(SPEC, task, str(tmp_path / "again"))
    cols = ["method", "accuracy", "loss", "epsilon", "attack_auc"]
    assert pd.DataFrame(again.results)[cols].equals(rows[cols])


def _labels(members: list[InstitutionData], part: str) -> np.ndarray:
    return pd.concat([pd.Series(getattr(m, f"{part}_y")) for m in members]).to_numpy()


def test_sweep_writes_tables_plots_and_a_self_contained_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["sweep", "--epsilons", "2,inf", "--seeds", "0", "--rounds", "2", "--institutions", "3", "--jobs", "1"]
    result = RUNNER.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(out / "results.parquet")
    assert results.equals(pd.read_csv(out / "results.csv")[results.columns].astype(results.dtypes.to_dict()))
    assert len(results) == 2 * 3  # two privacy levels x (federated, pooled, alone)
    assert set(results["method"]) == {"federated", "pooled", "alone"}
    assert math.isinf(results[~results["private"]]["epsilon"].max())
    assert len(pd.read_csv(out / "rounds.csv")) == 2 * 2
    assert len(pd.read_csv(out / "institutions.csv")) == 2 * 3 * 3
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "federated accuracy" in page
    for name in ("accuracy_vs_epsilon", "accuracy_over_rounds", "per_institution_accuracy", "attack_auc_vs_epsilon"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
