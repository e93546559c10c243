"""Killing `fedsilo-client start` or `fedsilo-server start` with SIGKILL ends all it started (issue 13, attack 12).

An institution that stops must stop taking part: a SuperNode left running would stay
connected and go on training on the institution's records.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedsilo.common.datasets import load_builtin
from fedsilo.runtime.keys import new_node_keys
from fedsilo.runtime.processes import executable, free_port
from fedsilo.server.federation import Federation
from fedsilo.server.processes import healthy
from tests.processes import alive, command, descendants

pytestmark = pytest.mark.deployment
# SIGKILL of the parent -> its children (at once) -> theirs (Flower polls its parent every 0.2 s).
BOUND_S = 15.0


class Started:
    """The processes a test starts, and every child seen below them: all killed at the end."""

    def __init__(self) -> None:
        self.parents: list[subprocess.Popen[bytes]] = []
        self.children: set[int] = set()

    def stop(self) -> None:
        for process in self.parents:
            self.children |= set(descendants(process.pid))
            process.kill()
            process.wait()
        for pid in self.children:  # orphans too: had the fix failed, they would belong to init now
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def started() -> Iterator[Started]:
    processes = Started()
    try:
        yield processes
    finally:
        processes.stop()


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.25)


def kill_and_survivors(parent: subprocess.Popen[bytes], children: list[int]) -> list[str]:
    """SIGKILL ``parent``; the children still running after BOUND_S, named."""
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + BOUND_S
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{pid}: {command(pid)}" for pid in children if alive(pid)]


def test_killing_fedsilo_client_start_ends_its_supernode_superexec_forkserver_and_trainer(
    tmp_path: Path, started: Started
) -> None:
    # Prepare: an institution with valid data and keys; the SuperLink it names never answers,
    # so the SuperNode keeps trying to connect, its SuperExec and forkserver running.
    fed = Federation.init(tmp_path / "fed", dataset="german-credit")
    new_node_keys(tmp_path / "bank" / "node.key")
    load_builtin("german-credit").frame.iloc[:300].to_csv(tmp_path / "bank" / "records.csv", index=False)
    (tmp_path / "bank" / "policy.toml").write_text("max-epsilon = 10.0\n")
    argv = [executable("fedsilo-client"), "start", "--server", f"127.0.0.1:{free_port()}"]
    argv += ["--ca", str(fed.ca_cert), "--key", str(tmp_path / "bank" / "node.key")]
    argv += ["--data", str(tmp_path / "bank" / "records.csv"), "--schema", str(fed.schema_path)]
    argv += ["--policy", str(tmp_path / "bank" / "policy.toml"), "--state-dir", str(tmp_path / "bank" / "state")]
    argv += ["--port", str(free_port())]
    log = open(tmp_path / "client.log", "wb")  # noqa: SIM115 - closed below
    client = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started.parents.append(client)
    wanted = {
        "warm trainer": "fedsilo.client.trainer",
        "SuperNode": "fedsilo.runtime.flower.supernode",
        "SuperExec": "fedsilo.runtime.flower.superexec",
        "forkserver": "forkserver",
    }

    def tree() -> dict[str, int]:
        found = {}
        for pid in descendants(client.pid):
            for name, marker in wanted.items():
                if marker in command(pid) and name not in found:
                    found[name] = pid
        return found

    wait_for("the institution's processes", lambda: set(tree()) == set(wanted) or client.poll() is not None, 180)
    log.close()
    assert client.poll() is None, (tmp_path / "client.log").read_text()
    children = descendants(client.pid)
    started.children |= set(children)
    # Execute: the institution's operator kills `fedsilo-client start` with kill -9.
    survivors = kill_and_survivors(client, children)
    # Assert: nothing it started runs any more.
    assert survivors == [], survivors


def test_killing_fedsilo_server_start_ends_its_superlink_and_gateway(tmp_path: Path, started: Started) -> None:
    port = free_port()
    fed = Federation.init(tmp_path / "fed", dataset="german-credit", port=port)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [executable("fedsilo-server"), "start", str(fed.root)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started.parents.append(server)
    wait_for("the SuperLink", lambda: healthy(f"127.0.0.1:{port}", fed.ca_cert) or server.poll() is not None, 120)
    log.close()
    assert server.poll() is None, (tmp_path / "server.log").read_text()
    children = descendants(server.pid)
    started.children |= set(children)
    commands = " ".join(command(pid) for pid in children)
    assert "flower-superlink" in commands and "fedsilo.server.gateway" in commands
    survivors = kill_and_survivors(server, children)
    assert survivors == [], survivors
