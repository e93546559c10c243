"""Sweeps: the strict parser, baselines on exactly the federation's records, and the outputs."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from fedsilo.client.institution import InstitutionData, records_fingerprint
from fedsilo.common.datasets import DATA_DIR
from fedsilo.common.errors import ConfigError
from fedsilo.common.metrics import classification_metrics
from fedsilo.common.settings import RunSettings
from fedsilo.simulations.baselines import federation_members, records_digest, train_centrally
from fedsilo.simulations.cli import app
from fedsilo.simulations.sweep import check_sweep, run_task
from fedsilo.simulations.sweep_spec import NO_DP, PrivacyLevel, SweepSpec, Task, load_sweep_file, parse_sweep

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
        ("[settings]\nlearning-rat = 0.1\n", "[settings]: unknown run setting(s) ['learning-rat']"),
        ("[settings]\nseed = 3\n", "[settings] may not set ['seed']: the sweep sets it; use its sweep key"),
        ("[settings]\nlearning-rate = -1\n", "[settings]: 'learning-rate' must be > 0 (0: the recipe's). Found -1.0."),
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
    assert list(rows["method"]) == ["federated", "pooled", "alone"]  # the reference is non-private: no-DP tasks only
    train = records_digest(pd.concat([pd.DataFrame(m.train_x) for m in members]).to_numpy(), _labels(members, "train"))
    test = records_digest(pd.concat([pd.DataFrame(m.test_x) for m in members]).to_numpy(), _labels(members, "test"))
    assert set(rows["train_digest"]) == {train} and set(rows["test_digest"]) == {test}
    assert set(rows["train_records"]) == {sum(len(m.train_y) for m in members)}
    assert set(rows["test_records"]) == {sum(len(m.test_y) for m in members)}
    # The same epsilon target, accounted by the same accountant, over the federation's rounds.
    assert rows["epsilon"].between(1.5, 2.0).all()
    assert set(rows[rows["method"] != "federated"]["baseline_rounds"]) == {SPEC.rounds}
    assert rows["attack_auc"].min() >= 0.4 and rows["attack_auc"].max() <= 0.7
    # Same seed, same numbers.
    again = run_task(SPEC, task, str(tmp_path / "again"))
    cols = ["method", "auc", "average_precision", "balanced_accuracy", "accuracy", "loss", "epsilon", "attack_auc"]
    assert pd.DataFrame(again.results)[cols].equals(rows[cols])


def _labels(members: list[InstitutionData], part: str) -> np.ndarray:
    return pd.concat([pd.Series(getattr(m, f"{part}_y")) for m in members]).to_numpy()


def test_the_reference_and_every_baseline_are_scored_on_the_same_held_out_records(tmp_path: Path) -> None:
    # Prepare
    task = Task(SPEC.setups[0], NO_DP, 5)
    members = federation_members(SPEC.run_settings(task), 3)
    train_x, train_y = np.concatenate([m.train_x for m in members]), _labels(members, "train")
    test_x, test_y = np.concatenate([m.test_x for m in members]), _labels(members, "test")
    # Execute
    rows = pd.DataFrame(run_task(SPEC, task, str(tmp_path)).results).set_index("method")
    # Assert: one row per method, all trained on the same records and scored on the same held-out ones
    assert list(rows.index) == ["federated", "pooled", "alone", "reference"]
    assert set(rows["train_digest"]) == {records_digest(train_x, train_y)}
    assert set(rows["test_digest"]) == {records_digest(test_x, test_y)}
    # The reference is scikit-learn's logistic regression (lbfgs, C = 1) on the pooled training records, no DP.
    reference = rows.loc["reference"]
    fitted = LogisticRegression(max_iter=10_000).fit(train_x.astype(np.float64), train_y)
    expected = classification_metrics(test_y, fitted.predict_proba(test_x.astype(np.float64)))
    for key in ("auc", "average_precision", "balanced_accuracy", "accuracy", "loss", "majority_rate"):
        assert reference[key] == pytest.approx(expected[key])
    assert math.isinf(reference["epsilon"]) and bool(reference["converged"]) and not reference["private"]
    # Without DP the pooled ceiling is trained to convergence, at least as long as the federation:
    # it fits the training records at least as well as the federated model.
    pooled = rows.loc["pooled"]
    assert bool(pooled["converged"]) and pooled["baseline_rounds"] >= SPEC.rounds
    assert pooled["train_loss"] <= rows.loc["federated", "train_loss"]
    # Every row carries the scores that cannot flatter, and the reference rate a model must beat.
    assert rows["majority_rate"].nunique() == 1 and rows["majority_rate"].iloc[0] == pytest.approx(
        np.bincount(test_y).max() / len(test_y)
    )
    assert rows[["auc", "average_precision", "balanced_accuracy"]].notna().all().all()
    assert set(rows["status"]) == {"ok"} and set(rows["institution_rounds_refused"]) == {0}


def test_pooled_without_dp_trains_until_its_training_loss_stops_improving() -> None:
    # Prepare
    settings = RunSettings().with_overrides({"num-server-rounds": 2, "target-epsilon": "inf", "seed": 5})
    members = federation_members(settings, 3)
    x, y = np.concatenate([m.train_x for m in members]), np.concatenate([m.train_y for m in members])

    def train(**limits: int) -> float:
        trained = train_centrally(x, y, settings, schema=members[0].schema, salt=101, **limits)
        return trained.train_loss

    # Execute
    trained = train_centrally(x, y, settings, schema=members[0].schema, salt=101)
    fixed = train(max_rounds=settings.rounds)  # the federation's budget only
    longer = train(min_rounds=3 * trained.rounds, max_rounds=3 * trained.rounds)
    # Assert: converged, and three times the training lowers the loss little (and less than half the
    # gap a fixed budget leaves)
    assert trained.converged and trained.rounds > settings.rounds
    assert trained.train_loss - longer <= 0.03
    assert trained.train_loss - longer <= 0.5 * (fixed - longer)


def test_pooled_with_dp_is_central_dp_sgd_for_the_federations_rounds_at_the_same_epsilon() -> None:
    settings = RunSettings().with_overrides({"num-server-rounds": 3, "target-epsilon": 2.0, "seed": 5})
    members = federation_members(settings, 3)
    x, y = np.concatenate([m.train_x for m in members]), np.concatenate([m.train_y for m in members])
    trained = train_centrally(x, y, settings, schema=members[0].schema, salt=101)
    assert trained.rounds == 3 and 1.5 < trained.epsilon <= 2.0 + 1e-9


def _sweep_with_policy(tmp_path: Path, policy: str) -> tuple[object, Path]:
    (tmp_path / "policy.toml").write_text(policy)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        'epsilons = ["inf"]\nseeds = [0]\nrounds = 2\ninstitutions = [3]\n'
        f'[settings]\nsimulation-policy = "{tmp_path / "policy.toml"}"\n'
    )
    out = tmp_path / "results"
    return RUNNER.invoke(app, ["sweep", "--file", str(sweep), "--jobs", "1", "--out", str(out)]), out


def test_a_sweep_in_which_every_institution_refuses_is_an_error_and_its_numbers_are_not_shown(tmp_path: Path) -> None:
    # Execute: every hospital's budget is far below one round's cost
    result, out = _sweep_with_policy(tmp_path, "max-epsilon = 0.01\n")
    # Assert: everything is written, the error is named, the exit is 1
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "error: 3 institutions, iid, SecAgg+, 2 local epochs, epsilon inf (no DP), seed 0: no round was " in text
    assert "(6 of 6 institution-rounds refused)" in text
    results = pd.read_csv(out / "results.csv")
    federated = results[results["method"] == "federated"].iloc[0]
    assert federated["status"] == "untrained" and federated["rounds_aggregated"] == 0
    assert federated["institution_rounds_refused"] == 6 and federated["institution_rounds_trained"] == 0
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["federated", "seeds"] == 0 and math.isnan(summary.loc["federated", "auc_mean"])
    assert summary.loc["federated", "status"] == "untrained" and summary.loc["pooled", "status"] == "ok"
    page = (out / "report.html").read_text()
    assert '<div class="error"><strong>Error:</strong>' in page and "not trained (see errors)" in page
    assert "6 of 6 institution-rounds" in page
    assert "> **Error:**" in (out / "report.md").read_text()
    assert page.count("data:image/png;base64,") == 5


def test_a_sweep_with_some_refusals_warns_and_counts_them(tmp_path: Path) -> None:
    result, out = _sweep_with_policy(tmp_path, "[institutions.hospital-1]\nmax-epsilon = 0.01\n")
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "warning: 3 institutions, iid, SecAgg+, 2 local epochs, epsilon inf (no DP), seed 0: 2 of 6" in text
    federated = pd.read_csv(out / "summary.csv").set_index("method").loc["federated"]
    assert federated["status"] == "refusals" and federated["institution_rounds_refused"] == 2
    assert federated["seeds"] == 1 and federated["auc_mean"] > 0.5
    page = (out / "report.html").read_text()
    assert '<div class="warning"><strong>Warning:</strong>' in page and "2 of 6 institution-rounds" in page
    assert "> **Warning:**" in (out / "report.md").read_text()


def test_a_sweep_file_names_its_schema_relative_to_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a study folder with a table, its schema and the sweep file; the working directory elsewhere
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(DATA_DIR / "german_credit.csv", study / "credit.csv")
    shutil.copy(DATA_DIR / "german_credit.schema.toml", study / "credit.schema.toml")
    path = study / "sweep.toml"
    path.write_text(f'dataset = "{study / "credit.csv"}"\nschema = "credit.schema.toml"\nepsilons = [1]\n')
    monkeypatch.chdir(tmp_path)
    # Execute
    spec = parse_sweep(load_sweep_file(path), str(path), folder=path.parent)
    # Assert
    assert spec.schema == str(study / "credit.schema.toml")
    assert spec.run_settings(spec.tasks()[0]).schema_path == spec.schema
    check_sweep(spec)  # the table is read with that schema
    # The command line reads it the same way (it stops only at the non-empty --out).
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    result = RUNNER.invoke(app, ["sweep", "--file", str(path), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('schema = "nowhere.toml"\n', "'schema' names no file ("),
        ("schema = 3\n", "'schema' must be the path of a schema file (TOML)"),
        ('[settings]\nschema-path = "x.toml"\n', "[settings] may not set ['schema-path']: the sweep sets it"),
    ],
)
def test_a_bad_schema_in_a_sweep_file_is_named(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_sweep(load_sweep_file(path), str(path), folder=tmp_path)
    assert str(err.value).startswith(str(path)) and words in str(err.value)


def test_local_and_distributed_dp_stand_side_by_side_with_pooled_in_one_sweep(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["sweep", "--epsilons", "4", "--seeds", "0", "--rounds", "3", "--institutions", "3", "--jobs", "1"]
    result = RUNNER.invoke(app, [*args, "--dp-modes", "local,distributed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(out / "results.parquet")
    private = results[results["private"]]
    assert sorted(set(zip(private["dp_mode"], private["method"], strict=True))) == [
        (mode, method) for mode in ("distributed", "local") for method in ("alone", "federated", "pooled")
    ]
    federated = private[private["method"] == "federated"].set_index("dp_mode")
    assert (federated["epsilon"] <= 4.0 + 1e-9).all() and (federated["epsilon"] > 0).all()
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["dp_mode"]) == {"local", "distributed"}
    assert ">distributed<" in (out / "report.html").read_text()  # the trade-off table names the mode


def test_sweep_writes_tables_plots_and_a_self_contained_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["sweep", "--epsilons", "2,inf", "--seeds", "0", "--rounds", "2", "--institutions", "3", "--jobs", "1"]
    result = RUNNER.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ROC AUC on the held-out records" in result.output and "Shown: ROC AUC." in result.output
    results = pd.read_parquet(out / "results.parquet")
    assert results.equals(pd.read_csv(out / "results.csv")[results.columns].astype(results.dtypes.to_dict()))
    assert len(results) == 2 * 3 + 1  # two privacy levels x (federated, pooled, alone), and the reference
    assert set(results["method"]) == {"federated", "pooled", "alone", "reference"}
    for column in ("auc", "average_precision", "balanced_accuracy", "majority_rate", "institution_rounds_refused"):
        assert column in results.columns
    assert math.isinf(results[~results["private"]]["epsilon"].max())
    assert len(pd.read_csv(out / "rounds.csv")) == 2 * 2
    assert len(pd.read_csv(out / "institutions.csv")) == (2 * 3 + 1) * 3
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[9:11]) == ["auc_mean", "auc_std"] and "majority_rate" in summary.columns
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "federated ROC AUC" in page
    assert "reference ROC AUC" in page and "majority-class rate" in page and "Shown: ROC AUC." in page
    for name in ("auc_vs_epsilon", "accuracy_vs_epsilon", "auc_over_rounds", "per_institution_auc"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "attack_auc_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
