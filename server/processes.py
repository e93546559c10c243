"""The coordinator's Flower processes: the SuperLink, node registration, runs, health.

Flower's own executables do the work (``flower-superlink``, ``flwr``); this module
builds their command lines and environment, so that every file they write stays
in the federation directory, starts and stops them, and drives a run
(``fedsilo-server`` parses its options and delegates here; the institution's side
is ``fedsilo.client.processes``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.runtime.processes import die_with_parent, executable, flower_env, free_port, stop_process
from fedsilo.server.federation import Federation, Institution


def superlink_argv(fed: Federation, *, host: str, port: int, insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``insecure``: neither)."""
    fed.superlink_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(fed.superlink_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*argv, "--insecure"]
    return [
        *argv,
        "--ssl-ca-certfile",
        str(fed.ca_cert),
        "--ssl-certfile",
        str(fed.certs / "server.crt"),
        "--ssl-keyfile",
        str(fed.certs / "server.key"),
        "--enable-supernode-auth",
    ]


class SuperLink:
    """A running SuperLink on loopback and the Fleet gateway in front of it (``fedsilo.server.gateway``)."""

    def __init__(self, superlink: subprocess.Popen[bytes], gateway: subprocess.Popen[bytes] | None = None) -> None:
        self.superlink = superlink
        self.gateway = gateway
        self.stopped_runs: list[str] = []

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.gateway, self.superlink) if p is not None]

    def exited(self) -> tuple[str, int] | None:
        """Which process has exited, and its code; None while both run."""
        for name, process in (("SuperLink", self.superlink), ("gateway", self.gateway)):
            if process is not None and process.poll() is not None:
                return name, process.returncode
        return None


def gateway_argv(fed: Federation, *, listen: str, upstream: str, insecure: bool = False) -> list[str]:
    """The Fleet gateway's command line (TLS with the federation's server certificate unless ``insecure``)."""
    argv = [sys.executable, "-m", "fedsilo.server.gateway", "--listen", listen, "--upstream", upstream]
    if insecure:
        return argv
    certs = ["--certfile", str(fed.certs / "server.crt"), "--keyfile", str(fed.certs / "server.key")]
    return [*argv, *certs, "--ca", str(fed.ca_cert)]


def start_superlink(
    fed: Federation, *, host: str, port: int, insecure: bool = False, timeout: float = 60.0
) -> SuperLink:
    """Start the SuperLink on loopback and the Fleet gateway on ``host:port``; register admitted institutions.

    Flower 1.41 serves its Control and Runtime APIs, which do not authenticate
    their callers, on the same port as the Fleet API: only the gateway, which
    forwards nothing but Fleet calls, faces the network.
    """
    if _port_in_use(host, port):
        raise FedsiloError(f"{host}:{port} is already in use; is a SuperLink already running? choose --port")
    fed.superlink_dir.mkdir(parents=True, exist_ok=True)
    internal = f"127.0.0.1:{free_port()}"
    public = f"{_connect_host(host)}:{port}"
    ca = None if insecure else fed.ca_cert
    log = open(fed.superlink_dir / "superlink.log", "ab")  # noqa: SIM115 - the child processes own it
    running = SuperLink(
        subprocess.Popen(
            superlink_argv(fed, host="127.0.0.1", port=int(internal.rsplit(":", 1)[1]), insecure=insecure),
            cwd=fed.superlink_dir,
            env=flower_env(fed.flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # killed with `fedsilo-server start`, however it ends
        )
    )
    try:  # whatever goes wrong from here on, no process outlives this call
        fed.write_connection(internal, insecure=insecure)
        _wait_healthy(running, internal, ca, timeout, log.name)
        # Before anyone can reach it (no superlink.json for `run`, no gateway for institutions):
        # register the admitted keys, and stop the runs the previous SuperLink left active. Those
        # have no ServerApp any more (it spoke to the old loopback port) and would block `run --resume`.
        if not insecure:
            register_admitted(fed)
        running.stopped_runs = active_runs(fed)
        for run_id in running.stopped_runs:
            stop_run(fed, run_id)
        info = {"pid": running.superlink.pid, "address": internal, "public": public, "insecure": insecure}
        (fed.superlink_dir / "superlink.json").write_text(json.dumps(info), encoding="utf-8")
        running.gateway = subprocess.Popen(
            gateway_argv(fed, listen=_listen(host, port), upstream=internal, insecure=insecure),
            cwd=fed.superlink_dir,
            env=flower_env(fed.flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # killed with `fedsilo-server start`, however it ends
        )
        _wait_healthy(running, public, ca, timeout, log.name)
    except BaseException:
        stop_superlink(running, fed)
        raise
    return running


def _wait_healthy(running: SuperLink, address: str, ca: Path | None, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(address, ca):
        if (gone := running.exited()) is not None:
            raise FedsiloError(f"the {gone[0]} exited with code {gone[1]}; see {log}")
        if time.monotonic() > deadline:
            raise FedsiloError(f"the SuperLink did not answer on {address} within {timeout:.0f} s; see {log}")
        time.sleep(0.2)


def stop_superlink(running: SuperLink, fed: Federation, timeout: float = 20.0) -> None:
    """Stop the gateway, the SuperLink and the ServerApp processes it started."""
    for process in running.processes:
        stop_process(process, timeout)
    _stop_orphans(fed)
    (fed.superlink_dir / "superlink.json").unlink(missing_ok=True)


def _stop_orphans(fed: Federation) -> None:
    """Stop ServerApp processes the SuperLink detached and left behind (they hold its address)."""
    path = fed.superlink_dir / "superlink.json"
    if not path.exists():
        return
    address = json.loads(path.read_text(encoding="utf-8"))["address"]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flwr-serverapp") for a in argv) and address.encode() in argv:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGTERM)


def running_address(fed: Federation) -> str | None:
    """The address of this federation's SuperLink if ``start`` is running it."""
    path = fed.superlink_dir / "superlink.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    return str(info["address"]) if _alive(int(info["pid"])) else None


def flwr(fed: Federation, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI against this federation's SuperLink (connection ``fedsilo``)."""
    return subprocess.run(
        [executable("flwr"), *args],
        cwd=fed.root,
        env=flower_env(fed.flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=die_with_parent(),
    )


def flwr_json(fed: Federation, *args: str) -> dict[str, Any]:
    """A ``flwr ... --format json`` call's answer; errors carry Flower's message."""
    done = flwr(fed, *args, "--format", "json")
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise FedsiloError(f"flwr {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-500:]}") from None
    if not answer.get("success", done.returncode == 0):
        raise FedsiloError(f"flwr {' '.join(args)} failed: {answer.get('error-message', answer)}")
    return dict(answer)


ACTIVE_STATES = ("pending", "starting", "running")


def active_runs(fed: Federation) -> list[str]:
    """Flower run ids that are pending, starting or running on this federation's SuperLink."""
    runs = flwr_json(fed, "ls", "fedsilo").get("runs", [])
    return [str(r["run-id"]) for r in runs if str(r.get("status", "")).split(":")[0] in ACTIVE_STATES]


def stop_run(fed: Federation, run_id: str, timeout: float = 120.0) -> None:
    """Stop a Flower run on this federation's SuperLink."""
    try:
        done = flwr(fed, "stop", run_id, "fedsilo", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedsiloError(
            f"flwr stop {run_id} did not answer within {timeout:.0f} s; "
            f"run `fedsilo-server stop {fed.root}` to stop the run"
        ) from None
    if done.returncode != 0:
        raise FedsiloError(f"flwr stop {run_id} failed: {(done.stderr or done.stdout).strip()[-500:]}")


@contextlib.contextmanager
def run_lock(fed: Federation) -> Iterator[None]:
    """Held while ``fedsilo-server run`` drives a run: one driver per federation."""
    fed.superlink_dir.mkdir(parents=True, exist_ok=True)
    with open(fed.superlink_dir / "run.lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FedsiloError(
                f"another `fedsilo-server run` (pid {lock.read().strip() or '?'}) is driving a run of {fed.root}; "
                "wait for it, or stop it with Ctrl-C or `fedsilo-server stop`"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _registered(fed: Federation) -> dict[str, dict[str, str]]:
    """Institutions registered with this federation's SuperLink: name -> fingerprint and Flower node id.

    The file lives beside the SuperLink's state database and is only valid with it.
    """
    path = fed.superlink_dir / "registered.json"
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else {}


def register_admitted(fed: Federation) -> list[str]:
    """Register admitted institutions the SuperLink does not know yet; return their names."""
    registered = _registered(fed)
    new = []
    for name, inst in fed.institutions().items():
        if registered.get(name, {}).get("fingerprint") == inst.fingerprint:
            continue
        key_file = fed.superlink_dir / f"{name}.pub"
        key_file.write_text(inst.public_key + "\n", encoding="utf-8")
        answer = flwr_json(fed, "supernode", "register", str(key_file), "fedsilo", "--name", name)
        registered[name] = {"fingerprint": inst.fingerprint, "node-id": str(answer.get("node-id", ""))}
        (fed.superlink_dir / "registered.json").write_text(json.dumps(registered, indent=2), encoding="utf-8")
        new.append(name)
    return new


def node_names(fed: Federation) -> dict[str, str]:
    """Each registered institution's name, by Flower node id."""
    return {entry["node-id"]: name for name, entry in _registered(fed).items()}


def record_admitted(fed: Federation, run_dir: Path) -> None:
    """Write ``run_dir/admitted.json`` (node id -> admitted name) so the run names institutions by their keys.

    ``fedsilo.server.run_directory.RunDirectory.ADMITTED`` reads it back; an
    institution's self-asserted name in its replies is then only compared.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "admitted.json").write_text(json.dumps(node_names(fed), indent=2) + "\n", encoding="utf-8")


def healthy(address: str, ca_cert: Path | None) -> bool:
    """Whether the SuperLink at ``address`` answers ``GET /health`` (over TLS unless ``ca_cert`` is None)."""
    scheme = "http" if ca_cert is None else "https"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    try:
        with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2, context=context) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, OSError):
        return False


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.settimeout(1)
        return probe.connect_ex((_connect_host(host).strip("[]"), port)) == 0


def _alive(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}").stat()
    except FileNotFoundError:
        return False
    return True


def require_admitted(fed: Federation) -> None:
    if not fed.institutions():
        raise ConfigError(f"no institution is admitted to {fed.root}; run `fedsilo-server admit` first")


def admit(fed: Federation, public_key: Path, name: str) -> tuple[Institution, bool]:
    """Admit an institution's key, and register it with the running SuperLink if there is one.

    Returns the admission and whether it was registered now. An institution is never
    half admitted (the SuperLink would refuse it until a restart).
    """
    entry = fed.admit(public_key, name)
    live = running_address(fed) is not None
    if live:
        try:
            register_admitted(fed)
        except FedsiloError:
            fed.withdraw(name)
            raise
    return entry, live


@contextlib.contextmanager
def run_slot(fed: Federation) -> Iterator[None]:
    """Hold the federation's run lock once a run can start: institutions admitted, a SuperLink, no active run."""
    require_admitted(fed)
    if running_address(fed) is None:
        raise FedsiloError(f"no SuperLink is running for {fed.root}; start it with `fedsilo-server start`")
    with run_lock(fed):
        if active := active_runs(fed):
            raise FedsiloError(
                f"Flower run(s) {', '.join(active)} are still active on the SuperLink; a second run would "
                f"compete for the same institutions. Stop them with `fedsilo-server stop {fed.root}`"
            )
        yield


def drive_run(fed: Federation, *, verbose: bool, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Submit the app ``fed.write_app`` wrote with ``flwr run --stream`` and show its progress.

    Without ``verbose`` only fedsilo's own lines and errors are shown. Ctrl-C (or
    SIGTERM) stops the Flower run too, then raises ``KeyboardInterrupt``.
    """

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    argv = [executable("flwr"), "run", str(fed.app_dir), "fedsilo", "--stream"]
    # Unbuffered: Flower prints the stream with print(), which a pipe would hold back in blocks.
    env = {**flower_env(fed.flwr_home), "PYTHONUNBUFFERED": "1"}
    run_id = None
    try:
        with subprocess.Popen(
            argv,
            cwd=fed.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=die_with_parent(),
        ) as flower:
            assert flower.stdout is not None
            try:
                shown = ""
                for line in flower.stdout:
                    if run_id is None and (started := re.search(r"Successfully started run (\d+)", line)):
                        run_id = started.group(1)
                    if verbose:
                        sys.stdout.write(line)
                    elif "[fedsilo]" in line or "ERROR" in line:
                        text = line.split("[fedsilo] ")[-1]
                        if text != shown:  # Flower logs each line through two handlers
                            sys.stdout.write(text)
                        shown = text
                    sys.stdout.flush()
            except KeyboardInterrupt:
                stop_process(flower, timeout=5)
                raise
    except KeyboardInterrupt:
        # Wherever the Ctrl-C came (streaming, or waiting for the stream's process to end), the
        # stream is only a view: the run itself goes on until stopped. It can come before the
        # stream has shown the run's id; the caller holds the federation's run lock (``run_slot``),
        # so the runs active on the SuperLink then are its own.
        try:
            active = [run_id] if run_id is not None else active_runs(fed)
            for each in active:
                stop_run(fed, each, timeout=60)
                say(f"stopped Flower run {each}")
            if not active:
                say("no Flower run was active on the SuperLink")
        except FedsiloError as err:
            warn(str(err))
        raise
