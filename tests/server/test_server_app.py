"""The ServerApp's own decisions (the rest of it runs in tests/simulations and tests/server/test_deployment.py)."""

from dataclasses import replace
from pathlib import Path

from fedsilo.common.settings import RunSettings
from fedsilo.server.server_app import simulation_state


def test_a_simulation_without_a_state_root_keeps_its_institutions_state_in_the_run_directory(tmp_path: Path) -> None:
    # Prepare: what `flwr run .` hands the ServerApp (pyproject's defaults: no state-root)
    settings = replace(RunSettings(), out_dir=str(tmp_path / "run"))

    # Execute
    simulated = simulation_state(settings)

    # Assert: the institutions the researcher plays write under the run, and are told so
    assert simulated.state_root == str((tmp_path / "run" / "state").resolve())
    assert simulated.institution_config()["state-root"] == simulated.state_root
    assert simulation_state(simulated) == simulated  # a chosen state root is kept


def test_a_simulation_without_an_out_dir_gets_one_run_directory_for_the_model_and_the_state(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    simulated = simulation_state(RunSettings())
    assert Path(simulated.state_root) == Path(simulated.out_dir) / "state"
    assert Path(simulated.out_dir).parent == (tmp_path / "runs").resolve()
