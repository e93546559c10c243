"""Sweeps and Flower simulations on a real two-node Ray cluster on 127.0.0.1 (``ray start`` head and worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedsilo.common.errors import ConfigError
from fedsilo.runtime.processes import free_port
from fedsilo.simulations.cli import app
from fedsilo.simulations.cluster import pack, unpack
from fedsilo.simulations.local_cluster import LocalCluster
from fedsilo.simulations.runner import ray_init_args
from fedsilo.simulations.sweep_spec import parse_sweep

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SWEEP = ["sweep", "--dataset", "breast-cancer", "--epsilons", "2,inf", "--seeds", "0,1", "--rounds", "4"]
SWEEP += ["--institutions", "3"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head and one worker, one CPU each, running this checkout's code; stopped by PID afterwards."""
    started = LocalCluster(workers=1, cpus=1, code=ROOT)
    try:
        yield started.start()
    finally:
        started.stop()
        assert started.leftovers() == []  # nothing of any node still runs


def _node_ids(cluster: LocalCluster) -> set[str]:
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(*[n['NodeID'] for n in ray.nodes()])"
    argv = [sys.executable, "-c", probe % cluster.address]
    done = subprocess.run(argv, capture_output=True, text=True, env=cluster.env, timeout=60, check=True)
    return set(done.stdout.split())


@pytest.mark.simulation
def test_a_sweep_on_a_two_node_cluster_runs_on_both_nodes_and_equals_the_local_run(
    cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    local, remote = tmp_path / "local", tmp_path / "remote"
    done = RUNNER.invoke(app, [*SWEEP, "--jobs", "1", "--out", str(local)])
    assert done.exit_code == 0, done.output
    monkeypatch.setenv("RAY_TMPDIR", cluster.env["RAY_TMPDIR"])
    # Execute
    result = RUNNER.invoke(app, [*SWEEP, "--ray-address", cluster.address, "--out", str(remote)])
    # Assert: the tasks ran on both nodes of this cluster, and gave the local run's numbers
    assert result.exit_code == 0, result.output + cluster.log()
    assert f"Ray cluster {cluster.address}" in result.output
    nodes = {json.loads(p.read_text())["ran_on"]["node_id"] for p in (remote / "tasks").glob("*.json")}
    assert len(nodes) == 2 and nodes == _node_ids(cluster)
    assert set(pd.read_csv(remote / "tasks.csv")["node_id"]) == nodes
    for name in ("results", "rounds", "institutions", "summary"):
        expected = pd.read_csv(local / f"{name}.csv").drop(columns=["wall_s"], errors="ignore")
        found = pd.read_csv(remote / f"{name}.csv").drop(columns=["wall_s"], errors="ignore")
        pd.testing.assert_frame_equal(found, expected, check_exact=True, obj=name)
    # Each federation's run directory came back from the node that ran it.
    for run in (local / "runs").iterdir():
        assert (remote / "runs" / run.name / "report.json").is_file()
        back, here = torch.load(remote / "runs" / run.name / "model.pt"), torch.load(run / "model.pt")
        assert back.keys() == here.keys() and all(torch.equal(back[k], here[k]) for k in here)


@pytest.mark.simulation
def test_flower_simulation_joins_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    # Execute: a Flower simulation, in its own process, pointed at the cluster
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "fedsilo.simulations.cli",
        "run",
        "--engine",
        "flower",
        "--ray-address",
        cluster.address,
    ]
    argv += ["--dataset", "breast-cancer", "--institutions", "3", "--rounds", "2", "--out", str(out)]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env, cwd=ROOT
    )
    output, _ = process.communicate(timeout=300)
    # Assert: it ran to the end, and its driver joined this cluster (Ray logs each driver in the session)
    assert process.returncode == 0, output
    assert f"on the Ray cluster at {cluster.address}" in " ".join(output.split())
    assert json.loads((out / "report.json").read_text())["rounds_completed"] == 2
    drivers = Path(cluster.env["RAY_TMPDIR"]).glob("session_*/logs/python-core-driver-*.log")
    assert any(p.name.endswith(f"_{process.pid}.log") for p in drivers), sorted(p.name for p in drivers)


def test_a_sweep_on_ray_refuses_flowers_engine() -> None:
    with pytest.raises(ConfigError, match="'ray-address' runs each federation as one Ray task of the in-process"):
        parse_sweep({"ray-address": "127.0.0.1:6379", "engine": "flower"}, "sweep.toml")


def test_the_run_command_refuses_a_ray_address_without_flowers_engine(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["run", "--engine", "inprocess", "--ray-address", "x:1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--ray-address runs Flower's simulation engine on a cluster" in result.output


def test_a_run_directory_travels_packed(tmp_path: Path) -> None:
    (tmp_path / "run" / "state").mkdir(parents=True)
    (tmp_path / "run" / "state" / "ledger.json").write_text("{}")
    (tmp_path / "run" / "model.pt").write_bytes(b"\x00\x01")
    unpack(pack(tmp_path / "run"), tmp_path / "back")
    assert (tmp_path / "back" / "state" / "ledger.json").read_text() == "{}"
    assert (tmp_path / "back" / "model.pt").read_bytes() == b"\x00\x01"


def test_flowers_ray_backend_joins_a_cluster_instead_of_sizing_a_local_ray() -> None:
    assert ray_init_args(3, ray_address="10.0.0.5:6379") == {
        "address": "10.0.0.5:6379",
        "logging_level": "ERROR",
        "log_to_driver": False,
    }
    local = ray_init_args(3)
    assert "address" not in local and local["include_dashboard"] is False and 1 <= local["num_cpus"] <= 3


def test_a_sweep_pointed_at_no_cluster_exits_2_at_once_and_writes_nothing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    argv = [*SWEEP, "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "out")]
    result = RUNNER.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_sweep_file_names_its_cluster_and_a_bad_address_is_refused() -> None:
    assert parse_sweep({"ray-address": " 10.0.0.5:6379 "}, "sweep.toml").ray_address == "10.0.0.5:6379"
    with pytest.raises(ConfigError, match=r"sweep.toml: 'ray-address' must be a Ray cluster's address.*Found 6379"):
        parse_sweep({"ray-address": 6379}, "sweep.toml")


def test_a_local_sweep_never_imports_ray(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from fedsilo.simulations.sweep import run_sweep; "
        "from fedsilo.simulations.sweep_spec import SweepSpec; "
        f"run_sweep(SweepSpec(rounds=1, epsilons=(2.0,), institutions=(3,), seeds=(0,)), Path({str(tmp_path)!r}), "
        "jobs=1); print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[]"
