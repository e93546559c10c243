"""A Ray cluster of a head and workers on this machine, as ``ray start --block`` processes (tests, benchmarks).

Every node gets its own free ports and the cluster one short temp dir (Ray's
socket paths must stay short), so several clusters can share a machine; the
processes are stopped by PID, and ``ray stop`` scoped to that temp dir is the
fallback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsilo.runtime.processes import QUIET, child_env, executable, free_port

HOST = "127.0.0.1"


def _ports(*names: str) -> list[str]:
    return [arg for name in names for arg in (f"--{name}", str(free_port()))]


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


class LocalCluster:
    """A head and ``workers`` worker nodes, ``cpus`` CPUs each; ``address`` is the head's GCS address."""

    def __init__(self, *, workers: int = 1, cpus: int = 1, code: Path | None = None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="fr-"))
        self.logs = self.temp / "logs"
        self.logs.mkdir()
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.workers, self.cpus = workers, cpus
        path = [str(code)] if code else []
        pythonpath = os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
        self.env = {**child_env(), **QUIET, "RAY_TMPDIR": str(self.temp / "ray"), "PYTHONPATH": pythonpath}
        self.processes: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        ray = executable("ray")
        common = ["--block", "--num-cpus", str(self.cpus), "--temp-dir", str(self.temp / "ray")]
        common += ["--node-ip-address", HOST, "--disable-usage-stats", *_ports(*NODE_PORTS)]
        process = subprocess.Popen(
            [ray, "start", *argv, *common], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.processes.append(process)

    def start(self, timeout: float = 120) -> LocalCluster:
        """Start the head, then the workers; return once every node has joined."""
        head = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        head += _ports("ray-client-server-port", "dashboard-port")
        self._start("head", head)
        self.wait_for_nodes(1, timeout)
        for i in range(self.workers):
            self._start(f"worker-{i + 1}", ["--address", self.address])
        self.wait_for_nodes(1 + self.workers, timeout)
        return self

    def alive_nodes(self) -> int:
        """How many nodes the head counts alive (-1: it does not answer yet)."""
        probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        done = subprocess.run(
            [sys.executable, "-c", probe % self.address], capture_output=True, text=True, env=self.env, timeout=60
        )
        lines = done.stdout.split()
        return int(lines[-1]) if done.returncode == 0 and lines else -1

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < count:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({process.returncode}); logs in {self.logs}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s:\n{self.log()}")
            time.sleep(1)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL to its process group); remove the temp dir."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            with contextlib.suppress(ProcessLookupError):  # what the node's group left behind (raylet, GCS)
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes (zombies aside) still in a node's process group (Linux's /proc; [] elsewhere)."""
        groups = {p.pid for p in self.processes}
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp
                if fields[0] != "Z" and int(fields[2]) in groups:
                    alive.append(int(stat.parent.name))
        return alive

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


@contextlib.contextmanager
def local_cluster(*, workers: int = 1, cpus: int = 1, code: Path | None = None) -> Iterator[LocalCluster]:
    """A started ``LocalCluster``, stopped on exit."""
    cluster = LocalCluster(workers=workers, cpus=cpus, code=code)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
