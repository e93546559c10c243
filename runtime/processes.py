"""Flower's processes: their environment (they write only where fedsilo says), executables, ports, stopping."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsilo.common.errors import FedsiloError

QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


# Flower's SuperExec looks for a new app to launch every second by default; each SecAgg+
# round is five messages per institution, each waiting on that poll. (The caller's own
# environment wins, for measuring.)
DEPLOYMENT = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}

# Flower's internal switches. With FLWR_INTERNAL_GRPC_FLEET_API or FLWR_INTERNAL_GRPC_CONTROL_API
# set to 1, flower-superlink also serves gRPC Fleet and Control APIs on 0.0.0.0:9092 and :9093
# (flwr/superlink/cli/flower_superlink.py), the Control API unauthenticated and beside the gateway.
# No process fedsilo starts sees any variable with this prefix, whatever the caller's environment.
INTERNAL_PREFIX = "FLWR_INTERNAL_"


def child_env() -> dict[str, str]:
    """This process's environment without Flower's internal switches: what every child fedsilo starts gets."""
    return {key: value for key, value in os.environ.items() if not key.upper().startswith(INTERNAL_PREFIX)}


def scrub_environment() -> None:
    """Remove Flower's internal switches from this process's own environment (for Flower run in-process)."""
    for key in [key for key in os.environ if key.upper().startswith(INTERNAL_PREFIX)]:
        del os.environ[key]


def flower_env(home: Path) -> dict[str, str]:
    """This process's environment, FLWR_HOME at ``home``, Flower's network chatter and internal switches off."""
    home.mkdir(parents=True, exist_ok=True)
    # Flower's processes start more of Flower's executables by name: find this environment's first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**DEPLOYMENT, **child_env(), **QUIET, "FLWR_HOME": str(home.resolve()), "PATH": path}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bind_to_parent(parent: int) -> None:
    """Have this process killed (SIGKILL) when its parent ends, however it ends (Linux; elsewhere nothing).

    ``parent`` is the pid the caller expects as its parent: if it has already ended (this
    process now belongs to init or a subreaper), this process ends at once.
    """
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess``: the child is killed when this process ends, whatever the signal.

    Call it in the thread that starts the child, and keep that thread alive as long as the
    child (Linux sends the signal when the thread that forked the child ends): fedsilo's CLIs
    start their children from the main thread. None (nothing to do) where Linux's
    ``PR_SET_PDEATHSIG`` does not exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def executable(name: str) -> str:
    """An executable of this Python's environment, Flower's or fedsilo's (falling back to PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedsiloError(f"cannot find the '{name}' executable; is fedsilo installed in this environment?")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for local federations: tests, benchmarks)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Terminate ``process``, and kill it if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
