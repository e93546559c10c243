"""Flower's internal gRPC switches set in the coordinator's shell open no server (issue 13, attack 9)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedsilo.runtime.processes import child_env, flower_env, free_port
from fedsilo.server.federation import Federation
from fedsilo.server.processes import start_superlink, stop_superlink
from tests.processes import descendants, listening_ports

SWITCHES = ("FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_INTERNAL_GRPC_CONTROL_API")
GRPC_PORTS = {9092, 9093}  # where flower-superlink serves them (FLEET/CONTROL_API_DEFAULT_ADDRESS)


def test_flower_still_reads_these_switches() -> None:
    import importlib

    from flwr.common import constant

    source = Path(str(importlib.import_module("flwr.superlink.cli.flower_superlink").__file__)).read_text()
    for switch in SWITCHES:
        assert getattr(constant, switch) == switch and f"os.getenv({switch})" in source
    assert all(switch.startswith("FLWR_INTERNAL_") for switch in SWITCHES)  # what fedsilo removes


def test_no_child_environment_carries_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for switch in SWITCHES:
        monkeypatch.setenv(switch, "1")
    monkeypatch.setenv("flwr_internal_anything", "1")
    for env in (flower_env(tmp_path / "flwr"), child_env()):
        assert not [key for key in env if key.upper().startswith("FLWR_INTERNAL_")]
        assert env["PATH"]  # the rest of the environment is kept


def test_a_superlink_started_with_the_switches_set_serves_no_grpc_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the coordinator's shell sets both switches.
    fed = Federation.init(tmp_path / "fed")
    for switch in SWITCHES:
        monkeypatch.setenv(switch, "1")
    port = free_port()
    # Execute: fedsilo starts its SuperLink and gateway as `fedsilo-server start` does.
    running = start_superlink(fed, host="127.0.0.1", port=port)
    try:
        internal = int(fed.flwr_home.joinpath("config.toml").read_text().split("127.0.0.1:")[1].split('"')[0])
        time.sleep(2)  # Flower starts its gRPC servers in the lifespan, before /health answers; be generous
        pids = [p.pid for p in running.processes]
        pids += [d for pid in pids for d in descendants(pid)]
        ports = listening_ports(pids)
        leaked = {pid: _switches(pid) for pid in pids}
    finally:
        stop_superlink(running, fed)
    # Assert: the SuperLink listens on its loopback port, the gateway on the public one, nothing else.
    assert not ports & GRPC_PORTS
    assert ports == {internal, port}, ports
    assert not any(leaked.values()), leaked  # nor does any process fedsilo started, or they started, see them
    assert os.environ[SWITCHES[0]] == "1"  # the caller's own environment is left alone


def _switches(pid: int) -> list[bytes]:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
    return [v for v in environ if v.upper().startswith(b"FLWR_INTERNAL_")]
