"""The coordinator's Flower processes: the SuperLink, node registration, runs, health.

Flower's own executables do the work (``flower-superlink``, ``flwr``); this module
only builds their command lines and environment, so that every file they write
stays in the federation directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedsiloError
from common.flower_env import executable, flower_env
from server.federation import Federation


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


def start_superlink(
    fed: Federation, *, host: str, port: int, insecure: bool = False, timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start the SuperLink, wait until it answers, register every admitted institution."""
    if _port_in_use(host, port):
        raise FedsiloError(f"{host}:{port} is already in use; is a SuperLink already running? choose --port")
    fed.superlink_dir.mkdir(parents=True, exist_ok=True)
    log = open(fed.superlink_dir / "superlink.log", "ab")  # noqa: SIM115 - the child process owns it
    process = subprocess.Popen(
        superlink_argv(fed, host=host, port=port, insecure=insecure),
        cwd=fed.superlink_dir,
        env=flower_env(fed.flwr_home),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"{_connect_host(host)}:{port}"
    try:  # whatever goes wrong from here on, the SuperLink does not outlive this call
        fed.write_connection(address, insecure=insecure)
        deadline = time.monotonic() + timeout
        while not healthy(address, None if insecure else fed.ca_cert):
            if process.poll() is not None:
                raise FedsiloError(f"the SuperLink exited with code {process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise FedsiloError(f"the SuperLink did not answer on {address} within {timeout:.0f} s; see {log.name}")
            time.sleep(0.2)
        (fed.superlink_dir / "superlink.json").write_text(
            json.dumps({"pid": process.pid, "address": address, "insecure": insecure}), encoding="utf-8"
        )
        if not insecure:
            register_admitted(fed)
    except BaseException:
        stop_superlink(process, fed)
        raise
    return process


def stop_superlink(process: subprocess.Popen[bytes], fed: Federation, timeout: float = 20.0) -> None:
    """Stop the SuperLink (and the ServerApp processes it started)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
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


def healthy(address: str, ca_cert: Path | None) -> bool:
    """Whether the SuperLink at ``address`` answers ``GET /health`` (over TLS unless ``ca_cert`` is None)."""
    scheme = "http" if ca_cert is None else "https"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    try:
        with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2, context=context) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, OSError):
        return False


def connect_address(fed: Federation, port: int | None = None) -> str:
    """Where this machine reaches the federation's SuperLink."""
    return running_address(fed) or f"127.0.0.1:{port or fed.port}"


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


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
